#!/bin/sh
# The run of this folder: the FLAIR DDPM (THOR / AnoDDPM / AutoDDPM) with simplex noise, fine-tuned from the Gaussian
# ddpm-flair-phantom, as checkpoints/ddpm-t2-simplex did for T2 (which lifted held-out T2 stroke AP of AnoDDPM /
# AutoDDPM from 0.069 / 0.023 to 0.311 / 0.234): the same UNet learns to predict simplex noise fields (reference
# amplitude and frequency, uad.noise.REFERENCE_OPTIONS) instead of white noise. Why: the Gaussian FLAIR model beats
# the intensity floor on held-out FLAIR stroke only narrowly (THOR / AnoDDPM / AutoDDPM 0.045 / 0.054 / 0.046
# against 0.034); low-frequency simplex noise is AnoDDPM's answer to large lesions.
# Settings (checkpoints/continue_ddpm.sh): EMA 0.999, t < 400, batch 32, lr 1e-4, fresh phantom seeds (150000, ...),
# half of the phantoms acquired with 3-6 mm slices (--thick-slices 0.5); learning curve every 500 steps (THOR-fast
# and AnoDDPM-fast AP on 24 slices of a FLAIR tumour phantom). THREADS torch threads (default 1), NICE priority
# (default 19).
# Usage (from the repository root):  sh checkpoints/ddpm-flair-simplex/run.sh MINUTES
#   continue: RESUME=1 sh checkpoints/ddpm-flair-simplex/run.sh MINUTES
RUN=checkpoints/ddpm-flair-simplex CONTRAST=FLAIR INIT=ddpm-flair-phantom SEED=150000 \
EXTRA="--config checkpoints/ddpm-flair-simplex/train_options.json --thick-slices 0.5" exec sh checkpoints/continue_ddpm.sh "$@"
