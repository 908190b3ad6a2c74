"""A killed ``uad benchmark`` takes its worker processes with it (found in stop 34: after the parent was killed,
its spawned workers kept computing their units for up to an hour and held both cores)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PARENT = textwrap.dedent("""
    import concurrent.futures as cf, multiprocessing as mp, os, sys, time
    sys.path.insert(0, {engine!r})
    from uad.benchmark import _worker_init

    def work(_):
        return os.getpid()

    def sleep_long(_):
        time.sleep(120)

    if __name__ == "__main__":
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"),
                                    initializer=_worker_init) as pool:
            print(pool.submit(work, 0).result(), flush=True)  # the worker's pid
            pool.submit(sleep_long, 0).result()
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_workers_exit_when_the_benchmark_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(engine=str(ROOT / "UADExtension")))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        worker = int(proc.stdout.readline())
        assert _alive(worker)
        time.sleep(0.5)  # the worker is in sleep_long now
        proc.send_signal(signal.SIGKILL)  # no handler in the parent can run: the worker must notice by itself
        proc.wait(timeout=10)
        deadline = time.time() + 15
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker outlived its killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
