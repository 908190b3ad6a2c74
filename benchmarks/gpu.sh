#!/usr/bin/env bash
# One-shot speed check for a session lent a GPU (issue 11): prints every figure in < 10 minutes on one GPU.
#
#   bash benchmarks/gpu.sh                  # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --device cpu --quick   # the same code path on a CPU (a few minutes)
#
# The GPU machine has torch (and numpy, scipy, scikit-learn, scikit-image, einops, matplotlib) but not
# MONAI, SimpleITK, nilearn, nibabel, lpips or opensimplex, and no registry access. This script installs
# nothing from the network: it installs only the wheels found in $UAD_WHEELS (default: .whl/ in the
# repository root), with pip --no-index --no-deps, into /tmp/site. Fetch them here first (see
# /work/.library/device/README.md), e.g.
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       monai==1.6.1 SimpleITK==2.5.7 nilearn==0.14.1 nibabel==5.4.2 lpips==0.1.4 opensimplex==0.4.5.1
# and name .whl in the run's carry. (The SimpleITK wheel is about 50 MB: with the 23 MB tree that is
# close to the 64 MiB a call may carry.) Extra arguments go to benchmarks/gpu_bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${UAD_WHEELS:-.whl}"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/UADExtension${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = ["torch", "numpy", "scipy", "sklearn", "skimage", "monai", "SimpleITK", "nilearn", "nibabel", "einops",
        "safetensors"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PYEOF
)
if [ -n "$missing" ]; then
    echo "gpu.sh: missing Python packages: $missing (carry their wheels in $WHEELS/)" >&2
    exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
exec "$PY" benchmarks/gpu_bench.py "$@"
