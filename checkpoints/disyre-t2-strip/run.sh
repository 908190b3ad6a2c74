#!/bin/sh
# The bundled disyre-t2-phantom (step 5,723 of checkpoints/disyre-t2-thick) continued with skull-stripping-error
# augmentation: half of the fresh T2 phantoms (seeds 810000, ...) built with a head and stripped with a brain mask
# whose boundary a smooth random field moves out and in by up to 2-6 mm (uad.phantoms.perturbed_brain_mask),
# and, independently, half acquired with 3-6 mm slices as before; EMA 0.999 (see checkpoints/continue_disyre.sh).
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-t2-strip/run.sh MINUTES
RUN=checkpoints/disyre-t2-strip CONTRAST=T2 INIT=disyre-t2-phantom SEED=810000 THICK=0.5 STRIP=0.5 exec sh checkpoints/continue_disyre.sh "$@"
