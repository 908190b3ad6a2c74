#!/bin/sh
# The bundled FLAIR DISYRE (checkpoints/disyre-flair-96, 96 x 96 pixels) trained on with the intensity-bias
# corruption clipped to the slices' own range [0, clip_max = 2] instead of [0, 1] (uad.corruption.corrupt's
# ``upper``): before, every bright pixel inside a synthetic anomaly was cut to 1 and no anomaly was brighter than 1,
# so the network learnt that values above 1 are never anomalous and kept part of bright FLAIR lesions in its
# restoration (issue 8's FLAIR head seed 201). Fresh FLAIR phantoms (seeds 940000, ...), half acquired with 3-6 mm
# slices and, independently, half skull-stripped with a perturbed brain mask; EMA 0.999 (checkpoints/continue_disyre.sh).
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-flair-bright/run.sh MINUTES
RUN=checkpoints/disyre-flair-bright CONTRAST=FLAIR INIT=checkpoints/disyre-flair-96 SEED=940000 THICK=0.5 STRIP=0.5 \
SIZE=96 THREADS=${THREADS:-2} exec sh checkpoints/continue_disyre.sh "$@"
