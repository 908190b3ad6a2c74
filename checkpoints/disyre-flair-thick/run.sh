#!/bin/sh
# The bundled disyre-flair-phantom (step 5,319 of checkpoints/disyre-flair) continued with thick-slice augmentation:
# half of the fresh FLAIR phantoms (seeds 900000, ...) acquired with 3-6 mm axial / coronal / sagittal slices and
# resampled back (uad.phantoms.thick_slice_profile), EMA 0.999 (see checkpoints/continue_disyre.sh).
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-flair-thick/run.sh MINUTES
RUN=checkpoints/disyre-flair-thick CONTRAST=FLAIR INIT=disyre-flair-phantom SEED=900000 THICK=0.5 exec sh checkpoints/continue_disyre.sh "$@"
