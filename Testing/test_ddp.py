"""Data-parallel training: ``torchrun --nproc_per_node=2 -m uad.cli train`` on CPU (Gloo), data shards.

The run uses a folder of 3 small phantoms written with
``uad.phantoms.generate_cohort(spacing=3.0)`` (``training.VolumeFolderSource``:
1 held out for validation, 1 training volume per process).  With
``$UAD_DDP_DEBUG_DIR`` set every process reports the digest of its weights and
of its first batch: the weights must be identical on both processes and equal
to the checkpoint, the batches must differ.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DIST_VARS, subprocess_env
from uad import UADError
from uad.networks import tiny_unet_config
from uad.training import (RANK_SEED_STRIDE, TrainConfig, VolumeFolderSource, distributed_env, make_source,
                          state_digest)
from uad.zoo import load_weights


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from uad.phantoms import generate_cohort

    folder = tmp_path_factory.mktemp("healthy")
    generate_cohort(folder, 3, contrast="T2", lesion="none", seed=40, spacing=3.0)
    return folder


def _config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.json"
    p.write_text(json.dumps({"image_size": 32, "batch_size": 3, "val_every": 2, "val_batches": 1,
                             "checkpoint_every": 2, "lr": 1e-3,
                             "model_overrides": {"networks": {"denoiser": tiny_unet_config((8, 16, 16))}}}))
    return p


def test_torchrun_two_processes_on_cpu(cohort, tmp_path, monkeypatch):
    run, debug = tmp_path / "run", tmp_path / "debug"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "uad.cli",
           "train", "--method", "anoddpm", "--data", str(cohort), "-o", str(run), "--config",
           str(_config(tmp_path)), "--steps", "2", "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                       env=subprocess_env(tmp_path, UAD_DDP_DEBUG_DIR=str(debug)))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # only rank 0 talks and writes
    assert p.stdout.count("run directory:") == 1
    assert "data-parallel training on 2 processes (cpu); batch 3 per process, 6 per step" in p.stdout
    assert sorted(x.name for x in run.iterdir()) == ["best.safetensors", "config.json", "log.csv", "model.json",
                                                     "model.safetensors", "state.json", "train_state.safetensors"]
    with open(run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2] and np.isfinite(float(rows[1]["val_loss"]))
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 2 and state["world_size"] == 2
    entry = json.loads((run / "model.json").read_text())
    assert entry["training"]["world_size"] == 2 and entry["training"]["batch_size"] == 3

    # both processes hold the same weights, equal to the checkpoint (unwrapped names, no "module.")
    r0, r1 = (json.loads((debug / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world_size"], r0["step"], r1["step"]) == (0, 1, 2, 2, 2)
    saved = load_weights(run / "model.safetensors")
    assert all(k.startswith("denoiser.") and ".module." not in k for k in saved)
    assert r0["weights_sha256"] == r1["weights_sha256"] == state_digest(saved)
    # ... but were fed disjoint data: one training volume each (the first of 3 is held out)
    assert r0["first_batch_sha256"] != r1["first_batch_sha256"]
    assert r0["data"].endswith("(volumes 0::2)") and r1["data"].endswith("(volumes 1::2)")

    # the checkpoint resumes in a single process (world size 1, this one), continuing the step count
    from uad.cli import main

    for k, v in subprocess_env(tmp_path).items():
        if k.startswith("UAD_"):
            monkeypatch.setenv(k, v)
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    assert main(["train", "--method", "anoddpm", "-o", str(run), "--resume", "--steps", "3", "--no-progress",
                 "--device", "cpu"]) == 0
    with open(run / "log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
    assert json.loads((run / "state.json").read_text())["world_size"] == 1


def test_folder_shards_are_disjoint(cohort):
    full = VolumeFolderSource(cohort, 32)
    assert [f.name for f in full.files] == ["phantom_T2_none_000041.nii.gz", "phantom_T2_none_000042.nii.gz"]
    hold = VolumeFolderSource(cohort, 32, holdout=True, rank=1, world_size=2)  # validation is never sharded
    assert [f.name for f in hold.files] == ["phantom_T2_none_000040.nii.gz"]
    # as many processes as volumes: one volume each
    by_volume = [VolumeFolderSource(cohort, 32, rank=r, world_size=2) for r in range(2)]
    assert [s.files for s in by_volume] == [[full.files[0]], [full.files[1]]]
    assert len(by_volume[0].slices) + len(by_volume[1].slices) == len(full.slices)
    # more processes than volumes: every slice goes to exactly one process
    by_slice = [VolumeFolderSource(cohort, 32, rank=r, world_size=3) for r in range(3)]
    assert all(s.shard == f"slices {r}::3" for r, s in enumerate(by_slice))
    assert sum(len(s.slices) for s in by_slice) == len(full.slices)
    for r, s in enumerate(by_slice):
        np.testing.assert_array_equal(s.slices, full.slices[r::3])
    # different processes draw different batches with their own generators
    x0 = by_slice[0].sample_batch(4, np.random.default_rng([0, 0]))[0]
    x1 = by_slice[1].sample_batch(4, np.random.default_rng([0, 0, 1]))[0]
    assert x0.shape == x1.shape == (4, 1, 32, 32) and not np.array_equal(x0.numpy(), x1.numpy())


def test_phantom_streams_are_disjoint_per_process():
    cfg = TrainConfig.from_dict({"image_size": 32, "seed": 5})
    sources = [make_source(cfg, rank=r, world_size=4) for r in range(4)]
    single = make_source(cfg)
    hold = make_source(cfg, holdout=True, rank=2, world_size=4)
    n = 200  # phantoms per process checked (a stream is disjoint for RANK_SEED_STRIDE of them)
    seeds = [{s.phantom_spec(k)[0] for k in range(n)} for s in sources]
    assert seeds[0] == {single.phantom_spec(k)[0] for k in range(n)}  # rank 0 = a single-process run
    assert sum(len(s) for s in seeds) == len(set().union(*seeds)) == 4 * n
    assert min(seeds[1]) == 5 + RANK_SEED_STRIDE
    assert not set().union(*seeds) & {hold.phantom_spec(k)[0] for k in range(n)}
    for s in sources + [single, hold]:
        s.close()


def test_distributed_env():
    assert distributed_env({}) == distributed_env({"WORLD_SIZE": "1"})
    assert not distributed_env({}).enabled and distributed_env({}).is_main
    c = distributed_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (c.rank, c.local_rank, c.world_size, c.enabled, c.is_main) == (3, 1, 4, True, False)
    with pytest.raises(UADError, match="inconsistent"):
        distributed_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(UADError, match="must be an integer"):
        distributed_env({"WORLD_SIZE": "two"})
