#!/bin/sh
# The T1 DISYRE of checkpoints/disyre-t1-thick (step 9,248 there) continued with skull-stripping-error augmentation:
# half of the fresh T1 phantoms (seeds 710000, ...) built with a head and stripped with a brain mask whose boundary
# a smooth random field moves out and in by up to 2-6 mm (uad.phantoms.perturbed_brain_mask), and, independently,
# half acquired with 3-6 mm slices as before; EMA 0.999 (see checkpoints/continue_disyre.sh).
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-t1-strip/run.sh MINUTES
RUN=checkpoints/disyre-t1-strip CONTRAST=T1 INIT=checkpoints/disyre-t1-thick SEED=710000 THICK=0.5 STRIP=0.5 exec sh checkpoints/continue_disyre.sh "$@"
