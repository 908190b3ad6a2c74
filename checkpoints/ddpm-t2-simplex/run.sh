#!/bin/sh
# The run of this folder: the T2 DDPM (THOR / AnoDDPM) with simplex noise, fine-tuned from the Gaussian ddpm-t2-ema
# (its bundled step-5,793 EMA weights, sha256 7d7d336b...): the same UNet learns to predict simplex noise fields
# (reference amplitude and frequency, uad.noise.REFERENCE_OPTIONS) instead of white noise. Why: at THOR's Gaussian
# level (L = 350) a large bright T2 stroke survives the noise and the restoration keeps it (held-out T2 stroke AP
# 0.072 against an intensity floor of 0.180); low-frequency simplex noise is what AnoDDPM introduced for large
# lesions, and THOR's released configs have a simplex model (L = 250, H = [200, 150, 100, 50]).
# Settings (checkpoints/continue_ddpm.sh): EMA 0.999, t < 400, batch 32, lr 1e-4, fresh phantom seeds (140000, ...),
# half of the phantoms acquired with 3-6 mm slices (--thick-slices 0.5, as the held-out scans are), AutoDDPM
# dropped from the entry's methods (its paper uses Gaussian noise); learning curve every 500 steps (THOR-fast and
# AnoDDPM-fast AP on 24 slices of the bundled T2 sample). THREADS torch threads (default 1), NICE priority (default 19).
# Usage (from the repository root):  sh checkpoints/ddpm-t2-simplex/run.sh MINUTES
#   continue: RESUME=1 sh checkpoints/ddpm-t2-simplex/run.sh MINUTES
RUN=checkpoints/ddpm-t2-simplex CONTRAST=T2 INIT=ddpm-t2-ema SEED=140000 \
EXTRA="--config checkpoints/ddpm-t2-simplex/train_options.json --thick-slices 0.5" exec sh checkpoints/continue_ddpm.sh "$@"
