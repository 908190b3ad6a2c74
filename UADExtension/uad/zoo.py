"""Model zoo: manifests, checksums, safetensors weights, import / download / remove.

A model is data: a manifest entry says which methods a weights file serves, the
network configs, the noise schedule, the input resolution and normalisation,
what it was trained on, its sha256 and its calibrated anomaly threshold.
Weights are safetensors (no pickle, so loading never runs code from the file).

Search order for manifests (the first entry with a given id wins):
``$UAD_MODELS_DIR`` (os.pathsep-separated), the repository's / extension's
``models/`` folder ("bundled"), the per-user cache (``$UAD_CACHE_DIR`` or
``~/.cache/uad``)/models ("user cache").

An entry names its weights by ``file`` (relative to its manifest's folder),
by ``url`` (downloaded on request into the user cache, ``download_model``), or
both (the local file is used when present).  ``sha256`` is required: nothing is
loaded, imported or downloaded that does not match it.

Python API (used by the ``uad models`` command and the Slicer module)::

    list_models()                       -> [ModelEntry]      every visible entry
    find_model(id | method=..)          -> ModelEntry
    load_model(id | entry, device=..)   -> Model             checksum verified first
    verify(entry)                       -> sha256 hex digest (ModelError on mismatch)
    import_model(path, model_id=None)   -> ModelEntry        copy into the user cache
    download_model(id, progress=True)   -> Path              fetch ``url``, verify, move into place
    remove_model(id)                    -> Path              user-cache models only
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import ModelError
from .files import apply_umask

MANIFEST = "manifest.json"
#: Model ids are folder names in the user cache.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
DOWNLOAD_TIMEOUT = 30.0  # seconds without data before a download counts as failed

USER_CACHE = "user cache"
BUNDLED = "bundled"
MODELS_DIR_ENV = "UAD_MODELS_DIR"


def user_cache_dir() -> Path:
    return Path(os.environ.get("UAD_CACHE_DIR", Path.home() / ".cache" / "uad"))


def user_models_dir() -> Path:
    """The per-user model folder: imported and downloaded models live here."""
    return user_cache_dir() / "models"


def bundled_dirs() -> list[Path]:
    here = Path(__file__).resolve()
    # <repo>/UADExtension/uad/zoo.py -> <repo>/models ; installed extension: <module>/Resources/models
    return [here.parents[2] / "models", here.parents[1] / "Resources" / "models"]


def _env_dirs() -> list[Path]:
    env = os.environ.get(MODELS_DIR_ENV)
    return [Path(p) for p in env.split(os.pathsep) if p] if env else []


def _candidate_dirs() -> list[Path]:
    dirs = _env_dirs() + bundled_dirs() + [user_models_dir()]
    seen, out = set(), []
    for d in dirs:
        key = _norm(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _norm(p: Path) -> str:
    return os.path.normcase(os.path.abspath(os.path.expanduser(str(p))))


def _same_dir(a: Path, b: Path) -> bool:
    return _norm(a) == _norm(b)


def _inside(path: Path, folder: Path) -> bool:
    p, f = _norm(path), _norm(folder)
    return p != f and p.startswith(f.rstrip(os.sep) + os.sep)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not ID_PATTERN.match(model_id) or model_id in (".", ".."):
        raise ModelError(f"invalid model id {model_id!r}: use letters, digits, '.', '_', '+' or '-' "
                         f"(starting with a letter or digit)")
    return model_id


# ----------------------------------------------------------------------------- entries
@dataclass
class ModelEntry:
    """One manifest entry plus the folder its relative paths are resolved from."""

    data: dict
    root: Path

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def methods(self) -> list[str]:
        return list(self.data.get("methods", []))

    @property
    def contrast(self) -> str | None:
        return self.data.get("contrast")

    @property
    def url(self) -> str | None:
        return self.data.get("url") or None

    @property
    def location(self) -> str:
        """``"user cache"``, ``"bundled"`` or ``"UAD_MODELS_DIR"`` (where the manifest entry lives)."""
        if _same_dir(self.root, user_models_dir()):
            return USER_CACHE
        if any(_same_dir(self.root, d) for d in bundled_dirs()):
            return BUNDLED
        if any(_same_dir(self.root, d) for d in _env_dirs()):
            return MODELS_DIR_ENV
        return str(self.root)

    @property
    def local_path(self) -> Path | None:
        """The ``file`` of the entry, resolved against its manifest's folder (None without ``file``)."""
        f = self.data.get("file")
        return (self.root / f).resolve() if f else None

    @property
    def download_path(self) -> Path | None:
        """Where ``download_model`` puts the weights of a ``url`` entry (None without ``url``)."""
        if not self.url:
            return None
        if self.location == USER_CACHE and self.local_path is not None:
            return self.local_path
        name = Path(self.data.get("file") or "").name or _url_basename(self.url) or "model.safetensors"
        return user_models_dir() / check_model_id(self.id) / name

    @property
    def weights_path(self) -> Path:
        """The weights file to load: the local file if present, else the downloaded copy, else where it should be."""
        local, dl = self.local_path, self.download_path
        for p in (local, dl):
            if p is not None and p.is_file():
                return p
        if local is not None:
            return local
        if dl is not None:
            return dl
        raise ModelError(f"model {self.id}: its manifest entry has neither 'file' nor 'url'")

    @property
    def available(self) -> bool:
        """Whether the weights file is on this machine (not whether it is intact: see ``verify``)."""
        try:
            return self.weights_path.is_file()
        except ModelError:
            return False

    @property
    def card_path(self) -> Path | None:
        """The model card, which must lie inside the manifest's folder (``ModelError`` otherwise)."""
        c = self.data.get("card")
        if not c:
            return None
        if not isinstance(c, str):
            raise ModelError(f"model {self.id}: manifest entry: card must be a path (a string), got {c!r}")
        p = (self.root / c).resolve()
        if not _inside(p, self.root.resolve()):
            raise ModelError(f"model {self.id}: the card path {c} points outside the model folder {self.root}; "
                             f"refusing to read it")
        return p

    @property
    def problems(self) -> list[str]:
        """What is wrong with the entry's fields (wrong types, a card outside the folder); [] when fine."""
        return entry_problems(self.data, self.root)

    @property
    def threshold_text(self) -> str:
        t = self.data.get("threshold")
        if t is None:
            return "-"
        if isinstance(t, (int, float)):
            return f"{t:.4g}"
        if isinstance(t, dict):
            parts = []
            for k, v in t.items():
                if isinstance(v, dict):
                    v = v.get("default", next(iter(v.values()), None))
                parts.append(f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}")
            return ",".join(parts)
        return str(t)

    @property
    def status(self) -> str:
        if self.available:
            return ""
        return "not downloaded" if self.url else "weights missing"

    def summary(self) -> str:
        bad = self.problems
        if bad:
            return f"{self.id:28s} (invalid: {bad[0]}{'; ...' if len(bad) > 1 else ''})  {self.location}"
        where = self.location + (f" ({self.status})" if self.status else "")
        size = self.data.get("image_size")
        return (f"{self.id:28s} {','.join(self.methods) or '-':24s} {self.contrast or '-':8s} "
                f"{f'{size}x{size}' if size else '-':9s} {self.threshold_text:28s} {where}")


SUMMARY_HEADER = f"{'ID':28s} {'METHODS':24s} {'CONTRAST':8s} {'SIZE':9s} {'THRESHOLD':28s} LOCATION"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def entry_problems(data: dict, root: Path | None = None) -> list[str]:
    """Type checks of a manifest entry's fields (each problem one short sentence)."""
    out = []

    def bad(field, want):
        out.append(f"{field} must be {want}, got {data.get(field)!r}"[:200])

    if "methods" in data and not (isinstance(data["methods"], list)
                                  and all(isinstance(m, str) for m in data["methods"])):
        bad("methods", "a list of method names")
    if "image_size" in data and not (isinstance(data["image_size"], int) and not isinstance(data["image_size"], bool)
                                     and data["image_size"] >= 8):
        bad("image_size", "an integer >= 8")
    nets = data.get("networks", {})
    if not isinstance(nets, dict) or not all(isinstance(v, dict) for v in nets.values()):
        bad("networks", "an object of network configs")
    t = data.get("threshold")
    if t is not None and not _is_number(t):
        if isinstance(t, dict):
            for k, v in t.items():
                vals = v.values() if isinstance(v, dict) else [v]
                if not all(x is None or _is_number(x) for x in vals):
                    out.append(f"threshold must be a number (or numbers per method / preset), got {t!r}"[:200])
                    break
        else:
            bad("threshold", "a number (or numbers per method / preset)")
    for field in ("normalisation", "schedule"):
        if field in data and data[field] is not None and not isinstance(data[field], dict):
            bad(field, "an object")
    if "intensity_range" in data and not (isinstance(data["intensity_range"], (list, tuple))
                                          and len(data["intensity_range"]) == 2
                                          and all(_is_number(x) for x in data["intensity_range"])):
        bad("intensity_range", "two numbers")
    for field in ("file", "url", "sha256", "card", "contrast", "noise"):
        if data.get(field) is not None and not isinstance(data[field], str):
            bad(field, "a string")
    c = data.get("card")
    if root is not None and isinstance(c, str) and c and not _inside((root / c).resolve(), Path(root).resolve()):
        out.append(f"the card path {c} points outside the model folder")
    return out


def _check_entry(entry: "ModelEntry") -> None:
    bad = entry.problems
    if bad:
        raise ModelError(f"model {entry.id}: invalid manifest entry in {entry.root / MANIFEST}: {'; '.join(bad)}")


#: Manifests that ``list_models`` could not read (path, reason); reported by ``manifest_warnings``.
_SKIPPED_MANIFESTS: dict[str, str] = {}


def manifest_warnings() -> list[str]:
    """One line per manifest (or entry) skipped by the last ``list_models`` call."""
    return [f"skipped the model manifest {p}: {why}" for p, why in _SKIPPED_MANIFESTS.items()]


def _read_manifest(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"model manifest {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models", []), list):
        raise ModelError(f"model manifest {path} must be an object with a 'models' list")
    data.setdefault("models", [])
    return data


def _write_manifest(path: Path, data: dict) -> None:
    """Atomically replace ``path`` (write a temporary file beside it, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2, default=float) + "\n")
        apply_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def upsert_manifest_entry(models_dir: str | os.PathLike, entry: dict, before: str | None = None) -> None:
    """Add ``entry`` to ``models_dir/manifest.json``, replacing an entry with the same id in place (same
    position in the list, so a re-bundled model keeps its place and a diff of the manifest shows one entry).
    With ``before`` (the id of another entry, which must exist) the entry is placed just before that one instead:
    ``find_model`` takes the first in manifest order where neither has a measurement for a method, so it
    becomes the default there until the held-out measurements say otherwise.

    The read-modify-write holds an exclusive lock (POSIX ``flock`` on a file in the temporary
    directory named after the manifest's path) so that concurrent imports or trainings exporting
    into the same folder do not lose entries; nothing is added to the models folder itself.
    """
    path = Path(models_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    with _manifest_lock(path):
        data = _read_manifest(path) if path.is_file() else {"models": []}
        ids = [m.get("id") for m in data["models"]]
        if before is not None and before not in ids:
            raise ModelError(f"{path}: no entry {before!r} to place {entry['id']!r} before")
        at = ids.index(entry["id"]) if entry["id"] in ids else len(ids)
        models = [m for m in data["models"] if m.get("id") != entry["id"]]
        if before is not None:
            at = [m.get("id") for m in models].index(before)
        models.insert(at, entry)
        data["models"] = models
        _write_manifest(path, data)


class _manifest_lock:
    def __init__(self, manifest: Path):
        import tempfile

        key = hashlib.sha1(str(manifest.resolve()).encode()).hexdigest()[:16]
        self.path = Path(tempfile.gettempdir()) / f"uad-manifest-{key}.lock"
        self.fh = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; single writer assumed
            return self
        self.fh = open(self.path, "a")
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            import fcntl

            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
        return False


def list_models(dirs: list[Path] | None = None) -> list[ModelEntry]:
    """All manifest entries found (first occurrence of an id wins)."""
    out: dict[str, ModelEntry] = {}
    _SKIPPED_MANIFESTS.clear()
    for d in dirs or _candidate_dirs():
        m = Path(d) / MANIFEST
        if not m.is_file():
            continue
        try:  # one broken manifest (e.g. in the user cache) must not hide the others
            models = _read_manifest(m)["models"]
        except (ModelError, OSError, UnicodeDecodeError) as e:
            _SKIPPED_MANIFESTS[str(m)] = " ".join(str(e).split()).replace(f"model manifest {m} ", "")
            continue
        for entry in models:
            if not isinstance(entry, dict) or not entry.get("id"):
                continue
            if not isinstance(entry["id"], str):
                _SKIPPED_MANIFESTS[str(m)] = f"an entry's id is not a string ({entry['id']!r})"
                continue
            if entry["id"] not in out:
                out[entry["id"]] = ModelEntry(entry, Path(d))
    return list(out.values())


def find_model(model_id: str | None = None, method: str | None = None, contrast: str | None = None) -> ModelEntry:
    """Entry by id, or the default model serving ``method`` (preferring ``contrast``, then models on disk).

    Among the models on disk of the same contrast that serve ``method``, the default is the one whose
    manifest entry measured the best mean AP for ``method`` (``uad.selection.measured_rank``: a measurement
    on the whole held-out set outranks one on its quick subset, which outranks one on phantoms); models
    without a measurement for it follow, in manifest order, as do all models when none was measured."""
    entries = list_models()
    if model_id:
        for e in entries:
            if e.id == model_id:
                return e
        known = ", ".join(e.id for e in entries) or "none"
        skipped = manifest_warnings()
        raise ModelError(f"no model with id {model_id!r} (known: {known}); see 'uad models'"
                         + (f"; {skipped[0]}" if skipped else ""))
    cands = [e for e in entries if method is None or method in e.methods]
    if contrast:
        same = [e for e in cands if (e.contrast or "").upper() == contrast.upper()]
        cands = same or cands
    if not cands:
        raise ModelError(f"no model is available for method {method!r}; train one with 'uad train' "
                         f"or import one with 'uad models import'")
    cands.sort(key=lambda e: not e.available)  # stable: manifest order among models on disk
    if method is not None and contrast and len(cands) > 1 and cands[0].available:
        from .selection import measured_rank

        top = [e for e in cands if e.available and (e.contrast or "").upper() == contrast.upper()]
        ranks = [measured_rank(e, method) for e in top]
        if any(r is not None for r in ranks):
            best = max(range(len(top)), key=lambda i: (ranks[i] is not None, ranks[i] or (0, 0.0), -i))
            return top[best]
    return cands[0]


def verify(entry: ModelEntry) -> str:
    """Check the weights file against the manifest sha256; returns the digest."""
    _check_entry(entry)
    p = entry.weights_path
    if not p.is_file():
        if entry.url:
            raise ModelError(f"model {entry.id} is not downloaded yet; run 'uad models download {entry.id}' "
                             f"(from {entry.url})")
        raise ModelError(f"model {entry.id}: weights file {p} is missing")
    expected = entry.data.get("sha256")
    if not expected:
        raise ModelError(f"model {entry.id}: the manifest has no sha256 for {p.name}; refusing to load it")
    digest = sha256_file(p)
    if digest != str(expected).lower():
        raise ModelError(f"model {entry.id}: checksum mismatch for {p} (expected {str(expected)[:12]}..., "
                         f"got {digest[:12]}...); the file was modified or is corrupt")
    return digest


# ----------------------------------------------------------------------------- models
@dataclass
class Model:
    """Networks plus everything a method needs to know about them."""

    id: str
    config: dict
    networks: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.config.get("image_size", 64))

    @property
    def schedule(self) -> dict:
        return dict(self.config.get("schedule", {}))

    @property
    def noise(self) -> str:
        return self.config.get("noise", "gaussian")

    @property
    def noise_options(self) -> dict:
        """Options of the training noise (simplex amplitude / frequency; ``uad.noise.options_for``)."""
        from .noise import options_for

        return options_for(self.config)

    @property
    def threshold(self) -> float | None:
        """The calibrated threshold when it is one number (per-method dicts: ``uad.pipeline.model_threshold``)."""
        t = self.config.get("threshold")
        return float(t) if isinstance(t, (int, float)) else None

    @property
    def intensity_range(self) -> tuple[float, float]:
        r = self.config.get("intensity_range", [-1.0, 1.0])
        return float(r[0]), float(r[1])

    @property
    def normalisation(self) -> dict:
        return dict(self.config.get("normalisation", {}))

    def to(self, device) -> "Model":
        for k, net in self.networks.items():
            self.networks[k] = net.to(device).eval()
        return self

    def net(self, role: str):
        if role not in self.networks:
            raise ModelError(f"model {self.id} has no {role!r} network (has: {', '.join(self.networks)})")
        return self.networks[role]


def build_model(config: dict, state: dict | None = None, model_id: str = "unsaved") -> Model:
    """Networks from a config dict, optionally filled from a flat ``role.param`` state dict."""
    from .networks import build_network

    nets = {}
    for role, net_cfg in config.get("networks", {}).items():
        net = build_network(net_cfg)
        if state is not None:
            prefix = role + "."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                raise ModelError(f"model {model_id}: weights have no tensors for network {role!r}")
            try:
                missing, unexpected = net.load_state_dict(sub, strict=False)
            except RuntimeError as e:  # tensor shapes differ from the config's
                n = str(e).count("size mismatch")
                raise ModelError(f"model {model_id}: weights do not match the {role!r} network config "
                                 f"({n} tensor(s) of another shape)") from None
            if missing or unexpected:
                raise ModelError(f"model {model_id}: weights do not match the {role!r} network config "
                                 f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
        net.eval()
        nets[role] = net
    return Model(model_id, dict(config), nets)


def save_weights(model: Model, path: str | os.PathLike) -> str:
    """Write all networks to one safetensors file; returns its sha256."""
    from safetensors.torch import save_file

    flat = {}
    for role, net in model.networks.items():
        for k, v in net.state_dict().items():
            flat[f"{role}.{k}"] = v.detach().cpu().contiguous()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(path), metadata={"uad_model": model.id})
    apply_umask(path)  # safetensors writes 0600
    return sha256_file(path)


def load_weights(path: str | os.PathLike, model_id: str = "?") -> dict:
    """A flat state dict from a safetensors file (no pickle involved)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"model {model_id}: {path} is not a valid safetensors file ({e})") from None


def load_model(model: str | ModelEntry | None = None, method: str | None = None,
               contrast: str | None = None, device="cpu") -> Model:
    """Verify and load a model by id / entry (or the default model of ``method``)."""
    entry = model if isinstance(model, ModelEntry) else find_model(model, method, contrast)
    verify(entry)
    m = build_model(entry.data, load_weights(entry.weights_path, entry.id), entry.id)
    return m.to(device)


# ----------------------------------------------------------------------------- import
def _entry_from_json(path: Path, weights_name: str | None = None) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("models"), list):  # a manifest
        models = [m for m in data["models"] if isinstance(m, dict)]
        if weights_name is not None:
            models = [m for m in models if Path(m.get("file") or "").name == weights_name] or models
        if len(models) != 1:
            raise ModelError(f"{path} holds {len(models)} model entries; import its folder instead "
                             f"(uad models import FOLDER --only ID)")
        data = models[0]
    if not isinstance(data, dict) or not isinstance(data.get("networks"), dict):
        raise ModelError(f"{path} is not a model manifest entry (it has no 'networks')")
    return dict(data)


def _sources(src: Path, model_id: str | None, only) -> list[ModelEntry]:
    """The entries to import from ``src`` (a run folder, a model folder, a manifest, a model.json or weights)."""
    if not src.exists():
        raise ModelError(f"{src}: no such file or folder")
    if src.is_dir():
        if (src / MANIFEST).is_file():
            return _manifest_sources(src, model_id, only)
        if (src / "model.json").is_file():
            return _run_sources(src / "model.json", model_id)
        st = sorted(src.glob("*.safetensors"))
        if len(st) == 1 and st[0].with_suffix(".json").is_file():
            return _weights_sources(st[0], model_id)
        raise ModelError(f"{src}: neither a {MANIFEST}, a training run (model.json + model.safetensors) nor "
                         f"a .safetensors file with its .json entry found")
    if src.name == MANIFEST:
        return _manifest_sources(src.parent, model_id, only)
    if src.suffix == ".json":
        return _run_sources(src, model_id)
    if src.suffix == ".safetensors":
        return _weights_sources(src, model_id)
    raise ModelError(f"{src}: expected a folder, a manifest.json / model.json, or a .safetensors file")


def _manifest_sources(folder: Path, model_id, only) -> list[ModelEntry]:
    entries = list_models([folder])
    if only:
        missing = sorted(set(only) - {e.id for e in entries})
        if missing:
            raise ModelError(f"{folder / MANIFEST} has no model(s) {', '.join(missing)}")
        entries = [e for e in entries if e.id in only]
    if model_id:
        if len(entries) != 1:
            raise ModelError(f"--id renames a single model, but {folder / MANIFEST} has {len(entries)}; "
                             f"select one with --only")
        entries[0] = ModelEntry(dict(entries[0].data, id=model_id), entries[0].root)
    return entries


def _default_id(name: str) -> str:
    cand = re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-.") or "model"
    return cand if ID_PATTERN.match(cand) else "model"


def _run_sources(json_path: Path, model_id) -> list[ModelEntry]:
    data = _entry_from_json(json_path)
    folder = json_path.parent
    if not data.get("file"):
        data["file"] = "model.safetensors"
    data["id"] = model_id or data.get("id") or _default_id(folder.resolve().name)
    return [ModelEntry(data, folder)]


def _weights_sources(weights: Path, model_id) -> list[ModelEntry]:
    side = weights.with_suffix(".json")
    if not side.is_file():
        # a file for a known entry that has a url (the manual route when downloading fails)
        if model_id:
            try:
                known = find_model(model_id)
            except ModelError:
                known = None
            if known is not None and known.url:
                return [ModelEntry(dict(known.data, _install_as_download=True), known.root)]
        raise ModelError(f"{weights}: no manifest entry {side.name} beside it (write one, or import a training run "
                         f"folder with model.json)")
    data = _entry_from_json(side, weights.name)
    data["file"] = weights.name
    data["id"] = model_id or data.get("id") or _default_id(weights.stem)
    return [ModelEntry(data, weights.parent)]


def import_models(path: str | os.PathLike, model_id: str | None = None, only=None,
                  log: Callable[[str], None] | None = None) -> list[ModelEntry]:
    """Copy models into the user cache and add their manifest entries there.

    ``path``: a training run folder (model.json + model.safetensors, as written
    by ``uad.training``) or its model.json; a model folder with manifest.json (or
    the manifest); a ``.safetensors`` file with a ``.json`` entry (or manifest)
    beside it; or a ``.safetensors`` file alone with ``model_id`` naming a known
    entry that has a ``url`` (the manual route when ``download_model`` cannot
    reach the network: the file is checked against that entry's sha256).

    A source entry that carries a sha256 must match it; the copy's sha256 is
    recomputed, the weights are loaded once (config and tensors must agree),
    and only then the manifest entry is written.  An id already taken by a
    bundled model is refused; one in the user cache is replaced.
    """
    log = log or (lambda s: None)
    dest_root = user_models_dir()
    entries = _sources(Path(path), model_id, only)
    if not entries:
        raise ModelError(f"{path}: no model to import")
    out = []
    for e in entries:
        check_model_id(e.id)
        if e.data.get("_install_as_download"):
            out.append(_install_download_file(e, Path(path), log))
            continue
        src = e.local_path
        if src is None or not src.is_file():
            if e.url:
                raise ModelError(f"model {e.id}: {e.root} has no weights file for it (its entry has a url: add "
                                 f"the entry to a manifest and run 'uad models download {e.id}')")
            raise ModelError(f"model {e.id}: weights file {src} is missing")
        expected = e.data.get("sha256")
        if expected:
            verify(e)
        for other in list_models():
            if other.id == e.id and other.location != USER_CACHE:
                raise ModelError(f"model id {e.id!r} is already used by a {other.location} model ({other.root}); "
                                 f"import under another id with --id")
        entry = {k: v for k, v in e.data.items() if not k.startswith("_")}
        folder = dest_root / e.id
        dest_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".import-{e.id}-", dir=dest_root))
        try:
            shutil.copyfile(src, staging / src.name)
            entry["file"] = f"{e.id}/{src.name}"
            digest = sha256_file(staging / src.name)
            if expected and digest != str(expected).lower():
                raise ModelError(f"model {e.id}: the copy does not match its checksum (the source changed "
                                 f"while it was copied?)")
            entry["sha256"] = digest
            card = e.card_path
            if card is not None and card.is_file():
                shutil.copyfile(card, staging / card.name)
                entry["card"] = f"{e.id}/{card.name}"
            else:
                entry.pop("card", None)
                if "training" in entry:
                    (staging / "README.md").write_text(_run_card(entry))
                    entry["card"] = f"{e.id}/README.md"
            build_model(entry, load_weights(staging / src.name, e.id), e.id)  # config and tensors agree
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        upsert_manifest_entry(dest_root, entry)
        new = ModelEntry(entry, dest_root)
        log(f"imported {e.id} -> {folder}")
        out.append(new)
    return out


def import_model(path: str | os.PathLike, model_id: str | None = None) -> ModelEntry:
    """Import one model (see ``import_models``) and return its new user-cache entry."""
    entries = _sources(Path(path), model_id, None)
    if len(entries) != 1:
        raise ModelError(f"{path} holds {len(entries)} models; use import_models(path, only=[...])")
    return import_models(path, model_id)[0]


def _run_card(entry: dict) -> str:
    tr = entry.get("training", {})
    thr = entry.get("threshold")
    if thr is None:
        thr = "not calibrated (detection falls back to the 99th percentile of the in-brain anomaly map)"
    lines = [f"# Model card: {entry['id']}", "",
             f"- Methods: {', '.join(entry.get('methods', []))}",
             f"- Contrast: {entry.get('contrast')}; input {entry.get('image_size')} x {entry.get('image_size')} "
             f"axial slices; noise {entry.get('noise')}",
             f"- Trained with `uad train` on {tr.get('data')}: {tr.get('steps')} steps, batch {tr.get('batch_size')}"
             f"{' x ' + str(tr['world_size']) + ' processes' if (tr.get('world_size') or 1) > 1 else ''}, "
             f"lr {tr.get('lr')}, seed {tr.get('seed')}, best validation loss {tr.get('best_val_loss')}",
             f"- Threshold: {thr}",
             f"- sha256: `{entry.get('sha256')}`", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- download
def _url_basename(url: str) -> str:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(url).path)).name


def _offline_reason(err) -> str | None:
    """A short reason when ``err`` means the network / server cannot be reached, else None."""
    import socket
    import urllib.error

    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, (socket.gaierror, socket.timeout, TimeoutError, ConnectionError)):
        return (type(reason).__name__ + (f": {reason.strerror or reason}" if str(reason) else "")).strip()
    if isinstance(reason, OSError) and reason.errno is not None:
        import errno

        if reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.ECONNRESET,
                            errno.ETIMEDOUT, errno.ENETDOWN, getattr(errno, "EADDRNOTAVAIL", -1)):
            return reason.strerror or str(reason)
    if isinstance(reason, str) and any(w in reason.lower() for w in ("timed out", "unreachable", "refused",
                                                                     "name or service", "resolution")):
        return reason
    return None


def _manual_hint(entry: ModelEntry) -> str:
    dest = entry.download_path
    name = dest.name if dest is not None else "model.safetensors"
    return (f"to install it by hand, fetch the file on a machine with network access and run "
            f"'uad models import {name} --id {entry.id}'")


def _install_download_file(entry: ModelEntry, file: Path, log: Callable[[str], None]) -> ModelEntry:
    """Put a manually fetched weights file where ``download_model`` would (sha256 checked)."""
    dest = entry.download_path
    expected = str(entry.data.get("sha256") or "").lower()
    if not expected:
        raise ModelError(f"model {entry.id}: the manifest has no sha256; refusing an unverifiable file")
    digest = sha256_file(file)
    if digest != expected:
        raise ModelError(f"model {entry.id}: {file} does not match the manifest's sha256 (expected "
                         f"{expected[:12]}..., got {digest[:12]}...); not installed")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(file, tmp)
        if sha256_file(tmp) != expected:
            raise ModelError(f"model {entry.id}: the copy of {file} does not match its checksum")
        apply_umask(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log(f"installed {file} as the weights of {entry.id} -> {dest}")
    clean = ModelEntry({k: v for k, v in entry.data.items() if not k.startswith("_")}, entry.root)
    return clean


def download_model(model: str | ModelEntry, force: bool = False, progress: bool | Callable[[int, int | None], Any]
                   = True, timeout: float | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Download a manifest entry's ``url`` into the user cache; returns the weights path.

    The file is streamed to a temporary file beside its destination while its
    sha256 is computed, checked against the manifest, and only then renamed
    into place (an interrupted or corrupt download leaves nothing behind).
    ``progress``: True for a tqdm bar on stderr, False for none, or a callable
    ``(bytes_done, bytes_total_or_None)``.  An unreachable network raises a
    one-line ``ModelError`` that names the URL and the manual route
    (``uad models import FILE --id ID``).
    """
    import urllib.error
    import urllib.request

    log = log or (lambda s: None)
    entry = model if isinstance(model, ModelEntry) else find_model(model)
    if not entry.url:
        where = entry.weights_path
        raise ModelError(f"model {entry.id} has no download url; its weights are "
                         f"{'at ' + str(where) if where.is_file() else 'missing (' + str(where) + ')'}")
    expected = str(entry.data.get("sha256") or "").lower()
    if not expected:
        raise ModelError(f"model {entry.id}: the manifest gives no sha256 for {entry.url}; "
                         f"refusing to download a file that cannot be verified")
    dest = entry.download_path
    if not force and entry.available:
        try:
            verify(entry)
            log(f"{entry.id}: already present at {entry.weights_path} (checksum ok)")
            return entry.weights_path
        except ModelError:
            if entry.weights_path != dest:
                raise
    timeout = float(timeout if timeout is not None else os.environ.get("UAD_DOWNLOAD_TIMEOUT", DOWNLOAD_TIMEOUT))
    created = not dest.parent.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    bar = None
    ok = False
    try:
        req = urllib.request.Request(entry.url, headers={"User-Agent": "uad-model-zoo"})
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise ModelError(f"model {entry.id}: downloading {entry.url} failed: the server answered HTTP "
                             f"{e.code} {e.reason}; {_manual_hint(entry)}") from None
        except (urllib.error.URLError, OSError) as e:
            raise _download_error(entry, e) from None
        h = hashlib.sha256()
        done = 0
        with resp, os.fdopen(fd, "wb") as f:
            fd = None
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if progress is True:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {entry.id}",
                           leave=False)
            try:
                while True:
                    block = resp.read(1 << 20)
                    if not block:
                        break
                    f.write(block)
                    h.update(block)
                    done += len(block)
                    if bar is not None:
                        bar.update(len(block))
                    elif callable(progress):
                        progress(done, total)
            except OSError as e:  # connection dropped / timed out mid-way
                raise _download_error(entry, e) from None
        if total is not None and done != total:
            raise ModelError(f"model {entry.id}: the download of {entry.url} stopped after {done} of {total} "
                             f"bytes; try again")
        digest = h.hexdigest()
        if digest != expected:
            raise ModelError(f"model {entry.id}: checksum mismatch for the file downloaded from {entry.url} "
                             f"(expected {expected[:12]}..., got {digest[:12]}...); it was not installed")
        apply_umask(tmp)
        os.replace(tmp, dest)
        ok = True
    finally:
        if bar is not None:
            bar.close()
        if fd is not None:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
        if not ok and created:
            try:
                dest.parent.rmdir()
            except OSError:
                pass
    log(f"downloaded {entry.id} ({done / 2**20:.1f} MiB, sha256 ok) -> {dest}")
    return dest


def _download_error(entry: ModelEntry, err) -> ModelError:
    import urllib.error

    why = _offline_reason(err)
    if why is not None:
        return ModelError(f"model {entry.id}: cannot download {entry.url}: this machine seems to be offline or the "
                          f"server cannot be reached ({why}); {_manual_hint(entry)}")
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    text = getattr(reason, "strerror", None) or str(reason)
    return ModelError(f"model {entry.id}: cannot download {entry.url} ({text}); {_manual_hint(entry)}")


# ----------------------------------------------------------------------------- remove
def remove_model(model_id: str, log: Callable[[str], None] | None = None) -> Path:
    """Remove a user-cache model (its folder and manifest entry); bundled models are refused."""
    log = log or (lambda s: None)
    root = user_models_dir()
    manifest = root / MANIFEST
    data = _read_manifest(manifest) if manifest.is_file() else {"models": []}
    mine = [m for m in data["models"] if isinstance(m, dict) and m.get("id") == model_id]
    if not mine:
        for e in list_models():
            if e.id == model_id:
                extra = ""
                if e.download_path is not None and e.download_path.is_file():
                    extra = f" (its downloaded weights are in {e.download_path.parent})"
                raise ModelError(f"model {model_id} is a {e.location} model ({e.root}) and cannot be removed; only "
                                 f"models in the user cache ({root}) can be removed{extra}")
        raise ModelError(f"no model with id {model_id!r} in the user cache ({root}); see 'uad models'")
    entry = ModelEntry(mine[0], root)
    data["models"] = [m for m in data["models"] if not (isinstance(m, dict) and m.get("id") == model_id)]
    _write_manifest(manifest, data)
    removed = root
    target = entry.local_path or entry.download_path
    if target is not None:
        folder = target.parent
        if _inside(folder, root):
            shutil.rmtree(folder, ignore_errors=True)
            removed = folder
        elif target.is_file() and _inside(target, root):
            still_used = any(ModelEntry(m, root).local_path == target for m in data["models"] if isinstance(m, dict))
            if not still_used:
                target.unlink()
            removed = target
    log(f"removed {model_id} ({removed})")
    return removed
