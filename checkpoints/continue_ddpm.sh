#!/bin/sh
# Trains the DDPM shared by THOR, AnoDDPM and AutoDDPM on from a bundled model (or run folder) on fresh phantom
# seeds: EMA 0.999, training timesteps t < 400 (THOR 350, AnoDDPM 250, AutoDDPM 331 / 103), batch 32, lr 1e-4,
# a learning curve every 500 steps (THOR-fast and AnoDDPM-fast AP on 24 slices: the bundled T2 sample for T2, a
# tumour phantom of the contrast otherwise). Called by checkpoints/ddpm-<...>/run.sh, which sets RUN (the run
# folder), CONTRAST, INIT (the model it starts from) and SEED (THREADS: torch threads, default 1; NICE: priority,
# default 19; PYTHON: the interpreter; EXTRA: more 'uad train' options for a new run, e.g. --config FILE).
#   sh checkpoints/ddpm-t1-ft/run.sh MINUTES            a new run (the folder must hold no checkpoint)
#   RESUME=1 sh checkpoints/ddpm-t1-ft/run.sh MINUTES   continue it
: "${RUN:?}" "${CONTRAST:?}" "${INIT:?}" "${SEED:?}"
METHOD=anoddpm FRESH="--contrast $CONTRAST --init $INIT --ema-decay 0.999 --t-max 400 --batch-size 32 --lr 1e-4 \
--seed $SEED --steps 100000 --curve-every 500 --curve-method thor --curve-method anoddpm --curve-slices 24 ${EXTRA:-}" \
exec sh checkpoints/train_or_resume.sh "$@"
