#!/bin/sh
# The run of this folder: continued the formerly bundled T2 DDPM ddpm-t2-phantom (2,250 steps, sha256 5314fd32...;
# since replaced in models/ by this run's step-2719 EMA weights, ddpm-t2-ema) with EMA 0.999,
# training timesteps t < 400 (covers THOR 350, AnoDDPM 250, AutoDDPM 200/50), batch 32, lr 1e-4,
# on fresh phantom seeds (100000, ...), learning curve every 500 steps (THOR-fast and
# AnoDDPM-fast AP on 24 slices of the bundled sample). One CPU thread, lowest priority (THREADS, NICE to change).
# Steps 2,719 -> 5,793 (38 min, two threads, 0.8 s a step): the step-5,793 EMA weights are the bundled ddpm-t2-ema
# since stop 27. Steps 5,793 -> 10,418 (stop 27, 55 min, two threads): validation loss 0.0570 -> 0.0550 at 10,000,
# then a jump to 0.0586 at 10,250 (0.0585 at 10,418); not measured, not bundled: continue, then measure before bundling.
# Usage (from the repository root):  sh checkpoints/ddpm-t2-ema/run.sh MINUTES
#   continue: RESUME=1 sh checkpoints/ddpm-t2-ema/run.sh MINUTES   (NICE=n sets the priority, default 19; THREADS=n torch threads, default 1)
#   (a fresh start needs the old ddpm-t2-phantom weights, no longer bundled: git show 7835cb9:models/ddpm-t2-phantom/model.safetensors)
RUN=checkpoints/ddpm-t2-ema CONTRAST=T2 INIT=ddpm-t2-phantom SEED=100000 exec sh checkpoints/continue_ddpm.sh "$@"
