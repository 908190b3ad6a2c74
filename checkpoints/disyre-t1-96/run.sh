#!/bin/sh
# The T1 DISYRE at 96 x 96 pixels (about 2 mm per pixel instead of 2.9 mm at 64): the weights of
# checkpoints/disyre-t1-strip (the bundled 64-pixel disyre-t1-phantom) trained on at the new size, on fresh T1
# phantoms (seeds 720000, ...), half acquired with 3-6 mm slices and, independently, half skull-stripped with a
# perturbed brain mask; EMA 0.999 (see checkpoints/continue_disyre.sh). Why: at 96 pixels the held-out MS-like AP
# rose from 0.79 to 0.92 (FLAIR, checkpoints/disyre-flair-96) and from 0.25 to 0.40 (T2, checkpoints/disyre-t2-96);
# the T1 model's is 0.155.
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-t1-96/run.sh MINUTES   (THREADS=2 for two)
RUN=checkpoints/disyre-t1-96 CONTRAST=T1 INIT=checkpoints/disyre-t1-strip SEED=720000 THICK=0.5 STRIP=0.5 \
SIZE=96 THREADS=${THREADS:-1} exec sh checkpoints/continue_disyre.sh "$@"
