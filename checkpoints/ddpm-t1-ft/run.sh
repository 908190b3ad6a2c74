#!/bin/sh
# The run of this folder: the T1 DDPM (shared by THOR, AnoDDPM and AutoDDPM) fine-tuned on T1 phantoms from the
# T2 DDPM ddpm-t2-ema (its bundled step-5,793 EMA weights, sha256 7d7d336b...): the anatomy is the same, only the
# contrast differs, so the T2 network's 5,793 steps are a better start than the 1,000-step T1 ddpm-t1-phantom.
# Settings (checkpoints/continue_ddpm.sh) as the T2 run: EMA 0.999, training timesteps t < 400 (THOR 350, AnoDDPM 250, AutoDDPM 331/103), batch 32,
# lr 1e-4, fresh phantom seeds (110000, ...), learning curve every 500 steps (THOR-fast and AnoDDPM-fast AP on 24
# slices of a T1 tumour phantom, seed 5000000). THREADS torch threads (default 1), NICE priority (default 19).
# Usage (from the repository root):  sh checkpoints/ddpm-t1-ft/run.sh MINUTES
#   continue: RESUME=1 sh checkpoints/ddpm-t1-ft/run.sh MINUTES
RUN=checkpoints/ddpm-t1-ft CONTRAST=T1 INIT=ddpm-t2-ema SEED=110000 exec sh checkpoints/continue_ddpm.sh "$@"
