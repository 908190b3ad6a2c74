#!/bin/sh
# The bundled disyre-flair-phantom (step 3,204 of checkpoints/disyre-flair-thick) continued with skull-stripping-error
# augmentation: half of the fresh FLAIR phantoms (seeds 910000, ...) built with a head and stripped with a brain mask
# whose boundary a smooth random field moves out and in by up to 2-6 mm (uad.phantoms.perturbed_brain_mask), and,
# independently, half acquired with 3-6 mm slices as before; EMA 0.999 (see checkpoints/continue_disyre.sh).
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-flair-strip/run.sh MINUTES
RUN=checkpoints/disyre-flair-strip CONTRAST=FLAIR INIT=disyre-flair-phantom SEED=910000 THICK=0.5 STRIP=0.5 exec sh checkpoints/continue_disyre.sh "$@"
