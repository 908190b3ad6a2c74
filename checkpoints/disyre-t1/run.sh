#!/bin/sh
# Continues the bundled disyre-t1-phantom (1,000 steps, batch 16, seed 0) on fresh T1 phantom seeds
# (300000, ...), EMA 0.999, learning curve every 500 steps (DISYRE paper-preset AP on a T1 tumour phantom).
# One CPU thread, lowest priority.
# Usage (from the repository root):  sh checkpoints/disyre-t1/run.sh MINUTES
#   continue: RESUME=1 sh checkpoints/disyre-t1/run.sh MINUTES   (NICE=n sets the priority, default 19)
set -e
MIN=${1:-60}
RUN=checkpoints/disyre-t1
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:-UADExtension}
PY=${PYTHON:-python}
if [ -n "$RESUME" ]; then
  ARGS="--method disyre -o $RUN --resume --time-limit $MIN --no-progress"
else
  ARGS="--method disyre --contrast T1 -o $RUN --init disyre-t1-phantom --ema-decay 0.999 --batch-size 16 --lr 1e-4 \
--seed 300000 --steps 100000 --curve-every 500 --curve-method disyre --curve-preset paper --curve-slices 24 \
--time-limit $MIN --no-progress"
fi
exec nice -n ${NICE:-19} $PY -c "import sys, torch; torch.set_num_threads(1); from uad.cli import main; sys.exit(main(sys.argv[1:]))" train $ARGS
