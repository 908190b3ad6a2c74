"""One trainer for every method's objective, on one CPU, one GPU or N processes.

``train(TrainConfig, run_dir)`` builds the method's default model config (plus
overrides), streams 2-D axial training slices (MNI-based phantoms, or a folder
of healthy NIfTI/NRRD volumes) through the same preprocessing as inference,
and optimises ``Method.training_loss``.  It validates on held-out healthy
data, checkpoints (safetensors weights + a weights-only optimizer state) and
resumes.  A run directory holds:

    config.json          the TrainConfig and the model config
    model.safetensors    the latest weights (one file, keys <role>.<param>)
    model.json           a manifest entry for the weights (see ``uad.zoo``; import with 'uad models import')
    train_state.safetensors  the online (optimised) weights and the optimizer state (tensors; param groups as
                         JSON metadata), so that every part of the checkpoint is safetensors; runs written
                         before stop 29 without EMA hold optimizer.pt instead, still resumed (read back only with
                         ``torch.load(weights_only=True)``)
    state.json           step, best validation loss and its step, seconds, world size (EMA updates, init model)
    log.csv              step, loss (mean over processes), validation loss, seconds
    best.safetensors     the validated weights (EMA with EMA) at the step of the lowest validation loss, so that
                         a late excursion of the loss does not lose them (``export_run(..., weights="best")``)

With EMA (``ema_decay`` > 0), model.safetensors holds the EMA weights (what is
validated and exported) and the online weights are those of train_state.safetensors;
without EMA the two are the same weights.  With a
learning curve (``curve_every``) the folder also holds curve.csv and curve.png.

Converging faster
-----------------
``init`` starts a new run from an existing model (id, run folder or
.safetensors; its architecture, schedule and normalisation are kept);
``ema_decay`` keeps an EMA of the weights; ``t_min`` / ``t_max`` restrict the
training timesteps of the DDPM family (``train_t_min`` / ``train_t_max`` in the
model config, read by ``methods.common.ddpm_loss``); ``curve_every`` /
``curve_methods`` log the validation loss and the AP on a few slices of the
bundled sample every N steps.  ``train(time_limit=...)`` (``--time-limit``) and
SIGINT / SIGTERM checkpoint and stop a single-process run cleanly.

Configuration: ``TrainConfig`` defaults, then a JSON config (``--config``),
then command-line options; ``model_overrides`` is deep-merged into the model
config (e.g. a smaller network).  bf16 autocast is used on CUDA (``amp``).

Data-parallel training (``torchrun``)
-------------------------------------
``torchrun --nproc_per_node=N -m uad.cli train ...`` (or ``python -m
torch.distributed.run ...``) starts N processes with ``RANK``, ``LOCAL_RANK``
and ``WORLD_SIZE`` set.  When ``WORLD_SIZE`` > 1, ``train`` initialises the
process group (NCCL on CUDA, one GPU per process chosen by ``LOCAL_RANK``;
Gloo on CPU), wraps every network in ``DistributedDataParallel`` (gradients
are averaged over the processes, so all copies stay identical), and tears the
group down at the end.  Without those variables the same command trains in
one process; nothing else changes.

The "distributed sampler" of the streaming sources: every process draws its
own, disjoint data.  Process ``r`` uses the phantom seeds ``seed + r *
RANK_SEED_STRIDE + k`` (``k`` = 0, 1, ... along its stream; disjoint for
fewer than ``RANK_SEED_STRIDE`` phantoms per process), batch generators seeded
``(seed, step, r)`` and diffusion noise seeded from ``seed + r *
RANK_SEED_STRIDE``; with a folder of volumes, process ``r`` gets the volumes
``r, r + N, ...`` (or, with fewer volumes than processes, the slices ``r, r +
N, ...``).  Process 0 (rank 0 with one process) draws exactly what a
single-process run draws.  The batch size is per process: one step sees
``N * batch_size`` slices.  All processes run the same number of steps (the
step counter and configuration come from rank 0); only rank 0 validates and
writes the run directory (checkpoints, log, progress bar, messages).
Checkpoints hold the unwrapped networks' weights, so a run trained on N
processes resumes on any number of processes, and imports like any other.
Resuming reads the run directory on rank 0 and sends its content to the other
processes, so only rank 0 needs to see the run directory.

Debugging: with ``$UAD_DDP_DEBUG_DIR`` set, every process writes
``rank<r>.json`` there at the end (digest of its weights, of its first batch,
its data shard).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import UADError
from .files import apply_umask
from .methods import get_method_class
from .rng import BatchRNG, slice_seed
from .zoo import Model, build_model, load_weights, save_weights, sha256_file, upsert_manifest_entry

#: Seed offset between the data streams of two processes (phantom seeds, noise seeds).
RANK_SEED_STRIDE = 10_000
DEBUG_DIR_ENV = "UAD_DDP_DEBUG_DIR"


@dataclass
class TrainConfig:
    method: str = "anoddpm"
    data: str = "phantoms"  # "phantoms" or a folder of healthy volumes
    contrast: str = "T2"
    image_size: int | None = None  # None: the init model's resolution, else 64
    small: bool = True  # small CPU-friendly network instead of the paper's
    steps: int = 2000
    batch_size: int = 16  # per process
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    val_every: int = 250
    val_batches: int = 4
    checkpoint_every: int = 250
    amp: bool = True  # bf16 autocast on CUDA
    lesion_fraction: float = 0.0  # fraction of lesion phantoms (weakly supervised methods)
    paired_healthy: bool = False  # each lesion phantom with its healthy twin (same seed, no lesion; label 0)
    pool_size: int = 8
    # thick-slice augmentation (phantoms): this fraction of the training phantoms is acquired with thick slices
    # (axial / coronal / sagittal, thickness ~ U(thick_slice_mm)) and resampled back, as inference sees a
    # thick-slice scan on the model's grid (uad.phantoms.thick_slice_profile); 0: off
    thick_slice_fraction: float = 0.0
    thick_slice_mm: list = field(default_factory=lambda: [3.0, 6.0])
    # skull-stripping-error augmentation (phantoms): this fraction of the training phantoms is built with a head
    # and stripped with its brain mask's boundary moved out and in by a smooth random field of up to
    # U(strip_error_mm) mm (uad.phantoms.perturbed_brain_mask), as inference meets a stripper's mask; 0: off
    strip_error_fraction: float = 0.0
    strip_error_mm: list = field(default_factory=lambda: [2.0, 6.0])
    noise: str | None = None  # override the model's noise kind (gaussian | simplex)
    model_overrides: dict = field(default_factory=dict)
    # EMA, timestep range, initialisation, learning curve (see "Converging faster" in the module docstring)
    ema_decay: float = 0.0  # 0: off; else the validated / exported weights are an EMA with this decay
    t_min: int = 0  # training timesteps t ~ U{t_min..t_max-1} (DDPM family only); default the full range
    t_max: int | None = None
    init: str | None = None  # start from this model's weights: a model id, a run folder or a .safetensors file
    curve_every: int = 0  # 0: off; else every N steps: validation loss (+ sample AP) to curve.csv / curve.png
    curve_methods: list = field(default_factory=list)  # methods whose AP on the bundled sample the curve tracks
    curve_preset: str = "fast"
    curve_slices: int = 24  # axial slices of the bundled sample (evenly spaced over the brain)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        if not isinstance(d, dict):
            raise UADError(f"a training config must be a JSON object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        bad = set(d) - known
        if bad:
            raise UADError(f"unknown training option(s): {', '.join(sorted(bad))} "
                           f"(known: {', '.join(sorted(known))})")
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < 8):
            raise UADError(f"training option image_size must be an integer >= 8, got {self.image_size!r}")
        for name in ("steps", "batch_size", "val_every", "val_batches", "checkpoint_every",
                     "pool_size", "curve_every", "curve_slices", "t_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name in ("steps", "curve_every", "t_min")
                                                                     else 1):
                raise UADError(f"training option {name} must be a positive integer, got {v!r}")
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) \
                or not 0.0 <= float(self.ema_decay) < 1.0:
            raise UADError(f"training option ema_decay must be a number in [0, 1) (0: no EMA), got {self.ema_decay!r}")
        self.ema_decay = float(self.ema_decay)
        if self.t_max is not None and (isinstance(self.t_max, bool) or not isinstance(self.t_max, int)
                                       or self.t_max <= self.t_min):
            raise UADError(f"training option t_max must be an integer above t_min={self.t_min}, got {self.t_max!r}")
        if self.init is not None and (not isinstance(self.init, str) or not self.init.strip()):
            raise UADError(f"training option init must be a model id or a path, got {self.init!r}")
        if not isinstance(self.curve_methods, list) or not all(isinstance(m, str) for m in self.curve_methods):
            raise UADError("training option curve_methods must be a list of method names")
        for m in self.curve_methods:
            try:
                get_method_class(m)
            except ValueError as e:
                raise UADError(f"curve method: {' '.join(str(e).split())}") from None
        # the phantom augmentations: a fraction of the phantoms and a [low, high] mm range each
        for frac, rng in (("thick_slice_fraction", "thick_slice_mm"), ("strip_error_fraction", "strip_error_mm")):
            f = getattr(self, frac)
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= float(f) <= 1.0:
                raise UADError(f"training option {frac} must be a number in [0, 1], got {f!r}")
            setattr(self, frac, float(f))
            mm = getattr(self, rng)
            if not isinstance(mm, (list, tuple)) or len(mm) != 2 \
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in mm) \
                    or not 0.0 < float(mm[0]) <= float(mm[1]) <= 20.0:
                raise UADError(f"training option {rng} must be [low, high] mm with 0 < low <= high <= 20, "
                               f"got {mm!r}")
            setattr(self, rng, [float(mm[0]), float(mm[1])])
            if float(f) > 0 and self.data != "phantoms":
                raise UADError(f"training option {frac} applies to phantom training (--data phantoms)")
        if not isinstance(self.paired_healthy, bool):
            raise UADError(f"training option paired_healthy must be true or false, got {self.paired_healthy!r}")
        if not isinstance(self.model_overrides, dict):
            raise UADError("training option model_overrides must be a JSON object")
        if str(self.contrast).upper() not in ("T1", "T2", "FLAIR"):
            raise UADError(f"contrast must be T1, T2 or FLAIR, got {self.contrast!r}")
        self.contrast = str(self.contrast).upper()


def default_config(method: str, **overrides) -> TrainConfig:
    cls = get_method_class(method)
    base = {"method": method}
    if cls.needs_labels:
        base["lesion_fraction"] = 0.5
        base["paired_healthy"] = True
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(base)


def model_config_for(cfg: TrainConfig, base: dict | None = None) -> dict:
    """The run's model config: the method's default (or ``base``, the ``init`` model's), then the overrides.

    With ``cfg.init`` and no ``base``, the init model's config is read (its weights are not loaded).
    ``cfg.image_size`` None takes the init model's resolution (64 without one); a size given with an
    init model trains its weights at that resolution (the networks are convolutional; a window
    ``patch_size`` equal to the old image size follows the new one), ``cfg.image_size`` is set.
    The timestep range goes in as ``train_t_min`` / ``train_t_max`` (read by the DDPM objective).
    """
    if base is None and cfg.init:
        base = resolve_init(cfg.init, cfg.method, load=False)["config"]
    if base is not None:
        mc = {k: v for k, v in json.loads(json.dumps(base)).items() if k not in _INIT_DROP}
        old = int(base["image_size"]) if base.get("image_size") is not None else 64
        if cfg.image_size is None:
            cfg.image_size = old
        elif cfg.image_size != old and mc.get("patch_size") is not None and int(mc["patch_size"]) == old:
            mc["patch_size"] = cfg.image_size
    else:
        if cfg.image_size is None:
            cfg.image_size = 64
        mc = get_method_class(cfg.method).default_model_config(image_size=cfg.image_size, small=cfg.small)
    if cfg.noise is not None:
        mc["noise"] = cfg.noise
    if str(mc.get("noise", "")).startswith("simplex"):  # new models: simplex amplitude / frequency as the reference
        from .noise import REFERENCE_OPTIONS

        mc.setdefault("noise_options", dict(REFERENCE_OPTIONS))
    _deep_update(mc, cfg.model_overrides)
    mc["contrast"] = cfg.contrast
    mc["image_size"] = cfg.image_size
    _apply_t_range(cfg, mc)
    return mc


#: Methods whose objective is ``methods.common.ddpm_loss`` (they honour the timestep range).
T_RANGE_METHODS = ("anoddpm", "thor", "autoddpm")
#: Manifest keys of an init model that describe that model, not the new run's architecture.
_INIT_DROP = ("id", "file", "sha256", "url", "training", "threshold", "calibration", "evaluation", "card",
              "description", "license", "measurements", "train_t_min", "train_t_max")


def _apply_t_range(cfg: TrainConfig, mc: dict) -> None:
    if cfg.t_min == 0 and cfg.t_max is None:
        return  # the full range: the model config says nothing
    if cfg.method not in T_RANGE_METHODS:
        raise UADError(f"a training timestep range (t_min / t_max) is supported for {', '.join(T_RANGE_METHODS)} "
                       f"only, not {cfg.method!r}")
    T = int(mc.get("schedule", {}).get("num_train_timesteps", 1000))
    t_max = T if cfg.t_max is None else cfg.t_max
    if t_max > T or cfg.t_min >= t_max:
        raise UADError(f"training timesteps [{cfg.t_min}, {t_max}) do not fit the schedule's {T} timesteps")
    mc["train_t_min"], mc["train_t_max"] = int(cfg.t_min), int(t_max)


def resolve_init(spec: str, method: str, load: bool = True) -> dict:
    """The model a run starts from: ``{"config", "weights", "info"}``.

    ``spec``: a model id (bundled, ``$UAD_MODELS_DIR`` or imported; verified against its sha256), a
    training run folder (its model.json + model.safetensors), or a ``.safetensors`` file (with the
    ``<stem>.json`` manifest entry beside it if there is one; otherwise the weights must fit the run's
    own model config, and ``config`` is None).
    """
    from .zoo import ModelError, find_model, verify

    p = Path(spec).expanduser()
    if p.exists():
        if p.is_dir():
            js = p / "model.json"
            if not js.is_file():
                raise UADError(f"--init {spec}: the folder has no model.json (give a training run folder, a "
                               f".safetensors file or a model id)")
            config = json.loads(js.read_text())
            weights = p / Path(config.get("file") or "model.safetensors").name
            name = config.get("id") or p.resolve().name
        elif p.name.endswith(".safetensors"):
            side = p.with_suffix(".json")
            config = json.loads(side.read_text()) if side.is_file() else None
            weights, name = p, (config or {}).get("id") or p.stem
        else:
            raise UADError(f"--init {spec}: not a .safetensors file, a run folder or a model id")
        if not weights.is_file():
            raise UADError(f"--init {spec}: weights file {weights} is missing")
        if config is not None and not isinstance(config.get("networks"), dict):
            raise UADError(f"--init {spec}: {weights.with_suffix('.json').name} is not a model manifest entry")
        digest = sha256_file(weights)
    else:
        try:
            entry = find_model(spec)
            digest = verify(entry)
        except ModelError as e:
            raise UADError(f"--init {spec}: no such file or folder, and {e}") from None
        config, weights, name = dict(entry.data), entry.weights_path, entry.id
    if config is not None and method not in config.get("methods", [method]):
        raise UADError(f"--init {spec}: model {name} serves {', '.join(config.get('methods', []))}, not {method!r}")
    info = {"model": name, "sha256": digest, "steps": ((config or {}).get("training") or {}).get("steps")}
    return {"config": config, "weights": load_weights(weights, name) if load else None, "info": info}


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


# --------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this module initialised the process group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_env(environ=None) -> DistContext:
    """Rank, local rank and world size from the ``torchrun`` variables (no process group is touched)."""
    env = os.environ if environ is None else environ

    def read(name, default):
        raw = env.get(name)
        if raw in (None, ""):
            return default
        try:
            return int(raw)
        except ValueError:
            raise UADError(f"${name} must be an integer, got {raw!r}") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local = read("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UADError(f"inconsistent torchrun variables: RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={world}")
    return DistContext(rank=rank, local_rank=local, world_size=world)


def setup_distributed(device: str = "auto") -> tuple[DistContext, torch.device]:
    """The process's context and device; joins the process group when ``WORLD_SIZE`` > 1."""
    from .pipeline import resolve_device

    ctx = distributed_env()
    if not ctx.enabled:
        return ctx, resolve_device(device)
    import torch.distributed as dist

    if not dist.is_available():
        raise UADError("this PyTorch build has no torch.distributed; train with one process")
    want = str(device or "auto").strip().lower()
    if want == "auto" and torch.cuda.is_available() or want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UADError(f"device {device!r} was requested but CUDA is not available; use --device cpu")
        n = torch.cuda.device_count()
        if ctx.local_rank >= n:
            raise UADError(f"LOCAL_RANK {ctx.local_rank} has no GPU (this machine has {n}); "
                           f"start at most {n} processes per node")
        dev = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif want in ("auto", "cpu"):
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise UADError(f"distributed training runs on cpu or cuda, not {device!r}")
    backend = os.environ.get("UAD_DIST_BACKEND", backend)
    owns = False
    if not dist.is_initialized():
        if backend == "nccl":
            try:  # bind the group to this process's GPU (barriers and object broadcasts use it)
                dist.init_process_group(backend=backend, device_id=dev)
            except TypeError:  # torch < 2.3
                dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend)
        owns = True
    if dist.get_world_size() != ctx.world_size or dist.get_rank() != ctx.rank:
        raise UADError("the process group does not match RANK / WORLD_SIZE")
    return DistContext(ctx.rank, ctx.local_rank, ctx.world_size, owns), dev


def cleanup_distributed(ctx: DistContext) -> None:
    if ctx.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class SharedError(UADError):
    """An error raised on rank 0 and re-raised on every process (printed once, by rank 0)."""


def _share_from_main(ctx: DistContext, fn: Callable[[], Any]):
    """``fn()`` on rank 0, its result (or its error) on every rank."""
    if not ctx.enabled:
        return fn()
    import torch.distributed as dist

    box: list = [None]
    if ctx.is_main:
        try:
            box[0] = ("ok", fn())
        except UADError as e:
            box[0] = ("error", str(e))
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise SharedError(value)
    return value


def _mean_over_ranks(ctx: DistContext, value: torch.Tensor) -> float:
    v = value.detach().float().reshape(1).clone()
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(v, op=dist.ReduceOp.SUM)
        v /= ctx.world_size
    return float(v)


def _wrap_ddp(model: Model, dev: torch.device) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    for role, net in list(model.networks.items()):
        if dev.type == "cuda":
            model.networks[role] = DDP(net, device_ids=[dev.index], output_device=dev.index)
        else:
            model.networks[role] = DDP(net)


def _data_seed(seed: int, step: int, rank: int) -> list[int]:
    return [seed, step] if rank == 0 else [seed, step, rank]


def _rank_seed(seed: int, rank: int) -> int:
    return seed + rank * RANK_SEED_STRIDE


# --------------------------------------------------------------------------- data
VOLUME_EXTS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _strip_ext(name: str) -> str:
    for e in VOLUME_EXTS:
        if name.endswith(e):
            return name[: -len(e)]
    return name


LABELS_CSV = "labels.csv"


def _find_beside(f: Path, suffixes) -> Path | None:
    stem = _strip_ext(f.name)
    for suffix in suffixes:
        for e in VOLUME_EXTS:
            m = f.parent / f"{stem}{suffix}{e}"
            if m.is_file():
                return m
    return None


def _volumes_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.name.endswith(VOLUME_EXTS) and not any(s in p.name for s in ("_brainmask", "_mask", "_lesion")))


def _interleave(a: list, b: list) -> list:
    out = []
    for i in range(max(len(a), len(b))):
        out += a[i:i + 1] + b[i:i + 1]
    return out


def read_labels_csv(path: Path) -> dict:
    """{(file name, slice or None): label} from a CSV with columns ``file,label`` and optionally ``slice``.

    ``label``: 0 / healthy or 1 / lesion (anomalous).  A row without ``slice`` labels every slice of
    the volume; ``slice`` is the axial index in the volume's canonical (LPS) slice order.
    """
    out = {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "file" not in rows[0] or "label" not in rows[0]:
        raise UADError(f"{path}: a labels CSV needs the columns 'file' and 'label' (and optionally 'slice')")
    names = {"0": 0, "healthy": 0, "normal": 0, "1": 1, "lesion": 1, "anomalous": 1, "abnormal": 1}
    for i, r in enumerate(rows, start=2):
        lab = names.get(str(r["label"]).strip().lower())
        if lab is None:
            raise UADError(f"{path}, line {i}: label {r['label']!r} is not 0/healthy or 1/lesion")
        sl = str(r.get("slice") or "").strip()
        out[(Path(str(r["file"]).strip()).name, int(sl) if sl else None)] = lab
    return out


class VolumeFolderSource:
    """Training slices from a folder of volumes (NIfTI, NRRD, ...).

    Optional brain masks are picked up from ``<stem>_brainmask.<ext>`` (or
    ``_mask``) files next to each volume; otherwise the preprocessing computes
    one for skull-stripped input.  The first ``holdout_fraction`` of the
    (sorted) volumes, at least one, is held out for validation
    (``holdout=True`` gives those); with a single volume, validation uses that
    volume too (``self.warning`` says so).

    Image-level labels (0 healthy, 1 lesion; ``labels=True``, for the weakly
    supervised methods such as Wolleb et al.), from the first source that
    exists, in this order:

    1. a labels CSV (``labels_csv``, default ``<folder>/labels.csv``) with
       columns ``file,label[,slice]`` (``read_labels_csv``);
    2. ``healthy/`` and ``lesion/`` sub-folders: every slice of a healthy volume
       is 0; a lesion volume's slice is 1 where its lesion mask
       (``<stem>_lesion.<ext>`` beside it) has a voxel, else every slice is 1;
    3. lesion masks beside the volumes (``<stem>_lesion.<ext>``): 1 for the
       slices with lesion voxels, 0 for the others and for volumes without one.

    A source that yields one class only raises ``UADError`` (a classifier
    would learn a constant).  Without ``labels`` (unsupervised methods) the
    ``lesion/`` sub-folder is skipped, lesion files are ignored, and every
    label is 0.

    ``rank`` / ``world_size``: this process's disjoint shard for data-parallel
    training: volumes ``rank, rank + world_size, ...`` when there are at least
    ``world_size`` training volumes, else slices ``rank, rank + world_size, ...``.
    """

    def __init__(self, folder: str | os.PathLike, image_size: int, holdout: bool = False,
                 holdout_fraction: float = 0.1, normalisation: dict | None = None, rank: int = 0,
                 world_size: int = 1, labels: bool = False, labels_csv: str | os.PathLike | None = None):
        from .imageio import read_image
        from .preprocess import _mask_on_grid, orient_array, preprocess

        folder = Path(folder)
        if not folder.is_dir():
            raise UADError(f"training data {folder}: no such folder (give a folder of healthy volumes, "
                           f"or 'phantoms')")
        csv_path = Path(labels_csv) if labels_csv else folder / LABELS_CSV
        if labels_csv and not csv_path.is_file():
            raise UADError(f"labels CSV {csv_path}: no such file")
        table = read_labels_csv(csv_path) if (labels and csv_path.is_file()) else None
        sub_h, sub_l = folder / "healthy", folder / "lesion"
        if sub_h.is_dir() or sub_l.is_dir():
            kinds = [(f, 0) for f in (_volumes_in(sub_h) if sub_h.is_dir() else [])]
            if labels or table is not None:
                kinds += [(f, 1) for f in (_volumes_in(sub_l) if sub_l.is_dir() else [])]
            self.label_source = "healthy/ and lesion/ sub-folders"
        else:
            kinds = [(f, None) for f in _volumes_in(folder)]
            self.label_source = "lesion masks beside the volumes"
        if table is not None:
            self.label_source = f"labels CSV {csv_path}"
        if not labels:
            self.label_source = "none (all 0)"
        files_all = [f for f, _ in kinds]
        if not files_all:
            raise UADError(f"no volumes (.nii.gz, .nii, .nrrd, .mha) found in {folder}")
        kind_of = dict(kinds)
        self.warning = None
        n_hold = max(1, int(round(len(files_all) * holdout_fraction))) if len(files_all) > 1 else 0
        if labels and any(kind_of[f] == 1 for f in files_all):
            files_all = _interleave([f for f in files_all if kind_of[f] != 1],
                                    [f for f in files_all if kind_of[f] == 1])  # both classes held out
        if holdout:
            files = files_all[:n_hold] or files_all
            if n_hold == 0:
                self.warning = (f"{folder} has a single volume: validation uses the training volume "
                                f"(add more volumes for a real held-out validation)")
        else:
            files = files_all[n_hold:] or files_all
        self.shard = "all"
        slice_shard = False
        if world_size > 1 and not holdout:
            if len(files) >= world_size:
                files = files[rank::world_size]
                self.shard = f"volumes {rank}::{world_size}"
            else:
                slice_shard = True
                self.shard = f"slices {rank}::{world_size}"
        slices, masks, labs, owner, where = [], [], [], [], []
        for fi, f in enumerate(files):
            mask_p = _find_beside(f, ("_brainmask", "_mask"))
            mask_img = read_image(mask_p) if mask_p is not None else None
            image = read_image(f)
            stack = preprocess(image, image_size, brain_mask=mask_img, normalisation=normalisation)
            keep = stack.masks.reshape(len(stack.masks), -1).mean(1) > 0.05
            y = np.zeros(len(stack.indices), np.int64)
            if labels:
                if table is not None:
                    if (f.name, None) in table:
                        y[:] = table[(f.name, None)]
                    for i, k in enumerate(stack.indices.tolist()):
                        y[i] = table.get((f.name, int(k)), y[i])
                else:
                    les_p = _find_beside(f, ("_lesion",))
                    if les_p is not None:
                        les = orient_array(_mask_on_grid(read_image(les_p), image), stack.permute, stack.flip)
                        y = les[stack.indices].reshape(len(stack.indices), -1).any(1).astype(np.int64)
                    elif kind_of[f] == 1:
                        y[:] = 1
            slices.append(stack.slices[keep])
            masks.append(stack.masks[keep])
            labs.append(y[keep])
            owner.append(np.full(int(keep.sum()), fi))
            where.append(stack.indices[keep])
        self.slices = np.concatenate(slices).astype(np.float32)
        self.masks = np.concatenate(masks)
        self.labels = np.concatenate(labs)
        self.slice_file = np.concatenate(owner)  # per slice: index into self.files
        self.slice_index = np.concatenate(where)  # per slice: canonical axial index in its volume
        if slice_shard:
            self.slices = np.ascontiguousarray(self.slices[rank::world_size])
            self.masks = np.ascontiguousarray(self.masks[rank::world_size])
            self.labels = np.ascontiguousarray(self.labels[rank::world_size])
            self.slice_file = self.slice_file[rank::world_size]
            self.slice_index = self.slice_index[rank::world_size]
        if len(self.slices) == 0:
            raise UADError(f"no slices with enough brain in {', '.join(f.name for f in files)} "
                           f"(for process {rank} of {world_size})")
        if labels and not holdout and len(np.unique(self.labels)) < 2:
            only = "healthy (0)" if int(self.labels[0]) == 0 else "lesion (1)"
            raise UADError(
                f"training data {folder}: every slice is labelled {only} (labels from {self.label_source}); "
                f"a weakly supervised method needs healthy AND lesion slices: put <stem>_lesion.nii.gz masks "
                f"beside the volumes, a {LABELS_CSV} (file,label[,slice]), or healthy/ and lesion/ sub-folders")
        self.files = files

    def sample_batch(self, batch_size: int, generator: np.random.Generator):
        idx = generator.integers(0, len(self.slices), batch_size)
        x = self.slices[idx].copy()
        m = self.masks[idx].copy()
        flip = generator.random(batch_size) < 0.5
        x[flip] = x[flip][..., ::-1]
        m[flip] = m[flip][..., ::-1]
        return (torch.from_numpy(np.ascontiguousarray(x))[:, None], torch.from_numpy(np.ascontiguousarray(m))[:, None],
                torch.from_numpy(self.labels[idx].copy()))

    def describe(self) -> str:
        lab = ""
        if self.label_source != "none (all 0)":
            lab = f", labels from {self.label_source}: {int((self.labels == 1).sum())} lesion / " \
                  f"{int((self.labels == 0).sum())} healthy slices"
        return f"{len(self.files)} volume(s), {len(self.slices)} slices ({self.shard}){lab}"


def make_source(cfg: TrainConfig, holdout: bool = False, normalisation: dict | None = None, rank: int = 0,
                world_size: int = 1):
    """The training (or held-out validation) slice source of process ``rank`` of ``world_size``."""
    if cfg.data == "phantoms":
        from .phantoms import TrainingSliceSource

        seed = cfg.seed if holdout else _rank_seed(cfg.seed, rank)
        return TrainingSliceSource(contrast=cfg.contrast, image_size=cfg.image_size, seed=seed,
                                   pool_size=max(1, cfg.pool_size // (4 if holdout else 1)),
                                   lesion="any" if cfg.lesion_fraction > 0 else "none",
                                   lesion_fraction=cfg.lesion_fraction, holdout=holdout,
                                   paired=cfg.paired_healthy,
                                   normalisation=normalisation, prefetch=not holdout,
                                   thick_fraction=cfg.thick_slice_fraction, thick_mm=tuple(cfg.thick_slice_mm),
                                   strip_fraction=cfg.strip_error_fraction, strip_mm=tuple(cfg.strip_error_mm))
    return VolumeFolderSource(cfg.data, cfg.image_size, holdout=holdout, normalisation=normalisation,
                              rank=rank, world_size=world_size, labels=get_method_class(cfg.method).needs_labels)


# --------------------------------------------------------------------------- loop
def _unwrap(net):
    """The module inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper."""
    return net.module if hasattr(net, "module") else net


def _plain(model: Model) -> Model:
    """The same model with unwrapped networks (shares the parameters)."""
    return Model(model.id, model.config, {k: _unwrap(v) for k, v in model.networks.items()})


def _parameters(model: Model):
    return [p for net in model.networks.values() for p in net.parameters()]


def _batch_rng(seed: int, step: int, batch: int, device) -> BatchRNG:
    return BatchRNG([slice_seed(seed, step * 4096 + i) for i in range(batch)], device)


def flat_state(model: Model) -> dict:
    """``{"<role>.<param>": tensor}`` of the unwrapped networks (the safetensors layout)."""
    return {f"{role}.{k}": v for role, net in model.networks.items() for k, v in _unwrap(net).state_dict().items()}


def state_digest(state: dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a flat state dict (order independent)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def validation_loss(cls, model: Model, source, cfg: TrainConfig, device) -> float:
    """Mean objective on held-out slices with fixed randomness (comparable across steps)."""
    model = _plain(model)
    modes = {role: net.training for role, net in model.networks.items()}
    for net in model.networks.values():
        net.eval()
    losses = []
    with torch.no_grad():
        for b in range(cfg.val_batches):
            g = np.random.default_rng([cfg.seed, 999_999, b])
            x, m, y = source.sample_batch(cfg.batch_size, g)
            rng = _batch_rng(cfg.seed + 7, 10_000_000 + b, x.shape[0], device)
            loss = cls.training_loss(model, x.to(device), m.to(device), rng, labels=y.to(device))
            losses.append(float(loss))
    for role, net in model.networks.items():
        net.train(modes[role])
    return float(np.mean(losses))


# --------------------------------------------------------------------------- EMA / train state / curve
class EMA:
    """Exponential moving average of a model's weights (the weights a run validates and exports).

    ``update()`` after every optimizer step: ``ema = d * ema + (1 - d) * weights`` for floating-point
    tensors (other buffers are copied), with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates
    (the usual warm-up, so that a fresh run's average is not dominated by its random initialisation).
    ``state``: saved EMA weights to continue from (a resumed run); otherwise it starts at ``source``.
    """

    def __init__(self, model_cfg: dict, source: Model, decay: float, state: dict | None = None,
                 updates: int = 0, device=None):
        self.decay = float(decay)
        self.updates = int(updates)
        src = _plain(source)
        self.model = build_model(model_cfg, state if state is not None else flat_state(src), "ema")
        if device is not None:
            self.model.to(device)
        self._pairs = []
        for role, net in self.model.networks.items():
            mine, theirs = net.state_dict(), src.networks[role].state_dict()
            self._pairs += [(mine[k], theirs[k]) for k in mine]

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for e, w in self._pairs:
            if e.is_floating_point():
                e.mul_(d).add_(w.detach().to(e.dtype), alpha=1.0 - d)
            else:
                e.copy_(w)
        self.updates += 1


TRAIN_STATE = "train_state.safetensors"
LEGACY_OPTIMIZER = "optimizer.pt"  # the optimizer state of runs without EMA written before stop 29 (torch format)
BEST_WEIGHTS = "best.safetensors"  # the validated weights at the lowest validation loss
_TRAIN_STATE_FORMAT = "uad-train-state/1"


def save_train_state(model: Model, opt, path: Path) -> None:
    """The online (optimised) weights and the optimizer state in one safetensors file (no pickle)."""
    from safetensors.torch import save_file

    flat = {f"weights.{k}": v.detach().cpu().contiguous().clone() for k, v in flat_state(model).items()}
    sd = opt.state_dict()
    scalars: dict = {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                flat[f"optimizer.{i}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{i}.{k}"] = v
    meta = {"format": _TRAIN_STATE_FORMAT, "param_groups": json.dumps(sd["param_groups"]),
            "scalars": json.dumps(scalars)}
    tmp = path.with_name(path.name + ".tmp")
    save_file(flat, str(tmp), metadata=meta)
    apply_umask(tmp)  # safetensors writes 0600
    os.replace(tmp, path)


def load_train_state(path: Path) -> tuple[dict, dict]:
    """``(weights, optimizer_state_dict)`` from ``save_train_state``'s file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UADError(f"cannot resume: {path} is not a valid safetensors file ({e})") from None
    if meta.get("format") != _TRAIN_STATE_FORMAT:
        raise UADError(f"cannot resume: {path} is not a uad training state (format {meta.get('format')!r})")
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    for k, v in json.loads(meta.get("scalars", "{}")).items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    return weights, {"state": state, "param_groups": json.loads(meta["param_groups"])}


#: Seed of the labelled phantom the learning curve uses for contrasts other than the bundled sample's (T2):
#: far from training (0.., 100000..), calibration (2000000..) and held-out (3000000..) seeds.
CURVE_PHANTOM_SEED = 5_000_000


@functools.lru_cache(maxsize=3)
def _curve_phantom(contrast: str):
    from .phantoms import make_phantom

    return make_phantom(CURVE_PHANTOM_SEED, contrast=contrast, lesion="tumour", spacing=2.0)


def curve_sample(n_slices: int = 24, contrast: str = "T2") -> dict:
    """A cheap sub-volume of a labelled volume of ``contrast``: ``n_slices`` axial slices evenly spaced over
    the brain (at least one through the lesion), with its lesion and brain masks (numpy).

    T2: the bundled sample (Resources/SampleData, a T2 tumour phantom). Other contrasts (the sample is T2,
    so its AP would not measure a FLAIR or T1 model): a tumour phantom of that contrast at 2 mm
    (seed ``CURVE_PHANTOM_SEED``, never used in training, calibration or the held-out set).
    """
    import SimpleITK as sitk

    from .imageio import read_image, sample_paths

    contrast = str(contrast).upper()
    if contrast == "T2":
        sp = sample_paths()
        img = read_image(sp["image"])
        lesion = sitk.GetArrayFromImage(read_image(sp["lesion"])) > 0
        brain = sitk.GetArrayFromImage(read_image(sp["brain_mask"])) > 0
    else:
        ph = _curve_phantom(contrast)
        img = ph.image
        lesion = sitk.GetArrayFromImage(ph.lesion_mask) > 0
        brain = sitk.GetArrayFromImage(ph.brain_mask) > 0
    arr = sitk.GetArrayFromImage(img)
    zs = np.nonzero(brain.reshape(len(brain), -1).any(1))[0]
    pick = np.unique(zs[np.round(np.linspace(0, len(zs) - 1, min(int(n_slices), len(zs)))).astype(int)])
    area = lesion.reshape(len(lesion), -1).sum(1)
    if area[pick].sum() == 0:  # too few slices to meet the lesion: the middle one becomes its largest slice
        pick[len(pick) // 2] = int(np.argmax(area))
        pick = np.unique(pick)

    def sub(a, like):
        out = sitk.GetImageFromArray(np.ascontiguousarray(a[pick]))
        out.SetSpacing(like.GetSpacing())
        out.SetOrigin(like.GetOrigin())
        out.SetDirection(like.GetDirection())
        return out

    return {"image": sub(arr, img), "brain_mask": sub(brain.astype(np.uint8), img), "lesion": lesion[pick],
            "brain": brain[pick], "slices": pick.tolist(), "contrast": contrast}


def sample_ap(model: Model, method: str, preset: str, sample: dict, device) -> float:
    """AP over brain voxels of ``method`` (``preset``) with ``model`` on a ``curve_sample``."""
    import SimpleITK as sitk

    from .metrics import average_precision
    from .pipeline import detect

    modes = {role: net.training for role, net in model.networks.items()}
    try:
        res = detect(sample["image"], method=method, model=model, device=device, seed=0, preset=preset,
                     brain_mask=sample["brain_mask"], mask=False)
    finally:
        for role, net in model.networks.items():
            net.train(modes[role])
    a = sitk.GetArrayFromImage(res.anomaly)
    return float(average_precision(a, sample["lesion"], mask=sample["brain"]))


class LearningCurve:
    """curve.csv (step, seconds, val_loss, ap_<method>...) and curve.png in the run directory."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, resume: bool, step: int):
        self.run_dir, self.cfg = run_dir, cfg
        self.csv = run_dir / "curve.csv"
        self.png = run_dir / "curve.png"
        self.header = ["step", "seconds", "val_loss"] + [f"ap_{m}" for m in cfg.curve_methods]
        self.rows: list[list[str]] = []
        if resume and self.csv.is_file():
            with open(self.csv, newline="") as f:
                r = list(csv.reader(f))
            if r and r[0] == self.header:
                self.rows = [row for row in r[1:] if row and row[0].isdigit() and int(row[0]) <= step]
        self._sample = None
        self.prevalence = None
        self._write()

    def has(self, step: int) -> bool:
        return any(int(r[0]) == step for r in self.rows)

    def due(self, step: int) -> bool:
        return self.cfg.curve_every > 0 and step % self.cfg.curve_every == 0

    def record(self, step: int, seconds: float, val_loss: float, model: Model, device) -> dict:
        aps = {}
        if self.cfg.curve_methods:
            if self._sample is None:
                self._sample = curve_sample(self.cfg.curve_slices, self.cfg.contrast)
                self.prevalence = float(self._sample["lesion"][self._sample["brain"]].mean())
            for m in self.cfg.curve_methods:
                aps[m] = sample_ap(model, m, self.cfg.curve_preset, self._sample, device)
        self.rows.append([str(step), f"{seconds:.1f}", f"{val_loss:.6f}"]
                         + [f"{aps[m]:.6f}" for m in self.cfg.curve_methods])
        self._write()
        self.plot()
        return aps

    def _write(self) -> None:
        tmp = self.csv.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.header)
            w.writerows(self.rows)
        os.replace(tmp, self.csv)

    def plot(self) -> None:
        if self.rows:
            plot_curve(self.csv, self.png, prevalence=self.prevalence, title=curve_title(self.run_dir, self.cfg))


def curve_title(run_dir: Path, cfg: TrainConfig) -> str:
    parts = [f"{Path(run_dir).name}: {cfg.method} objective, batch {cfg.batch_size}"]
    if cfg.ema_decay:
        parts.append(f"EMA {cfg.ema_decay:g}")
    if cfg.t_min or cfg.t_max is not None:
        parts.append(f"t in [{cfg.t_min}, {cfg.t_max if cfg.t_max is not None else 'T'})")
    if cfg.curve_methods:
        where = "sample" if cfg.contrast == "T2" else f"{cfg.contrast} tumour phantom"
        parts.append(f"AP: preset {cfg.curve_preset}, {cfg.curve_slices} {where} slices")
    return ", ".join(parts)


def plot_curve(csv_path: str | os.PathLike, png_path: str | os.PathLike, prevalence: float | None = None,
               title: str = "") -> Path:
    """Validation loss and sample AP against steps, from a curve.csv, as a PNG (matplotlib, Agg canvas)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    fig = curve_figure(rows, prevalence, title)
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(str(tmp), format="png")
    os.replace(tmp, png_path)
    return png_path


def curve_figure(rows: list[dict], prevalence: float | None = None, title: str = ""):
    """The learning-curve figure of curve.csv rows; a long title is wrapped to the figure's width."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [int(r["step"]) for r in rows]
    ap_cols = [c for c in (rows[0].keys() if rows else []) if c.startswith("ap_")]
    fig = Figure(figsize=(9.0, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax1 = fig.add_subplot(1, 2 if ap_cols else 1, 1)
    ax1.plot(steps, [float(r["val_loss"]) for r in rows], "o-", color="tab:blue")
    ax1.set_xlabel("step")
    ax1.set_ylabel("validation loss (held-out phantoms)")
    ax1.grid(alpha=0.3)
    if ap_cols:
        ax2 = fig.add_subplot(1, 2, 2)
        for c in ap_cols:
            ax2.plot(steps, [float(r[c]) for r in rows], "o-", label=c[3:])
        if prevalence is not None:
            ax2.axhline(prevalence, color="grey", ls="--", label="prevalence (chance)")
        ax2.set_xlabel("step")
        ax2.set_ylabel("AP on the sample (brain voxels)")
        ax2.set_ylim(bottom=0)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    if title:  # about 100 characters of 10-point text fit the 9-inch width
        fig.suptitle("\n".join(textwrap.wrap(title, 100)), fontsize=10)
    fig.tight_layout()
    return fig


class _StopRequest:
    """SIGINT / SIGTERM ask the (single-process) loop to checkpoint and stop; a second signal interrupts."""

    def __init__(self, enabled: bool):
        import signal
        import threading

        self.requested = False
        self._old = {}
        if not enabled or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _load_optimizer_state(path: Path):
    """The optimizer state, read without unpickling arbitrary objects (``weights_only=True``)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
        raise UADError(f"{path} is not a plain optimizer state (it was refused: weights-only loading "
                       f"allows tensors and plain containers only): {' '.join(str(e).split())[:200]}") from None


def _read_run(run_dir: Path, target_steps: int | None, method: str | None = None) -> dict:
    """What a resumed run needs, read from ``run_dir`` (rank 0)."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UADError(f"cannot resume: {run_dir} has no config.json (not a training run, or it never started)")
    try:
        saved = json.loads(cfg_path.read_text())
        cfg = TrainConfig.from_dict(saved["train"])
        model_cfg = saved["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UADError(f"cannot resume: {cfg_path} is not a training config ({e})") from None
    if method is not None and method != cfg.method:
        raise UADError(f"cannot resume: {run_dir} trains method {cfg.method!r}, not {method!r}")
    for name in ("model.safetensors", "state.json"):
        if not (run_dir / name).is_file():
            raise UADError(f"cannot resume: {run_dir} has no {name} yet (the run stopped before its first "
                           f"checkpoint; start it again without --resume)")
    if target_steps is not None:
        cfg.steps = max(int(target_steps), cfg.steps)
    state = json.loads((run_dir / "state.json").read_text())
    out = {"cfg": asdict(cfg), "model_cfg": model_cfg, "state": state,
           "weights": load_weights(run_dir / "model.safetensors", str(run_dir)), "optimizer": None, "ema": None}
    if (run_dir / TRAIN_STATE).is_file():  # with EMA, model.safetensors holds the EMA weights
        online, out["optimizer"] = load_train_state(run_dir / TRAIN_STATE)
        if cfg.ema_decay:
            out["ema"] = out["weights"]
        out["weights"] = online
    elif cfg.ema_decay:
        raise UADError(f"cannot resume: {run_dir} is an EMA run but has no {TRAIN_STATE} (the online weights and "
                       f"the optimizer state)")
    elif (run_dir / LEGACY_OPTIMIZER).is_file():  # a run written before stop 29 without EMA
        out["optimizer"] = _load_optimizer_state(run_dir / LEGACY_OPTIMIZER)
    return out


def _open_log(run_dir: Path, resume: bool, step: int):
    """log.csv for appending; on resume, rows after the checkpointed step (lost work) are dropped."""
    path = run_dir / "log.csv"
    header = ["step", "loss", "val_loss", "seconds"]
    rows = []
    if resume and path.is_file():
        with open(path, newline="") as f:
            r = list(csv.reader(f))
        rows = [row for row in r[1:] if row and row[0].isdigit() and int(row[0]) <= step]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, path)
    f = open(path, "a", newline="")
    return f, csv.writer(f)


def train(cfg: TrainConfig, run_dir: str | os.PathLike, resume: bool = False, device: str = "auto",
          progress: bool = True, log: Callable[[str], None] = print, overwrite: bool = True,
          time_limit: float | None = None) -> Path:
    """Train ``cfg.method``'s networks; returns the run directory.

    ``resume``: continue the run in ``run_dir`` with its saved config; the target
    is ``max(cfg.steps, saved steps)``.  ``overwrite=False`` refuses to start a
    new run in a folder that already holds one.  Under ``torchrun`` (``WORLD_SIZE``
    > 1) this trains data-parallel (see the module docstring); every process
    must call it with the same arguments.  ``time_limit`` (seconds of this call): checkpoint and stop
    when it has passed (the run resumes later with ``resume=True``); a single-process run also stops
    that way on SIGINT / SIGTERM (a second signal interrupts at once).
    """
    ctx, dev = setup_distributed(device)
    try:
        return _train(cfg, Path(run_dir), resume, dev, ctx, progress, log, overwrite, time_limit)
    finally:
        cleanup_distributed(ctx)


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, dev: torch.device, ctx: DistContext, progress: bool,
           log: Callable[[str], None], overwrite: bool, time_limit: float | None = None) -> Path:
    main = ctx.is_main
    say = log if (main and log is not None) else (lambda s: None)

    def prepare() -> dict:
        if resume:
            return _read_run(run_dir, cfg.steps, cfg.method)
        if cfg.steps < 1:
            raise UADError(f"steps must be >= 1 for a new run, got {cfg.steps}")
        if not overwrite and (run_dir / "config.json").is_file():
            raise UADError(f"{run_dir} already holds a training run; continue it with --resume, or choose "
                           f"another output folder")
        state = {"step": 0, "best_val": math.inf}
        weights = None
        if cfg.init:
            init = resolve_init(cfg.init, cfg.method)
            model_cfg = model_config_for(cfg, base=init["config"])
            build_model(model_cfg, init["weights"], init["info"]["model"])  # one clear error if they do not fit
            weights, state["init"] = init["weights"], init["info"]
        else:
            model_cfg = model_config_for(cfg)
        return {"cfg": asdict(cfg), "model_cfg": model_cfg, "state": state, "weights": weights, "optimizer": None,
                "ema": None}

    plan = _share_from_main(ctx, prepare)
    cfg = TrainConfig.from_dict(plan["cfg"])
    model_cfg = plan["model_cfg"]
    state = dict(plan["state"])
    cls = get_method_class(cfg.method)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))
    model = build_model(model_cfg, plan["weights"], "run")
    model.to(dev)
    for net in model.networks.values():
        net.train()
    if ctx.enabled:
        _wrap_ddp(model, dev)  # broadcasts rank 0's weights to every process
    plain = _plain(model)

    params = _parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay else \
        torch.optim.Adam(params, lr=cfg.lr)
    if plan["optimizer"] is not None:
        try:
            opt.load_state_dict(plan["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise UADError(f"cannot resume: the optimizer state does not match the model ({e})") from None
    ema = None
    if cfg.ema_decay and main:  # only rank 0 validates and writes; every rank holds the same weights
        ema = EMA(model_cfg, plain, cfg.ema_decay, state=plan["ema"], updates=state.get("ema_updates", 0),
                  device=dev)
    del plan
    stop = _StopRequest(enabled=not ctx.enabled)

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({"train": asdict(cfg), "model": model_cfg}, indent=2))
    if state["step"] >= cfg.steps:
        say(f"{run_dir} is already at step {state['step']} of {cfg.steps}; nothing to do "
            f"(pass a larger --steps to train on)")
        if ctx.enabled:
            import torch.distributed as dist

            dist.barrier()
        return run_dir
    normalisation = model_cfg.get("normalisation")
    source = make_source(cfg, normalisation=normalisation, rank=ctx.rank, world_size=ctx.world_size)
    val_source = make_source(cfg, holdout=True, normalisation=normalisation) if main else None
    for s in (source, val_source):
        if getattr(s, "warning", None):
            say(f"warning: {s.warning}")
    if ctx.enabled:
        say(f"data-parallel training on {ctx.world_size} processes ({dev.type}); batch {cfg.batch_size} per "
            f"process, {cfg.batch_size * ctx.world_size} per step")

    use_amp = cfg.amp and dev.type == "cuda"
    log_f, writer = _open_log(run_dir, resume, state["step"]) if main else (None, None)
    curve = LearningCurve(run_dir, cfg, resume, state["step"]) if main and cfg.curve_every else None
    evaluated = ema.model if ema is not None else plain  # what is validated, evaluated and exported
    bar = None
    if progress and main and state["step"] < cfg.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"train {cfg.method}", unit="step",
                   dynamic_ncols=True)
    t0 = time.time()
    seconds0 = float(state.get("seconds", 0.0))
    state["world_size"] = ctx.world_size
    smooth = None
    first_batch = None
    noise_seed = _rank_seed(cfg.seed, ctx.rank)
    stopped = None

    def validate() -> float:
        """The validation loss of the weights now; a new lowest one also keeps them as best.safetensors.
        A step validated already (val_history's last entry: by the curve, the stop or before a resume) is
        not evaluated again."""
        hist = state.setdefault("val_history", [])
        if hist and hist[-1][0] == state["step"]:
            return hist[-1][1]
        val = validation_loss(cls, evaluated, val_source, cfg, dev)
        if val < state["best_val"]:  # keep the best validated weights beside the latest
            tmp = run_dir / (BEST_WEIGHTS + ".tmp")
            save_weights(evaluated, tmp)
            os.replace(tmp, run_dir / BEST_WEIGHTS)
            state["best_step"] = state["step"]
        state["best_val"] = min(state["best_val"], val)
        hist.append([state["step"], val])
        return val

    def curve_point() -> None:
        val = validate() if state["step"] > 0 else validation_loss(cls, evaluated, val_source, cfg, dev)
        aps = curve.record(state["step"], seconds0 + time.time() - t0, val, evaluated, dev)
        say(f"curve: step {state['step']}, validation loss {val:.4f}"
            + "".join(f", {m} sample AP {v:.3f}" for m, v in aps.items()))

    try:
        if curve is not None and not curve.has(state["step"]):
            curve_point()  # the starting point (a new run: the initial / init model)
        while state["step"] < cfg.steps:
            step = state["step"]
            if not ctx.enabled and (stop.requested or (time_limit is not None and time.time() - t0 > time_limit)):
                stopped = "on request" if stop.requested else "at the time limit"
                break
            g = np.random.default_rng(_data_seed(cfg.seed, step, ctx.rank))
            x, m, y = source.sample_batch(cfg.batch_size, g)
            if first_batch is None:
                first_batch = state_digest({"x": x})
            x, m, y = x.to(dev), m.to(dev), y.to(dev)
            rng = _batch_rng(noise_seed, step, x.shape[0], dev)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
                loss = cls.training_loss(model, x, m, rng, labels=y)
            lv = _mean_over_ranks(ctx, loss)  # every process sees the same value, so all stop together
            if not math.isfinite(lv):
                raise UADError(f"training diverged at step {step} (loss {lv})")
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over the processes here
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema.update()
            state["step"] = step + 1
            smooth = lv if smooth is None else 0.98 * smooth + 0.02 * lv
            last = state["step"] == cfg.steps
            if not main:
                continue
            val = ""
            if state["step"] % cfg.val_every == 0 or last:
                val = validate()
            state["seconds"] = seconds0 + time.time() - t0
            writer.writerow([state["step"], f"{lv:.6f}", f"{val:.6f}" if val != "" else "",
                             f"{state['seconds']:.1f}"])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{smooth:.4f}", val=f"{val:.4f}" if val != "" else "-")
            if state["step"] % cfg.checkpoint_every == 0 or last:
                log_f.flush()
                _checkpoint(plain, opt, state, run_dir, cfg, ctx.world_size, ema)
            if curve is not None and (curve.due(state["step"]) or last):
                curve_point()
        if stopped is not None:
            log_f.flush()
            if state["step"] > 0 and main:  # the weights it stops with count for the best ones too
                validate()
            state["seconds"] = seconds0 + time.time() - t0
            _checkpoint(plain, opt, state, run_dir, cfg, ctx.world_size, ema)
            if curve is not None and not curve.has(state["step"]):
                curve_point()
            say(f"stopped {stopped} at step {state['step']} of {cfg.steps}; checkpoint written (continue with "
                f"--resume)")
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        if log_f is not None:
            log_f.close()
        if hasattr(source, "close"):
            source.close()
        if val_source is not None and hasattr(val_source, "close"):
            val_source.close()
    _debug_dump(ctx, plain, state, first_batch, source)
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()  # nobody returns before rank 0's last checkpoint is on disk
    return run_dir


def _debug_dump(ctx: DistContext, model: Model, state: dict, first_batch: str | None, source) -> None:
    folder = os.environ.get(DEBUG_DIR_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    info = {"rank": ctx.rank, "world_size": ctx.world_size, "step": state["step"],
            "weights_sha256": state_digest(flat_state(model)), "first_batch_sha256": first_batch,
            "data": source.describe()}
    if hasattr(source, "seeds"):
        info["phantom_seeds"] = list(source.seeds)
    Path(folder, f"rank{ctx.rank}.json").write_text(json.dumps(info, indent=2))


def _checkpoint(model: Model, opt, state: dict, run_dir: Path, cfg: TrainConfig, world_size: int = 1,
                ema: EMA | None = None) -> None:
    """model.safetensors (the EMA weights with EMA), train_state.safetensors (the online weights and the
    optimizer state), state.json, model.json; a legacy optimizer.pt of the run is removed once replaced."""
    plain = _plain(model)  # the unwrapped modules' weights, never DDP's "module." names
    tmp = run_dir / "model.safetensors.tmp"
    digest = save_weights(ema.model if ema is not None else plain, tmp)
    os.replace(tmp, run_dir / "model.safetensors")
    save_train_state(plain, opt, run_dir / TRAIN_STATE)
    if ema is not None:
        state["ema_updates"] = ema.updates
    (run_dir / LEGACY_OPTIMIZER).unlink(missing_ok=True)
    (run_dir / "state.json").write_text(json.dumps(state, indent=2, default=float))
    best = state.get("best_val")
    entry = dict(model.config)
    training = {"data": cfg.data, "contrast": cfg.contrast, "steps": state["step"],
                "batch_size": cfg.batch_size, "world_size": world_size, "lr": cfg.lr, "seed": cfg.seed,
                "small": cfg.small, "best_val_loss": best if best is not None and math.isfinite(best) else None}
    if ema is not None:
        training["ema_decay"] = cfg.ema_decay
        training["weights"] = "ema"
    if "train_t_min" in entry:
        training["timesteps"] = [entry["train_t_min"], entry["train_t_max"]]
    if cfg.thick_slice_fraction > 0:
        training["thick_slices"] = {"fraction": cfg.thick_slice_fraction, "mm": list(cfg.thick_slice_mm)}
    if cfg.strip_error_fraction > 0:
        training["strip_errors"] = {"fraction": cfg.strip_error_fraction, "mm": list(cfg.strip_error_mm)}
    if state.get("init"):
        training["init"] = state["init"]
    if state.get("seconds") is not None:
        training["wall_seconds"] = round(float(state["seconds"]), 1)
    entry.update({"file": "model.safetensors", "sha256": digest, "training": training})
    tmp = run_dir / "model.json.tmp"
    tmp.write_text(json.dumps(entry, indent=2, default=float))
    os.replace(tmp, run_dir / "model.json")


# --------------------------------------------------------------------------- export / calibration
def export_run(run_dir: str | os.PathLike, models_dir: str | os.PathLike, model_id: str,
               extra: dict | None = None, weights: str = "latest", before: str | None = None) -> dict:
    """Copy a run's weights into a model folder and add / replace its manifest entry.

    ``weights``: "latest" (model.safetensors) or "best" (best.safetensors, the validated weights at the
    lowest validation loss; the entry's ``training`` then records that step and loss, and the run's ``run_steps``).
    ``before``: place the entry before that model's in the manifest (``uad.zoo.upsert_manifest_entry``).
    (For the per-user model folder use ``uad.zoo.import_model`` / ``uad models import``.)
    """
    import shutil

    if weights not in ("latest", "best"):
        raise UADError(f"export_run: weights must be 'latest' or 'best', not {weights!r}")
    run_dir, models_dir = Path(run_dir), Path(models_dir)
    entry = json.loads((run_dir / "model.json").read_text())
    src = run_dir / ("model.safetensors" if weights == "latest" else BEST_WEIGHTS)
    if not src.is_file():
        raise UADError(f"{run_dir}: no {src.name} (runs record best weights since stop 27)")
    if weights == "best":
        st = json.loads((run_dir / "state.json").read_text())
        entry.setdefault("training", {}).update({"steps": st.get("best_step"), "best_val_loss": st.get("best_val"),
                                                 "run_steps": st.get("step"), "exported": "best validation weights"})
    dest = models_dir / model_id
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "model.safetensors.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest / "model.safetensors")
    entry["id"] = model_id
    entry["file"] = f"{model_id}/model.safetensors"
    entry["sha256"] = sha256_file(dest / "model.safetensors")
    if extra:
        _deep_update(entry, extra)
    upsert_manifest_entry(models_dir, entry, before=before)
    return entry


def calibrate_threshold(model: Model, method: str, contrast: str = "T2", n_volumes: int = 3,
                        quantile: float = 0.95, preset: str | None = None, seed: int = 2_000_000,
                        device: str = "auto", spacing: float | None = 1.5) -> dict:
    """Anomaly score at which ~(1-quantile) of healthy brain voxels are flagged.

    Runs the method on ``n_volumes`` held-out healthy phantoms (seeds far from
    the training seeds) and returns the quantile of the in-brain anomaly values.
    """
    import SimpleITK as sitk

    from .phantoms import make_phantom
    from .pipeline import detect

    values = []
    for i in range(n_volumes):
        ph = make_phantom(seed + i, contrast=contrast, lesion="none", spacing=spacing)
        res = detect(ph.image, method=method, model=model, device=device, seed=i, preset=preset,
                     brain_mask=ph.brain_mask, mask=False)
        a = sitk.GetArrayFromImage(res.anomaly)
        b = sitk.GetArrayFromImage(ph.brain_mask) > 0
        values.append(a[b])
    v = np.concatenate(values)
    return {"threshold": float(np.quantile(v, quantile)), "quantile": quantile, "n_volumes": n_volumes,
            "n_voxels": int(v.size), "preset": preset}


# --------------------------------------------------------------------------- CLI
#: Command-line options that map onto TrainConfig fields (dest -> field).
_CLI_FIELDS = {"data": "data", "contrast": "contrast", "steps": "steps", "batch_size": "batch_size",
               "image_size": "image_size", "lr": "lr", "seed": "seed", "init": "init", "ema_decay": "ema_decay",
               "t_min": "t_min", "t_max": "t_max", "curve_every": "curve_every", "curve_methods": "curve_methods",
               "curve_preset": "curve_preset", "curve_slices": "curve_slices",
               "thick_slice_fraction": "thick_slice_fraction", "strip_error_fraction": "strip_error_fraction"}


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a method's networks on healthy data (one CPU, one GPU, or N GPUs with torchrun)",
        description="Train a method on MNI-based phantoms or a folder of healthy volumes. Settings: TrainConfig "
                    "defaults < --config JSON < command-line options. Data-parallel: "
                    "'torchrun --nproc_per_node=N -m uad.cli train ...' (one process per GPU; Gloo on CPU). "
                    "Import the result with 'uad models import RUN_DIR --id NAME'.")
    p.add_argument("--method", required=True, help="method name (see 'uad methods')")
    p.add_argument("--data", default=None, help="'phantoms' (default) or a folder of healthy NIfTI/NRRD volumes "
                                                "(brain masks as <stem>_brainmask.nii.gz beside them)")
    p.add_argument("--contrast", default=None, type=str.upper, choices=["T1", "T2", "FLAIR"],
                   help="contrast of the phantoms / of the data (default T2)")
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--config", metavar="FILE", help="JSON file with TrainConfig fields (e.g. steps, batch_size, "
                                                   "image_size, lr, model_overrides)")
    p.add_argument("--steps", type=int, help="total steps (with --resume: the new total; default: the saved one)")
    p.add_argument("--batch-size", type=int, help="slices per step and process")
    p.add_argument("--image-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--init", metavar="MODEL", help="start from this model's weights (and architecture): a model "
                                                   "id (see 'uad models'), a run folder or a .safetensors file")
    p.add_argument("--ema-decay", type=float, metavar="D", help="keep an EMA of the weights with this decay "
                                                                 "(e.g. 0.999); it is what is validated and "
                                                                 "exported (default 0: no EMA)")
    p.add_argument("--t-min", type=int, help="smallest training timestep (DDPM family; default 0)")
    p.add_argument("--t-max", type=int, help="training timesteps below this (DDPM family; default: all T); "
                                             "cover the levels of the presets you use")
    p.add_argument("--curve-every", type=int, metavar="N", help="learning curve every N steps: validation loss "
                                                                "(+ sample AP) in curve.csv and curve.png")
    p.add_argument("--curve-method", dest="curve_methods", action="append", metavar="METHOD",
                   help="method whose AP on the bundled sample the learning curve tracks (repeatable)")
    p.add_argument("--curve-preset", help="preset of the curve's methods (default fast)")
    p.add_argument("--curve-slices", type=int, metavar="N", help="axial slices of the sample the curve uses "
                                                                 "(default 24)")
    p.add_argument("--thick-slices", dest="thick_slice_fraction", type=float, metavar="FRACTION",
                   help="phantoms: acquire this fraction of the training phantoms with thick slices (3-6 mm, "
                        "axial / coronal / sagittal) resampled back onto the grid, as inference sees thick-slice "
                        "scans (default 0: off; 'thick_slice_mm' in --config sets the range)")
    p.add_argument("--strip-errors", dest="strip_error_fraction", type=float, metavar="FRACTION",
                   help="phantoms: build this fraction of the training phantoms with a head and skull-strip them "
                        "with a brain mask whose boundary is moved out and in by up to 2-6 mm, as inference meets "
                        "a skull stripper's mask (default 0: off; 'strip_error_mm' in --config sets the range)")
    p.add_argument("--time-limit", type=float, metavar="MIN", help="checkpoint and stop after MIN minutes (resume "
                                                                  "later with --resume); SIGINT / SIGTERM also "
                                                                  "checkpoint and stop")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda (under torchrun: the GPU of "
                                                    "LOCAL_RANK)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR with its saved settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli_train)


def config_from_args(args) -> TrainConfig:
    """TrainConfig defaults < ``--config`` JSON < explicit command-line options."""
    overrides: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UADError(f"{path}: no such config file")
        try:
            overrides.update(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise UADError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(overrides, dict):
            raise UADError(f"{path} must hold a JSON object of TrainConfig fields")
    overrides["method"] = args.method
    for dest, name in _CLI_FIELDS.items():
        v = getattr(args, dest, None)
        if v is not None:
            overrides[name] = v
    method = overrides.pop("method")
    try:
        return default_config(method, **overrides)
    except ValueError as e:  # unknown method
        raise UADError(" ".join(str(e).split())) from None


def _cli_train(args) -> int:
    ctx = distributed_env()
    say = print if ctx.is_main else (lambda s: None)
    run = Path(args.output)
    if args.time_limit is not None and not args.time_limit > 0:
        raise UADError(f"--time-limit must be a positive number of minutes, got {args.time_limit}")
    if args.time_limit is not None and ctx.enabled:
        raise UADError("--time-limit is for single-process training (under torchrun, stop the job and --resume)")
    if args.resume:
        given = [f"--{d.replace('_', '-').replace('curve-methods', 'curve-method')}" for d in _CLI_FIELDS
                 if d != "steps" and getattr(args, d) is not None]
        if args.config:
            given.append("--config")
        if given:
            say(f"note: resuming with the run's saved settings; ignoring {', '.join(given)}")
        try:
            get_method_class(args.method)
        except ValueError as e:
            raise UADError(" ".join(str(e).split())) from None
        cfg = default_config(args.method, steps=args.steps if args.steps is not None else 0)
    else:
        cfg = config_from_args(args)
        if run.exists() and not run.is_dir():
            raise UADError(f"{run}: exists and is not a folder")
    try:
        train(cfg, run, resume=args.resume, device=args.device, progress=not args.no_progress, log=say,
              overwrite=False, time_limit=None if args.time_limit is None else 60.0 * args.time_limit)
    except SharedError:
        if ctx.is_main:
            raise
        return 1  # rank 0 reports it
    if ctx.is_main:
        state = json.loads((run / "state.json").read_text())
        best = state.get("best_val")
        print(f"run directory: {run} (step {state['step']}"
              + (f", best validation loss {best:.4g}" if isinstance(best, float) and math.isfinite(best) else "")
              + ")")
        print(f"weights: {run / 'model.safetensors'}  (import with 'uad models import {run} --id NAME')")
    return 0
