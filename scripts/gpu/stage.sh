#!/usr/bin/env bash
# Prepare this checkout for one call of the device tool (a session lent a GPU), and undo it afterwards.
#
#   bash scripts/gpu/stage.sh            # here, before the device call
#   bash scripts/gpu/stage.sh --restore  # here, after it (also safe to run when nothing is staged)
#
# What travels to the GPU machine is the checkout's tracked files plus untracked files git does not ignore plus
# the carried paths, 64 MiB at most. The committed training checkpoints and bundled models are far more than
# that, and the machine needs neither for a training run. Staging therefore
#   1. downloads the wheels the machine lacks (MONAI, SimpleITK, nibabel, opensimplex: about 58 MB) into .whl/
#      and copies nilearn's three MNI152 2009a files (5 MB) into .whl/mni152/ (nilearn itself, 11.5 MB, does not
#      travel: uad.phantoms reads the files with SimpleITK when $UAD_MNI152_DIR is set; scripts/gpu/env.sh sets it);
#   2. takes checkpoints/ models/ docs/ Testing/ out of git's index (git rm --cached: the files stay on disk,
#      untouched) and ignores them and .whl/ in .git/info/exclude, so that they do not travel;
#   3. prints the size of what will travel.
# --restore puts the index back (git reset) and removes the exclude lines; .whl/ stays for a rerun.
# If a session stops between the two, `git status` shows the four folders as staged deletions:
# `bash scripts/gpu/stage.sh --restore` (or `git reset -q`) brings them back; nothing on disk was touched.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIG=(checkpoints models docs Testing)
EXCLUDE=.git/info/exclude
MARK="# uad-gpu-stage"
mkdir -p .git/info
touch "$EXCLUDE"

if [ "${1:-}" = "--restore" ]; then
    git reset -q -- "${BIG[@]}"
    sed -i "/^$MARK begin\$/,/^$MARK end\$/d" "$EXCLUDE"
    echo "restored: ${BIG[*]} tracked again"
    exit 0
fi

PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
if [ -n "$(git status --porcelain -- "${BIG[@]}")" ]; then
    echo "stage.sh: ${BIG[*]} have uncommitted changes; commit or stash them first" >&2
    exit 1
fi
mkdir -p .whl/mni152
# the versions the project is tested with; --no-deps: the machine already has their other needs
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl monai==1.6.1 SimpleITK==2.5.7 nibabel==5.4.2 opensimplex==0.4.5.1
PYTHONPATH=UADExtension "$PY" - <<'PYEOF'
import shutil
from pathlib import Path

import nilearn

from uad.phantoms import MNI152_FILES

src = Path(nilearn.__file__).parent / "datasets" / "data"
for name in MNI152_FILES.values():
    shutil.copy(src / name, Path(".whl/mni152") / name)
PYEOF
git rm -r -q --cached -- "${BIG[@]}"
sed -i "/^$MARK begin\$/,/^$MARK end\$/d" "$EXCLUDE"
{ echo "$MARK begin"; for d in "${BIG[@]}" .whl; do echo "/$d/"; done; echo "$MARK end"; } >> "$EXCLUDE"
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r du -cb 2>/dev/null \
        | awk '/\ttotal$/ {s += $1} END {print s + 0}')
wheels=$(du -cb .whl/*.whl .whl/mni152/* | awk '/\ttotal$/ {print $1}')
echo "staged: the tree that travels $((tree / 1024)) KiB + carry .whl $((wheels / 1024)) KiB" \
     "= $(((tree + wheels) / 1048576)) MiB (the device tool takes 64 MiB)"
echo "device call: carry [\".whl\"], command 'bash scripts/gpu/train.sh' (see its header);" \
     "afterwards: bash scripts/gpu/stage.sh --restore"
