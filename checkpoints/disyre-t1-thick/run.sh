#!/bin/sh
# The bundled disyre-t1-phantom (step 12,347 of checkpoints/disyre-t1) continued with thick-slice augmentation:
# half of the fresh T1 phantoms (seeds 700000, ...) acquired with 3-6 mm axial / coronal / sagittal slices and
# resampled back (uad.phantoms.thick_slice_profile), EMA 0.999 (see checkpoints/continue_disyre.sh).
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-t1-thick/run.sh MINUTES
RUN=checkpoints/disyre-t1-thick CONTRAST=T1 INIT=disyre-t1-phantom SEED=700000 THICK=0.5 exec sh checkpoints/continue_disyre.sh "$@"
