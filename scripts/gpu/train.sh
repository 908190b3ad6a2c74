#!/usr/bin/env bash
# Issue 7's GPU run in one device call: train the paper-size DDPM, calibrate, benchmark, pack (scripts/gpu/train.py).
#
# Here, before:  bash scripts/gpu/stage.sh     (wheels + templates into .whl/, big folders kept from travelling)
# Device call:   run(command="bash scripts/gpu/train.sh", carry=[".whl"], timeout_s=600)
#                (defaults: T2, 4 training minutes, then export + calibration + card, then the held-out benchmark
#                 until 9 minutes after the start, then packing; extra arguments go to 'train.py run', e.g.
#                 --minutes 4 --deadline-minutes 8.5). With 15 minutes of device time in a session and a minute or
#                 two to start the machine, there is one try: run the CPU dry run below first.
# Here, after:   bash scripts/gpu/stage.sh --restore
#                python scripts/gpu/train.py unpack <files_at>   (then scripts/update_cards.py, uad models verify)
# On a CPU:      bash scripts/gpu/train.sh --dry-run --device cpu --deadline-minutes 30
#                (in a scratch copy of the staged tree: 8 minutes on two cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
uad_need torch numpy scipy sklearn skimage monai SimpleITK nibabel safetensors
nvidia-smi -L 2>/dev/null || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
exec "$PY" scripts/gpu/train.py run --out "${OUT:-runs/gpu-out}" "$@"
