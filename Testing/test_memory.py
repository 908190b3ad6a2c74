"""Issue 8, point 7, last bullet: peak memory of detect() under 12 bytes per input voxel beyond the input.

``benchmarks/bench_memory.measure`` runs ``detect`` once on a synthetic skull-stripped float32 volume
(after a warm-up run, with glibc told to map large allocations on their own and to give free pages
back, so that the resident set follows the live arrays) and reports

* the resident-set peak during ``detect`` minus the resident set before it: everything (numpy,
  SimpleITK's buffers, torch), the four results included (float32 restoration and anomaly, uint8
  mask and brain mask: 10 bytes a voxel);
* tracemalloc's peak: numpy's working memory alone (SimpleITK's buffers, hence the results, are not
  traced).

The method call is replaced by a stand-in (``--no-network``): the network's memory does not grow
with the volume; what is bounded is the preprocessing chain and the way back.  The chain before this
change peaked at 26 B/voxel resident (23 B/voxel of numpy temporaries) on the same volume.  It runs
in a fresh process: a long-lived one (the test session) has allocator arenas and threads whose
state shifts the resident set by a fixed ~15 MB either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOUND = 12.0  # bytes per input voxel, beyond the input itself, results included


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident-set peak read from /proc (Linux)")
def test_peak_memory_per_voxel_bound():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "UADExtension"))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--shape", "64", "256", "256",
                          "--no-network"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["skull_stripped"]["value"] is True  # the default chain (no N4, no skull stripper)
    assert r["steps"] == ["reorient", "brain_mask", "normalise", "select_slices", "in_plane"]
    assert r["results_bytes_per_voxel"] == 10.0  # float32 restoration + anomaly, uint8 mask + brain mask
    assert r["rss_peak_source"].startswith("VmHWM reset"), r
    assert r["rss_peak_minus_base_bytes_per_voxel"] < BOUND, r
    # numpy's working memory: a brain-mask volume and its uint16 labels at the most (the old chain: 23)
    assert r["tracemalloc_peak_bytes_per_voxel"] < 4.0, r
