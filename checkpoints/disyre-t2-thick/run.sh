#!/bin/sh
# The bundled disyre-t2-phantom (the step-5,377 export) continued with thick-slice augmentation:
# half of the fresh T2 phantoms (seeds 800000, ...) acquired with 3-6 mm axial / coronal / sagittal slices and
# resampled back (uad.phantoms.thick_slice_profile), EMA 0.999 (see checkpoints/continue_disyre.sh).
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-t2-thick/run.sh MINUTES
RUN=checkpoints/disyre-t2-thick CONTRAST=T2 INIT=disyre-t2-phantom SEED=800000 THICK=0.5 exec sh checkpoints/continue_disyre.sh "$@"
