#!/bin/sh
# The run of this folder: the T1 DDPM (THOR / AnoDDPM / AutoDDPM) with simplex noise, fine-tuned from the T2 simplex
# DDPM ddpm-t2-simplex (its bundled step-8,270 EMA weights): the network already predicts simplex noise fields
# (reference amplitude and frequency, uad.noise.REFERENCE_OPTIONS) and here learns T1 contrast (the Gaussian
# ddpm-t1-phantom, fine-tuned from the Gaussian T2 DDPM, adapted to T1 within about 1,000 steps). Why: with white
# noise the DDPM family stays below the intensity floor on held-out T1 stroke (AP 0.025-0.028 against 0.039), as it
# did on T2 stroke before the simplex fine-tune (0.069 -> 0.311 for AnoDDPM).
# Settings (checkpoints/continue_ddpm.sh): EMA 0.999, t < 400, batch 32, lr 1e-4, fresh phantom seeds (160000, ...),
# half of the phantoms acquired with 3-6 mm slices (--thick-slices 0.5, as the held-out scans are); learning curve
# every 500 steps (THOR-fast and AnoDDPM-fast AP on 24 slices of a T1 tumour phantom). THREADS torch threads
# (default 1), NICE priority (default 19).
# Usage (from the repository root):  sh checkpoints/ddpm-t1-simplex/run.sh MINUTES
#   continue: RESUME=1 sh checkpoints/ddpm-t1-simplex/run.sh MINUTES
RUN=checkpoints/ddpm-t1-simplex CONTRAST=T1 INIT=ddpm-t2-simplex SEED=160000 \
EXTRA="--config checkpoints/ddpm-t1-simplex/train_options.json --thick-slices 0.5" exec sh checkpoints/continue_ddpm.sh "$@"
