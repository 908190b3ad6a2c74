#!/usr/bin/env bash
# One-shot speed check for a session lent a GPU (issue 11): prints every figure in < 10 minutes on one GPU.
#
#   bash benchmarks/gpu.sh                  # on the GPU machine, from the repository root
#   bash benchmarks/gpu.sh --device cpu --quick   # the same code path on a CPU (a few minutes)
#
# The GPU machine lacks some of the engine's packages and reaches no registry: stage their wheels and the
# MNI152 template files here first with `bash scripts/gpu/stage.sh` (it also keeps the tree that travels under
# the device tool's 64 MiB), name .whl in the run's carry, and `bash scripts/gpu/stage.sh --restore` afterwards.
# scripts/gpu/env.sh installs the wheels on the machine. Extra arguments go to benchmarks/gpu_bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu/env.sh
uad_need torch numpy scipy sklearn skimage monai SimpleITK nibabel einops safetensors
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
exec "$PY" benchmarks/gpu_bench.py "$@"
