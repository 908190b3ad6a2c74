#!/bin/sh
# The T2 DISYRE at 96 x 96 pixels (about 2 mm per pixel instead of 2.9 mm at 64): the weights of
# checkpoints/disyre-t2-strip (the bundled 64-pixel disyre-t2-phantom) trained on at the new size, on fresh T2
# phantoms (seeds 820000, ...), half acquired with 3-6 mm slices and, independently, half skull-stripped with a
# perturbed brain mask; EMA 0.999 (see checkpoints/continue_disyre.sh). Why: at 96 pixels the FLAIR model's held-out
# MS-like AP rose from 0.79 to 0.92 (checkpoints/disyre-flair-96); the T2 model's MS AP is 0.25.
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-t2-96/run.sh MINUTES   (THREADS=2 for two)
RUN=checkpoints/disyre-t2-96 CONTRAST=T2 INIT=checkpoints/disyre-t2-strip SEED=820000 THICK=0.5 STRIP=0.5 \
SIZE=96 THREADS=${THREADS:-1} exec sh checkpoints/continue_disyre.sh "$@"
