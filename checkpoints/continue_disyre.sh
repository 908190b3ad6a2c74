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
: "${RUN:?}" "${CONTRAST:?}" "${INIT:?}" "${SEED:?}"
METHOD=disyre FRESH="--contrast $CONTRAST --init $INIT --ema-decay 0.999 --batch-size 16 --lr 1e-4 --seed $SEED \
--steps 100000 --curve-every 500 --curve-method disyre --curve-preset paper --curve-slices 24 \
--thick-slices ${THICK:-0} --strip-errors ${STRIP:-0}${SIZE:+ --image-size $SIZE}" exec sh checkpoints/train_or_resume.sh "$@"
