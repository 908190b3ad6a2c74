#!/bin/sh
# Shared by checkpoints/continue_disyre.sh and checkpoints/continue_ddpm.sh: runs 'uad train' for METHOD in the run
# folder RUN for MINUTES ($1, default 60): a new run with the options FRESH (beyond -o, --time-limit and
# --no-progress), or with RESUME=1 the run's saved settings. THREADS: torch threads (default 1); NICE: priority
# (default 19); PYTHON: the interpreter.
set -e
MIN=${1:-60}
: "${RUN:?}" "${METHOD:?}" "${FRESH:?}"
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1} PYTHONPATH=${PYTHONPATH:-UADExtension}
PY=${PYTHON:-python}
if [ -n "$RESUME" ]; then
  ARGS="--method $METHOD -o $RUN --resume --time-limit $MIN --no-progress"
else
  ARGS="--method $METHOD -o $RUN $FRESH --time-limit $MIN --no-progress"
fi
exec nice -n ${NICE:-19} $PY -c "import sys, torch; torch.set_num_threads(${THREADS:-1}); from uad.cli import main; sys.exit(main(sys.argv[1:]))" train $ARGS
