# Sourced (bash) by benchmarks/gpu.sh and scripts/gpu/train.sh on the GPU machine, from the repository root.
#
# That machine has torch (and numpy, scipy, scikit-learn, scikit-image, pandas, einops, matplotlib, safetensors)
# but not MONAI, SimpleITK, nibabel, nilearn or opensimplex, and reaches no registry. This installs only the
# wheels found in $UAD_WHEELS (default .whl/, staged here by scripts/gpu/stage.sh), with pip --no-index
# --no-deps, into /tmp/site, and points the engine at the MNI152 template files staged beside them
# ($UAD_WHEELS/mni152 -> $UAD_MNI152_DIR: uad.phantoms reads them with SimpleITK, so nilearn need not travel).
WHEELS="${UAD_WHEELS:-.whl}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -d "$WHEELS/mni152" ] && [ -z "${UAD_MNI152_DIR:-}" ]; then
    export UAD_MNI152_DIR="$PWD/$WHEELS/mni152"
fi
export PYTHONPATH="$PWD/UADExtension${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

# uad_need NAME...: exit 2 with a message naming the Python packages that cannot be imported
uad_need() {
    local missing
    missing=$("$PY" - "$@" <<'PYEOF'
import importlib.util, sys
print(" ".join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is None))
PYEOF
)
    if [ -n "$missing" ]; then
        echo "missing Python packages: $missing (stage their wheels with scripts/gpu/stage.sh)" >&2
        exit 2
    fi
}
