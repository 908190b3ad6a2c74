"""Background runs: the engine's ``uad detect`` in a separate process, polled from the GUI.

Why a process (as MONAIAuto3DSeg, TotalSegmentator and nnU-Net do): Slicer stays
responsive, Cancel can stop the work at once (the whole process tree is killed), a crash
of torch or of a GPU driver cannot take Slicer down, and GPU memory returns to the system
when the process ends.

``BackgroundRun`` writes the input (and brain mask) to a private temporary folder, starts
``<python> -m uad.cli detect ... --progress-format json`` (``PythonSlicer`` inside Slicer),
reads its JSON event lines (start / progress / warning / result), and, when it succeeds,
reads the three output images back and builds the nodes with the same
``UADExtensionLogic.buildOutputs`` an in-process ``process()`` uses, so the nodes are the
same.  Nothing touches the scene before that: a cancelled or failed run leaves the scene
as it was, and the temporary folder is removed in every case.

The GUI calls ``poll()`` from a ``qt.QTimer``; the console can call ``wait()``::

    run = BackgroundRun(logic, volumeNode, method="disyre")
    run.start()
    result = run.wait()          # or: while run.poll(): ...; run.result

No Qt; standard library only (``subprocess`` and threads).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .devices import classify_failure, default_thread_count
from .progress import ProgressTracker

# Run states
IDLE, RUNNING, DONE, FAILED, CANCELLED = "idle", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
STDERR_TAIL_LINES = 200


def python_executable() -> str:
    """``PythonSlicer`` next to Slicer (it sets up Slicer's library paths), else this interpreter."""
    exe_dir = Path(sys.executable).parent
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        cand = exe_dir / name
        if cand.is_file():
            return str(cand)
    found = shutil.which("PythonSlicer")
    return found or sys.executable


def engine_path() -> str:
    """The folder that contains the ``uad`` package (put on the child's PYTHONPATH)."""
    import importlib.util

    spec = importlib.util.find_spec("uad")
    if spec is None or not spec.origin:
        raise RuntimeError("the 'uad' engine package is not importable")
    return str(Path(spec.origin).resolve().parent.parent)


def parse_event_line(line: str) -> dict | None:
    """A ``--progress-format json`` event, or None for any other output line."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or "event" not in event:
        return None
    return event


def _param_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def build_detect_command(input_path, output_dir, method: str, model: str | None = None, device: str = "auto",
                         seed: int = 0, preset: str | None = None, threshold: float | None = None,
                         batch_size: int = 16, params: dict | None = None, brain_mask_path=None,
                         python: str | None = None, precision: str = "fp32") -> list[str]:
    """The ``uad detect`` command line of a background run (a list: no shell)."""
    cmd = [python or python_executable(), "-m", "uad.cli", "detect", str(input_path), "-o", str(output_dir),
           "--method", str(method), "--device", str(device), "--seed", str(int(seed)),
           "--batch-size", str(int(batch_size)), "--progress-format", "json"]
    if model:
        cmd += ["--model", str(model)]
    if preset:
        cmd += ["--preset", str(preset)]
    if threshold is not None:
        cmd += ["--threshold", repr(float(threshold))]
    for key, value in (params or {}).items():
        cmd += ["--param", f"{key}={_param_text(value)}"]
    if brain_mask_path is not None:
        cmd += ["--brain-mask", str(brain_mask_path)]
    if precision and str(precision).lower() not in ("fp32", "float32"):
        cmd += ["--precision", str(precision).lower()]
    return cmd


def kill_process_tree(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Kill ``proc`` and every process it started (``proc`` was started by ``start_process``)."""
    if proc.poll() is not None:
        return
    if os.name == "nt":  # the launcher's children would survive proc.kill()
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session / process group
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def start_process(args: list[str], env: dict | None = None, cwd=None) -> subprocess.Popen:
    """Popen in its own process group (so the whole tree can be killed), text pipes, no console window."""
    kwargs: dict[str, Any] = {}
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
    else:
        kwargs["start_new_session"] = True
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)


class BackgroundProcess:
    """A child process whose stdout / stderr lines are collected by threads and drained by ``lines()``."""

    def __init__(self, args: list[str], env: dict | None = None, cwd=None):
        self.args = list(args)
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.proc = start_process(self.args, env=self.env, cwd=self.cwd)
        for name, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            t = threading.Thread(target=self._read, args=(name, stream), daemon=True)
            t.start()
            self._threads.append(t)

    def _read(self, name: str, stream) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((name, line.rstrip("\r\n")))
        except (ValueError, OSError):  # stream closed by a kill
            pass
        finally:
            self._queue.put((name, None))

    def lines(self) -> list[tuple[str, str]]:
        """(stream, line) pairs read since the last call ("out" / "err"); never blocks."""
        out = []
        while True:
            try:
                name, line = self._queue.get_nowait()
            except queue.Empty:
                return out
            if line is not None:
                out.append((name, line))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def finished(self) -> bool:
        """The process ended and both pipes were read to the end."""
        return self.returncode() is not None and all(not t.is_alive() for t in self._threads)

    def kill(self) -> None:
        if self.proc is not None:
            kill_process_tree(self.proc)
        for t in self._threads:
            t.join(timeout=2.0)


class BackgroundRun:
    """One detection in a background ``uad detect`` process; see the module docstring.

    ``state``: idle -> running -> done | failed | cancelled.  ``tracker``: slices done,
    rate and ETA.  ``warnings``: the engine's warnings (not skull-stripped, SSIM fallback,
    ...).  ``result``: the ``UADResult`` when done.  ``error`` / ``failureKind``
    ("oom", "no_kernel_image" or None) when failed.  ``onEvent(event_dict)`` is called for
    every event (the GUI may also just read the attributes after ``poll()``).
    Out of memory retries automatically with half the batch (down to one slice).
    """

    def __init__(self, logic, inputVolumeNode, method: str = "disyre", model: str | None = None,
                 device: str = "auto", preset: str | None = None, seed: int = 0, threshold: float | None = None,
                 params: dict | None = None, brainMaskNode=None, batchSize: int = 16,
                 namePrefix: str | None = None, restorationVolume=None, heatmapVolume=None,
                 anomalySegmentation=None, threads: int | None = None, python: str | None = None,
                 onEvent: Callable[[dict], Any] | None = None, retryOnOutOfMemory: bool = True,
                 precision: str = "fp32"):
        if model is not None and not isinstance(model, str):
            raise TypeError("a background run takes a model id (str); use logic.process() for a Model object")
        self.logic = logic
        self.inputVolumeNode = inputVolumeNode
        self.brainMaskNode = brainMaskNode
        self.method = str(method).lower()
        self.model = model
        self.device = device
        self.preset = preset
        self.seed = int(seed)
        self.threshold = threshold
        self.params = dict(params or {})
        self.batchSize = max(1, int(batchSize))
        self.precision = str(precision or "fp32").lower()  # fp32 | bf16 | fp16: autocast of the networks only
        self.namePrefix = namePrefix
        self.outputs = {"restorationVolume": restorationVolume, "heatmapVolume": heatmapVolume,
                        "anomalySegmentation": anomalySegmentation}
        self.threads = default_thread_count() if threads is None else max(1, int(threads))
        self.python = python
        self.onEvent = onEvent
        self.retryOnOutOfMemory = retryOnOutOfMemory

        self.state = IDLE
        self.tracker = ProgressTracker()
        self.warnings: list[str] = []
        self.events: list[dict] = []
        self.stderrTail: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.result = None
        self.error: str | None = None
        self.failureKind: str | None = None
        self.info: dict | None = None
        self.startTime: float | None = None
        self.endTime: float | None = None
        self.process: BackgroundProcess | None = None
        self._tmp: Path | None = None
        self._inputPath: Path | None = None
        self._maskPath: Path | None = None
        self._attempt = 0
        self._resultEvent: dict | None = None

    # -- control --------------------------------------------------------------
    def start(self) -> "BackgroundRun":
        """Validate, write the input to a temporary folder and launch the process."""
        if self.state != IDLE:
            raise RuntimeError(f"this run was already started (state {self.state})")
        logic, scene = self.logic, self.logic.scene
        logic._checkInput(self.inputVolumeNode, scene, "input volume")
        if self.brainMaskNode is not None:
            logic._checkInput(self.brainMaskNode, scene, "brain mask", allowLabelmap=True)
        logic._checkOutputs(scene, **self.outputs)
        import SimpleITK as sitk

        from .nodes import volume_node_to_sitk

        image = volume_node_to_sitk(self.inputVolumeNode)
        mask = volume_node_to_sitk(self.brainMaskNode) if self.brainMaskNode is not None else None
        self.device = self._checkedDevice(self.device)
        self._tmp = Path(tempfile.mkdtemp(prefix="uad-run-"))
        try:
            self._inputPath = self._tmp / "input.nrrd"  # NRRD keeps the geometry in full double precision
            sitk.WriteImage(image, str(self._inputPath), useCompression=False)
            if mask is not None:
                self._maskPath = self._tmp / "brainmask.nrrd"
                sitk.WriteImage(mask, str(self._maskPath), useCompression=False)
            self.startTime = time.monotonic()
            self._launch()
        except BaseException:
            self._cleanup()
            raise
        self.state = RUNNING
        return self

    def _checkedDevice(self, device: str, platform: str = sys.platform, probe=None) -> str:
        """On macOS, "auto" / "mps" is probed first (a tiny convolution in a separate process):
        an MPS that fails it is not used, the run goes to the CPU and says so."""
        if platform != "darwin" or str(device) not in ("auto", "mps"):
            return device
        info = (probe or self._probeDevice)()
        if info.get("mps_available") and not info.get("mps_works"):
            self.warnings.append("Apple MPS failed a test convolution "
                                 f"({info.get('mps_error', 'wrong result')}); running on the CPU")
            return "cpu"
        return device

    def _noKernelText(self, probe=None) -> str:
        """The engine's message (GPU, compute capability, the build's architectures) from the device probe,
        with the way out in Slicer."""
        from .devices import no_kernel_message

        info = (probe or self._probeDevice)()
        dev = self.device if str(self.device).startswith("cuda") else "cuda:0"
        text = no_kernel_message(info, dev) if info.get("gpus") else \
            "the installed PyTorch has no kernels for this GPU; run on the CPU (device 'cpu')"
        return text + " (in Slicer: the PyTorch Utils module installs another build)"

    def _probeDevice(self) -> dict:
        from .devices import parse_probe_output, probe_command

        try:
            out = subprocess.run(probe_command(self.python or python_executable()), capture_output=True, text=True,
                                 timeout=120, env=self._environment())
            return parse_probe_output(out.stdout)
        except Exception as e:  # no verdict: let the engine choose
            logging.warning(f"UAD: device probe failed: {e}")
            return {}

    def _environment(self) -> dict:
        env = dict(os.environ)
        path = engine_path()
        here = str(Path(__file__).resolve().parent.parent)  # UADExtensionLib's folder (device probe)
        parts = [path] + ([here] if here != path else []) + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(parts)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(self.threads)
        env["PYTHONUNBUFFERED"] = "1"
        if str(self.device) == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"
        return env

    def command(self) -> list[str]:
        out = self._tmp / f"out{self._attempt}"
        return build_detect_command(self._inputPath, out, self.method, self.model, self.device, self.seed,
                                    self.preset, self.threshold, self.batchSize, self.params, self._maskPath,
                                    python=self.python, precision=self.precision)

    def _launch(self) -> None:
        self._resultEvent = None
        self.tracker.reset()
        self.process = BackgroundProcess(self.command(), env=self._environment())
        self.process.start()
        logging.info(f"UAD: background run started (pid {self.process.pid}, batch {self.batchSize})")

    def cancel(self) -> None:
        """Kill the whole process tree now; the scene is left as it was."""
        if self.state != RUNNING:
            return
        if self.process is not None:
            self.process.kill()
        self.state = CANCELLED
        self.error = "cancelled"
        self.endTime = time.monotonic()
        self._cleanup()
        self._emit({"event": "cancelled"})

    # -- polling ----------------------------------------------------------------
    def poll(self) -> bool:
        """Handle what the process printed; True while the run goes on."""
        if self.state != RUNNING:
            return False
        for stream, line in self.process.lines():
            if stream == "out":
                event = parse_event_line(line)
                if event is not None:
                    self._handle(event)
                elif line.strip():
                    logging.debug(f"UAD run: {line}")
            else:
                self.stderrTail.append(line)
        if self.process.finished():
            for stream, line in self.process.lines():  # the last lines after the end
                if stream == "out":
                    event = parse_event_line(line)
                    if event is not None:
                        self._handle(event)
                else:
                    self.stderrTail.append(line)
            self._finish(self.process.returncode())
        return self.state == RUNNING

    def wait(self, timeout: float | None = None, interval: float = 0.05):
        """Poll until the run ends (console use); returns ``result`` or raises on failure / timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"the background run took longer than {timeout} s and was cancelled")
            time.sleep(interval)
        if self.state == DONE:
            return self.result
        if self.state == CANCELLED:
            from uad import Cancelled

            raise Cancelled("cancelled")
        raise RuntimeError(self.error or "the background run failed")

    def _emit(self, event: dict) -> None:
        self.events.append(event)
        if self.onEvent is not None:
            try:
                self.onEvent(event)
            except Exception as e:  # a GUI callback must not break the run
                logging.error(f"UAD: event callback failed: {e}")

    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "progress":
            self.tracker.update(int(event.get("done", 0)), int(event.get("total", 0)))
        elif kind == "warning":
            msg = str(event.get("message", ""))
            if msg and msg not in self.warnings:
                self.warnings.append(msg)
        elif kind == "result":
            self._resultEvent = event
        self._emit(event)

    # -- the end --------------------------------------------------------------------
    def errorText(self) -> str:
        """The child's error: its 'uad: error:' line, else the last lines of its stderr (a traceback)."""
        lines = [ln for ln in self.stderrTail if ln.strip()]
        for ln in reversed(lines):
            if ln.startswith("uad: error:"):
                return ln[len("uad: error:"):].strip()
        return "\n".join(lines[-8:]) if lines else ""

    def _finish(self, rc: int | None) -> None:
        if rc == 0 and self._resultEvent is not None:
            try:
                self._load()
                self.state = DONE
            except Exception as e:
                self.state = FAILED
                self.error = f"the results could not be loaded: {e}"
                logging.error(f"UAD: {self.error}")
            finally:
                self.endTime = time.monotonic()
                self._cleanup()
            self._emit({"event": "done" if self.state == DONE else "failed", "error": self.error})
            return
        text = self.errorText()
        kind = classify_failure(text)
        if kind == "oom" and self.retryOnOutOfMemory and self.batchSize > 1:
            self.batchSize = max(1, self.batchSize // 2)
            self._attempt += 1
            self.warnings.append(f"out of memory: retried with {self.batchSize} slices per batch")
            self._emit({"event": "retry", "batch_size": self.batchSize})
            self._launch()
            return
        self.state = FAILED
        self.failureKind = kind
        if rc == 0:
            self.error = "the engine ended without a result"
        elif rc is not None and rc < 0:
            self.error = f"the engine process crashed (signal {-rc})" + (f": {text}" if text else "")
        else:
            self.error = text or f"the engine process failed (exit status {rc})"
        if kind == "no_kernel_image":
            self.error += " -- " + self._noKernelText()
        self.endTime = time.monotonic()
        self._cleanup()
        self._emit({"event": "failed", "error": self.error, "kind": kind, "returncode": rc})

    def _load(self) -> None:
        from uad.imageio import read_image

        ev = self._resultEvent
        outputs = ev.get("outputs") or {}
        info = dict(ev.get("info") or {})
        images = {}
        for kind in ("restoration", "anomaly", "mask"):
            path = outputs.get(kind)
            if not path or not Path(path).is_file():
                raise RuntimeError(f"the engine did not write its {kind} output")
            images[kind] = read_image(path)
        info["background_process"] = True
        info["elapsed_total_s"] = (time.monotonic() - self.startTime) if self.startTime else None
        info.setdefault("model", self.model)
        self.info = info
        self.result = self.logic.buildOutputs(
            self.inputVolumeNode, images["restoration"], images["anomaly"], images["mask"], info,
            method=self.method, preset=self.preset, seed=self.seed, threshold=self.threshold,
            namePrefix=self.namePrefix, **self.outputs)
        self.result.info["warnings"] = list(self.warnings)

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @property
    def temporaryFolder(self) -> Path | None:
        return self._tmp

    def statusText(self) -> str:
        if self.state == RUNNING:
            return self.tracker.text() if self.tracker.total else "starting the engine..."
        if self.state == DONE:
            return f"done in {self.endTime - self.startTime:.1f} s"
        return self.error or self.state
