#!/bin/sh
# The run of this folder: the FLAIR DDPM (shared by THOR, AnoDDPM and AutoDDPM) trained on from the bundled
# ddpm-flair-phantom (a 991-step FLAIR fine-tune of the T2 EMA DDPM at its step 2,000; its run folder was not kept),
# whose learning curve was still rising when it was bundled. Settings as the T2 and T1 runs: EMA 0.999, training
# timesteps t < 400 (THOR 350, AnoDDPM 250, AutoDDPM 331/103), batch 32, lr 1e-4, fresh phantom seeds (120000, ...),
# learning curve every 500 steps (THOR-fast and AnoDDPM-fast AP on 24 slices of a FLAIR tumour phantom, seed 5000000).
# THREADS torch threads (default 1), NICE priority (default 19).
# Usage (from the repository root):  sh checkpoints/ddpm-flair-ft/run.sh MINUTES
#   continue: RESUME=1 sh checkpoints/ddpm-flair-ft/run.sh MINUTES
# Bundling (after measuring): python scripts/train_bundled.py --finalize-only --run-dir checkpoints/ddpm-flair-ft
#   --weights best ..., or as checkpoints/ddpm-t1-ft was bundled (its card).
RUN=checkpoints/ddpm-flair-ft CONTRAST=FLAIR INIT=ddpm-flair-phantom SEED=120000 exec sh checkpoints/continue_ddpm.sh "$@"
