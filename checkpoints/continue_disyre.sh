#!/bin/sh
# Continues a bundled DISYRE model on fresh phantom seeds with EMA 0.999, batch 16, lr 1e-4, a learning curve
# every 500 steps (DISYRE paper-preset AP on 24 slices: the bundled T2 sample for T2, a tumour phantom of
# the contrast otherwise). One CPU thread, lowest priority. Called by checkpoints/disyre-<contrast>/run.sh,
# which sets RUN (the run folder), CONTRAST, INIT (the bundled model it starts from) and SEED
# (and THICK: the fraction of phantoms acquired with thick slices, --thick-slices; STRIP: the fraction skull-stripped
# with a perturbed brain mask, --strip-errors; both default 0; SIZE: train at this image size, --image-size,
# default the init model's; THREADS: torch threads, default 1).
#   sh checkpoints/disyre-t2/run.sh MINUTES            a new run (the folder must hold no checkpoint)
#   RESUME=1 sh checkpoints/disyre-t2/run.sh MINUTES   continue it   (NICE=n sets the priority, default 19)
set -e
MIN=${1:-60}
: "${RUN:?}" "${CONTRAST:?}" "${INIT:?}" "${SEED:?}"
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1} PYTHONPATH=${PYTHONPATH:-UADExtension}
PY=${PYTHON:-python}
if [ -n "$RESUME" ]; then
  ARGS="--method disyre -o $RUN --resume --time-limit $MIN --no-progress"
else
  ARGS="--method disyre --contrast $CONTRAST -o $RUN --init $INIT --ema-decay 0.999 --batch-size 16 --lr 1e-4 \
--seed $SEED --steps 100000 --curve-every 500 --curve-method disyre --curve-preset paper --curve-slices 24 \
--time-limit $MIN --no-progress --thick-slices ${THICK:-0} --strip-errors ${STRIP:-0}${SIZE:+ --image-size $SIZE}"
fi
exec nice -n ${NICE:-19} $PY -c "import sys, torch; torch.set_num_threads(${THREADS:-1}); from uad.cli import main; sys.exit(main(sys.argv[1:]))" train $ARGS
