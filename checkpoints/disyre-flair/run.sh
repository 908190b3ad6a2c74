#!/bin/sh
# The run of this folder: the bundled disyre-flair-phantom (a fine-tune of disyre-t2-phantom: 1,500 T2 + 1,009
# FLAIR steps, batch 16) continued on fresh FLAIR phantom seeds (600000, ...) with EMA 0.999
# (see checkpoints/continue_disyre.sh). A fresh start needs the weights it started from:
# git show 941b1ad:models/disyre-flair-phantom/model.safetensors
# Usage (from the repository root):  RESUME=1 sh checkpoints/disyre-flair/run.sh MINUTES
RUN=checkpoints/disyre-flair CONTRAST=FLAIR INIT=disyre-flair-phantom SEED=600000 exec sh checkpoints/continue_disyre.sh "$@"
