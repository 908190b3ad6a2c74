#!/bin/sh
# The run of this folder: the T2 pDDPM trained on from the bundled pddpm-t2-phantom (1,500 steps, trained with
# unit-std simplex noise at a fixed 64-px frequency) with the reference simplex amplitude and frequency
# (uad.noise.REFERENCE_OPTIONS, as the FLAIR and T1 pDDPM fine-tunes), batch 16, lr 1e-4 as before, fresh
# phantom seeds (130000, ...), a learning curve every 250 steps (pDDPM-fast AP on 24 slices of the bundled T2
# sample). THREADS torch threads (default 1), NICE priority (default 19), PYTHON the interpreter.
# Usage (from the repository root):  sh checkpoints/pddpm-t2-ref/run.sh MINUTES
#   continue: RESUME=1 sh checkpoints/pddpm-t2-ref/run.sh MINUTES
RUN=checkpoints/pddpm-t2-ref METHOD=pddpm FRESH="--contrast T2 --init pddpm-t2-phantom --batch-size 16 --lr 1e-4 \
--seed 130000 --steps 100000 --curve-every 250 --curve-method pddpm --curve-slices 24" \
exec sh checkpoints/train_or_resume.sh "$@"
