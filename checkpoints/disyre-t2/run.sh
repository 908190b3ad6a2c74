#!/bin/sh
# The run of this folder: the bundled disyre-t2-phantom (1,500 steps, batch 16, seed 0) continued on fresh
# T2 phantom seeds (400000, ...) with EMA 0.999 (see checkpoints/continue_disyre.sh). A fresh start needs
# the weights it started from: git show 5f85087:models/disyre-t2-phantom/model.safetensors
# The bundled disyre-t2-phantom is this run's step-5,377 export; the checkpoint here is step 10,426, measured
# and not adopted (README, 'The T2 model trained further'); a continuation resumes from step 10,426.
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-t2/run.sh MINUTES
RUN=checkpoints/disyre-t2 CONTRAST=T2 INIT=disyre-t2-phantom SEED=400000 exec sh checkpoints/continue_disyre.sh "$@"
