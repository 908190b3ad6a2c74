#!/bin/sh
# The run of this folder: the bundled wolleb-t2-paired (class-conditional denoiser + noise-aware classifier, 2,300
# steps, the last 800 with healthy twins; its learning-curve AP still rising steeply) trained on with healthy twins
# (half of the phantoms carry a lesion, each with its lesion-free twin; uad.training.default_config for a method
# that needs labels), EMA 0.999, batch 16, lr 1e-4 as before, fresh phantom seeds (310000, ...), a learning curve
# every 250 steps (Wolleb-fast AP on 24 slices of the bundled T2 sample). THREADS torch threads (default 1), NICE
# priority (default 19), PYTHON the interpreter.
# Usage (from the repository root):  sh checkpoints/wolleb-t2-twins/run.sh MINUTES
#   continue: RESUME=1 sh checkpoints/wolleb-t2-twins/run.sh MINUTES
RUN=checkpoints/wolleb-t2-twins METHOD=wolleb FRESH="--contrast T2 --init wolleb-t2-paired --batch-size 16 --lr 1e-4 \
--seed 310000 --steps 100000 --ema-decay 0.999 --curve-every 250 --curve-method wolleb --curve-slices 24" \
exec sh checkpoints/train_or_resume.sh "$@"
