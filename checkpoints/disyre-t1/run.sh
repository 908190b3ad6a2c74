#!/bin/sh
# The run of this folder: the bundled disyre-t1-phantom (1,000 steps, batch 16, seed 0) continued on fresh
# T1 phantom seeds (300000, ...) with EMA 0.999 (see checkpoints/continue_disyre.sh).
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-t1/run.sh MINUTES
RUN=checkpoints/disyre-t1 CONTRAST=T1 INIT=disyre-t1-phantom SEED=300000 exec sh checkpoints/continue_disyre.sh "$@"
