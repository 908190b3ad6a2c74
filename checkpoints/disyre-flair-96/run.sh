#!/bin/sh
# The FLAIR DISYRE at 96 x 96 pixels (about 2 mm per pixel instead of 2.9 mm at 64): the weights of
# checkpoints/disyre-flair-strip (64 px) trained on at the new size, on fresh FLAIR phantoms (seeds 920000, ...),
# half acquired with 3-6 mm slices and, independently, half skull-stripped with a perturbed brain mask; EMA 0.999,
# two threads (see checkpoints/continue_disyre.sh). Started to test whether the 64-pixel map's soft lesion edge kept
# FLAIR head seed 201's bright tumour below its intensity floor (issue 8): it did not (seed 201 unchanged), but the
# held-out MS-like AP rose 0.79 -> 0.92 and the model was bundled (README, "The FLAIR DISYRE at 96 pixels").
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-flair-96/run.sh MINUTES
RUN=checkpoints/disyre-flair-96 CONTRAST=FLAIR INIT=checkpoints/disyre-flair-strip SEED=920000 THICK=0.5 STRIP=0.5 \
SIZE=96 THREADS=${THREADS:-2} exec sh checkpoints/continue_disyre.sh "$@"
