#!/bin/sh
# Continues the bundled disyre-t2-phantom (1,500 steps, batch 16, seed 0) on fresh T2 phantom seeds
# (400000, ...), EMA 0.999, learning curve every 500 steps (DISYRE paper-preset AP on 24 slices of the
# bundled T2 sample), as checkpoints/disyre-t1 did for T1. One CPU thread, lowest priority.
# Usage (from the repository root):  sh checkpoints/disyre-t2/run.sh MINUTES
#   continue: RESUME=1 sh checkpoints/disyre-t2/run.sh MINUTES   (NICE=n sets the priority, default 19)
#   a fresh start needs the weights it started from: git show 5f85087:models/disyre-t2-phantom/model.safetensors
set -e
MIN=${1:-60}
RUN=checkpoints/disyre-t2
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:-UADExtension}
PY=${PYTHON:-python}
if [ -n "$RESUME" ]; then
  ARGS="--method disyre -o $RUN --resume --time-limit $MIN --no-progress"
else
  ARGS="--method disyre --contrast T2 -o $RUN --init disyre-t2-phantom --ema-decay 0.999 --batch-size 16 --lr 1e-4 \
--seed 400000 --steps 100000 --curve-every 500 --curve-method disyre --curve-preset paper --curve-slices 24 \
--time-limit $MIN --no-progress"
fi
exec nice -n ${NICE:-19} $PY -c "import sys, torch; torch.set_num_threads(1); from uad.cli import main; sys.exit(main(sys.argv[1:]))" train $ARGS
