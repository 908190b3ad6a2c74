"""The model zoo and its command line: list, info, verify, import, download, remove; train options.

Every test runs on a private zoo: the bundled folder is a temporary folder
(``uad.zoo.bundled_dirs`` patched), ``$UAD_MODELS_DIR`` is unset and the user
cache is ``$UAD_CACHE_DIR`` = a temporary folder.  Downloads only use
``file://`` URLs and a closed port on the loopback interface.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import uad.zoo as zoo
from uad import ModelError, UADError
from uad.cli import build_parser, main
from uad.zoo import (ModelEntry, build_model, download_model, find_model, import_model, list_models, load_model,
                     remove_model, save_weights, sha256_file, verify)

from conftest import tiny_model_config

UNREACHABLE = "http://127.0.0.1:9/tiny.safetensors"  # discard port on loopback: refused at once


@pytest.fixture
def zoo_env(tmp_path, monkeypatch):
    """(bundled folder, user-cache folder) with two tiny bundled models: ``tiny-a`` and ``tiny-b`` (threshold)."""
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    monkeypatch.setattr(zoo, "bundled_dirs", lambda: [bundled])
    monkeypatch.delenv("UAD_MODELS_DIR", raising=False)
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = tiny_model_config()
    digest = save_weights(build_model(cfg, model_id="tiny-a"), bundled / "tiny-a" / "model.safetensors")
    a = dict(cfg, id="tiny-a", file="tiny-a/model.safetensors", sha256=digest, card="tiny-a/README.md")
    b = dict(a, id="tiny-b", threshold=0.123)
    b.pop("card")
    card = "\n".join(["# Model card: tiny-a"] + [f"line {i}" for i in range(1, 30)])
    (bundled / "tiny-a" / "README.md").write_text(card + "\n")
    (bundled / "manifest.json").write_text(json.dumps({"models": [a, b]}, indent=2))
    return bundled, tmp_path / "cache" / "models"


def _one_error_line(capsys, rc) -> str:
    out, err = capsys.readouterr()
    assert rc == 1, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("uad: error: ") and "Traceback" not in err
    return lines[0]


def _run_dir(tmp_path: Path, name="run", seed=1, with_sha=True) -> Path:
    """A folder like the one ``uad.training`` writes: model.json + model.safetensors."""
    run = tmp_path / name
    torch.manual_seed(seed)
    cfg = tiny_model_config()
    digest = save_weights(build_model(cfg, model_id="run"), run / "model.safetensors")
    entry = dict(cfg, file="model.safetensors", training={"data": "phantoms", "steps": 3, "batch_size": 4,
                                                          "lr": 1e-4, "seed": 0, "best_val_loss": 0.5})
    if with_sha:
        entry["sha256"] = digest
    (run / "model.json").write_text(json.dumps(entry))
    return run


def _manifest_ids(folder: Path) -> list[str]:
    p = folder / "manifest.json"
    return [m["id"] for m in json.loads(p.read_text())["models"]] if p.is_file() else []


# ----------------------------------------------------------------------------- list / info / verify
def test_list_columns_and_locations(zoo_env, tmp_path, capsys):
    bundled, cache = zoo_env
    import_model(_run_dir(tmp_path), "mine")
    for argv in (["models"], ["models", "list"]):
        assert main(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["ID", "METHODS", "CONTRAST", "SIZE", "THRESHOLD", "LOCATION"]
        rows = {ln.split()[0]: ln.split() for ln in lines[1:4]}
        assert rows["tiny-a"] == ["tiny-a", "anoddpm,thor,autoddpm", "T2", "32x32", "-", "bundled"]
        assert rows["tiny-b"] == ["tiny-b", "anoddpm,thor,autoddpm", "T2", "32x32", "0.123", "bundled"]
        assert rows["mine"][1:5] == ["anoddpm,thor,autoddpm", "T2", "32x32", "-"]
        assert " ".join(rows["mine"][5:]) == "user cache"
        assert lines[-1] == f"(user cache: {cache})"
    assert {e.id: e.location for e in list_models()} == {"tiny-a": "bundled", "tiny-b": "bundled",
                                                          "mine": "user cache"}


def test_info_prints_entry_and_card_head(zoo_env, capsys):
    assert main(["models", "info", "tiny-a", "--head", "3"]) == 0
    out = capsys.readouterr().out
    bundled, _ = zoo_env
    assert "location:  bundled" in out and f"card:      {(bundled / 'tiny-a' / 'README.md').resolve()}" in out
    assert '  "image_size": 32,' in out and '"denoiser": {' in out  # pretty JSON of the manifest entry
    card_lines = [ln for ln in out.splitlines() if ln.startswith("  | ")]
    assert card_lines == ["  | # Model card: tiny-a", "  | line 1", "  | line 2",
                          "  | ... (27 more lines; --card prints it all)"]
    assert main(["models", "info", "tiny-a", "--card"]) == 0
    assert "  | line 29" in capsys.readouterr().out
    assert main(["models", "info", "tiny-b"]) == 0
    out = capsys.readouterr().out
    assert '"threshold": 0.123' in out and "card:      none" in out
    assert "no model with id 'nope'" in _one_error_line(capsys, main(["models", "info", "nope"]))


def test_verify_refuses_tampered_weights_with_one_line(zoo_env, capsys):
    bundled, _ = zoo_env
    assert main(["models", "verify"]) == 0
    assert capsys.readouterr().out.count("ok      ") == 2
    w = bundled / "tiny-a" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the tensor data
    w.write_bytes(bytes(data))
    rc = main(["models", "verify", "tiny-a"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out.splitlines() == [f"FAILED  tiny-a: model tiny-a: checksum mismatch for {w.resolve()} (expected "
                                f"{json.loads((bundled / 'manifest.json').read_text())['models'][0]['sha256'][:12]}"
                                f"..., got {sha256_file(w)[:12]}...); the file was modified or is corrupt"]
    assert err.splitlines() == ["uad: error: 1 of 1 model(s) failed verification"]
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_model("tiny-a")
    # detection refuses it too, with one line
    rc = main(["detect", "--sample", "-o", str(bundled / "out"), "--model", "tiny-a", "--no-progress"])
    assert "checksum mismatch" in _one_error_line(capsys, rc)
    # an entry without sha256 is refused as well
    m = json.loads((bundled / "manifest.json").read_text())
    del m["models"][1]["sha256"]
    (bundled / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="no sha256"):
        verify(find_model("tiny-b"))


# ----------------------------------------------------------------------------- import
def test_import_training_run_api(zoo_env, tmp_path):
    _, cache = zoo_env
    run = _run_dir(tmp_path, "my run!")
    entry = import_model(run)  # id from the folder name, made safe
    assert isinstance(entry, ModelEntry) and entry.id == "my-run" and entry.location == "user cache"
    assert entry.data["file"] == "my-run/model.safetensors"
    assert entry.weights_path == (cache / "my-run" / "model.safetensors").resolve()
    assert entry.data["sha256"] == sha256_file(run / "model.safetensors") == sha256_file(entry.weights_path)
    assert "3 steps" in entry.card_path.read_text()  # a card generated from the run's training info
    assert _manifest_ids(cache) == ["my-run"]
    m = load_model("my-run")
    ref = build_model(tiny_model_config(), zoo.load_weights(run / "model.safetensors"))
    for k, v in ref.net("denoiser").state_dict().items():
        assert torch.equal(m.net("denoiser").state_dict()[k], v)
    # importing again under the same id replaces it (new weights, fresh checksum)
    run2 = _run_dir(tmp_path, "run2", seed=5)
    e2 = import_model(run2, "my-run")
    assert _manifest_ids(cache) == ["my-run"] and e2.data["sha256"] == sha256_file(run2 / "model.safetensors")
    assert e2.data["sha256"] != entry.data["sha256"]
    # the model.json itself works as PATH too
    assert import_model(run / "model.json", "via-json").id == "via-json"


def test_import_cli_run_manifest_and_single_file(zoo_env, tmp_path, capsys):
    _, cache = zoo_env
    assert main(["models", "import", str(_run_dir(tmp_path)), "--id", "from-run"]) == 0
    out = capsys.readouterr().out
    assert f"imported from-run -> {cache / 'from-run'}" in out and "--model from-run" in out
    # a model folder with a manifest (select with --only, rename with --id)
    other = tmp_path / "other"
    torch.manual_seed(3)
    d = save_weights(build_model(tiny_model_config()), other / "w" / "x.safetensors")
    e = dict(tiny_model_config(), file="w/x.safetensors", sha256=d)
    (other / "manifest.json").write_text(json.dumps({"models": [dict(e, id="m1"), dict(e, id="m2")]}))
    assert main(["models", "import", str(other), "--only", "m2"]) == 0
    assert main(["models", "import", str(other / "manifest.json"), "--only", "m1", "--id", "renamed"]) == 0
    assert "--id renames a single model" in _one_error_line(capsys, main(["models", "import", str(other), "--id",
                                                                          "x"]))
    # a single .safetensors with a .json entry beside it (no sha256 there: computed on import)
    single = tmp_path / "single"
    torch.manual_seed(4)
    save_weights(build_model(tiny_model_config()), single / "net.safetensors")
    (single / "net.json").write_text(json.dumps(tiny_model_config()))
    assert main(["models", "import", str(single / "net.safetensors")]) == 0
    capsys.readouterr()
    assert _manifest_ids(cache) == ["from-run", "m2", "renamed", "net"]
    assert find_model("net").data["sha256"] == sha256_file(single / "net.safetensors")
    assert main(["models", "verify"]) == 0
    assert capsys.readouterr().out.count("ok      ") == 6  # 2 bundled + 4 imported


def test_import_refusals_leave_the_cache_unchanged(zoo_env, tmp_path, capsys):
    bundled, cache = zoo_env
    # a tampered run (weights no longer match its model.json)
    run = _run_dir(tmp_path)
    data = bytearray((run / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (run / "model.safetensors").write_bytes(bytes(data))
    assert "checksum mismatch" in _one_error_line(capsys, main(["models", "import", str(run), "--id", "x"]))
    # weights that do not fit the config
    bad = _run_dir(tmp_path, "bad", with_sha=False)
    entry = json.loads((bad / "model.json").read_text())
    entry["networks"]["denoiser"]["channels"] = [16, 16, 16]
    (bad / "model.json").write_text(json.dumps(entry))
    assert "do not match" in _one_error_line(capsys, main(["models", "import", str(bad), "--id", "y"]))
    # an id taken by a bundled model
    line = _one_error_line(capsys, main(["models", "import", str(_run_dir(tmp_path, "ok")), "--id", "tiny-a"]))
    assert "already used by a bundled model" in line
    # a bad id, a missing path, a folder with nothing to import
    assert "invalid model id" in _one_error_line(capsys, main(["models", "import", str(tmp_path / "ok"), "--id",
                                                               "../x"]))
    assert "no such file" in _one_error_line(capsys, main(["models", "import", str(tmp_path / "nope")]))
    (tmp_path / "empty").mkdir()
    assert "neither" in _one_error_line(capsys, main(["models", "import", str(tmp_path / "empty")]))
    assert _manifest_ids(cache) == []
    assert not cache.exists() or sorted(p.name for p in cache.iterdir()) == []


# ----------------------------------------------------------------------------- download
def _remote_entry(bundled: Path, tmp_path: Path, url: str | None = None, sha256: str | None = "auto",
                  model_id: str = "remote") -> Path:
    """Add a bundled entry that only has a url; returns the file the url serves."""
    torch.manual_seed(7)
    served = tmp_path / "server" / "remote-weights.safetensors"
    digest = save_weights(build_model(tiny_model_config()), served)
    entry = dict(tiny_model_config(), id=model_id, url=url or served.as_uri())
    if sha256 == "auto":
        entry["sha256"] = digest
    elif sha256 is not None:
        entry["sha256"] = sha256
    m = json.loads((bundled / "manifest.json").read_text())
    m["models"].append(entry)
    (bundled / "manifest.json").write_text(json.dumps(m))
    return served


def test_download_from_file_url(zoo_env, tmp_path, capsys):
    bundled, cache = zoo_env
    served = _remote_entry(bundled, tmp_path)
    e = find_model("remote")
    assert not e.available and e.status == "not downloaded"
    assert main(["models", "list"]) == 0
    assert "bundled (not downloaded)" in capsys.readouterr().out
    with pytest.raises(ModelError, match="not downloaded yet; run 'uad models download remote'"):
        load_model("remote")
    assert find_model(method="anoddpm").id == "tiny-a"  # a default model is one that is on disk
    assert main(["models", "verify"]) == 0  # remote entries are skipped when verifying everything
    assert "skip    remote: not downloaded" in capsys.readouterr().out

    assert main(["models", "download", "remote"]) == 0
    out, err = capsys.readouterr()
    dest = cache / "remote" / "remote-weights.safetensors"
    assert f"-> {dest}" in out and "sha256 ok" in out
    assert dest.read_bytes() == served.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["remote-weights.safetensors"]  # no .part left
    assert find_model("remote").weights_path == dest
    load_model("remote")
    assert main(["models", "download", "remote"]) == 0
    assert "already present" in capsys.readouterr().out
    # the API with a progress callback
    seen = []
    assert download_model("remote", force=True, progress=lambda done, total: seen.append((done, total))) == dest
    size = served.stat().st_size
    assert seen[-1] == (size, size) and all(d <= size for d, _ in seen)
    # remove: the downloaded copy of a bundled entry is not a user-cache model
    assert "cannot be removed" in _one_error_line(capsys, main(["models", "remove", "remote"]))


def test_model_files_follow_the_umask(zoo_env, tmp_path, mask=0o027):
    """Weights, training state, manifests, imports and downloads get 0666 minus the umask, not safetensors' or
    mkstemp's 0600 (before: a model trained or imported into a shared folder was unreadable by the group)."""
    import os

    from uad.training import load_train_state, save_train_state

    bundled, cache = zoo_env
    want = 0o666 & ~mask
    old = os.umask(mask)
    try:
        model = build_model(tiny_model_config(), model_id="m")
        save_weights(model, tmp_path / "w" / "model.safetensors")
        opt = torch.optim.Adam([p for net in model.networks.values() for p in net.parameters()], lr=1e-3)
        save_train_state(model, opt, tmp_path / "w" / "train_state.safetensors")
        import_model(_run_dir(tmp_path, "run"), "imported")
        _remote_entry(bundled, tmp_path)
        dest = download_model("remote", progress=False)
    finally:
        os.umask(old)
    files = [tmp_path / "w" / "model.safetensors", tmp_path / "w" / "train_state.safetensors",
             cache / "manifest.json", cache / "imported" / "model.safetensors", dest]
    modes = {str(f.relative_to(tmp_path)): f.stat().st_mode & 0o777 for f in files}
    assert set(modes.values()) == {want}, modes
    assert load_train_state(tmp_path / "w" / "train_state.safetensors")[0]  # still a valid file


def test_download_offline_gives_one_clear_line(zoo_env, tmp_path, capsys):
    bundled, cache = zoo_env
    served = _remote_entry(bundled, tmp_path, url=UNREACHABLE)
    rc = main(["models", "download", "remote", "--timeout", "5", "--no-progress"])
    line = _one_error_line(capsys, rc)
    assert UNREACHABLE in line and "seems to be offline" in line
    assert "'uad models import tiny.safetensors --id remote'" in line
    assert not cache.exists() or not any(cache.rglob("*"))  # nothing half-downloaded
    # the manual route the message names: import the fetched file under the entry's id
    assert main(["models", "import", str(served), "--id", "remote"]) == 0
    capsys.readouterr()
    assert find_model("remote").weights_path == cache / "remote" / "tiny.safetensors"
    load_model("remote")
    # a file that is not the one the manifest describes is refused
    torch.manual_seed(99)
    wrong = tmp_path / "wrong.safetensors"
    save_weights(build_model(tiny_model_config()), wrong)
    line = _one_error_line(capsys, main(["models", "import", str(wrong), "--id", "remote"]))
    assert "does not match the manifest's sha256" in line


def test_download_checksum_mismatch_installs_nothing(zoo_env, tmp_path, capsys):
    bundled, cache = zoo_env
    _remote_entry(bundled, tmp_path, sha256="0" * 64)
    line = _one_error_line(capsys, main(["models", "download", "remote", "--no-progress"]))
    assert "checksum mismatch for the file downloaded from file://" in line and "not installed" in line
    assert not cache.exists() or not any(cache.rglob("*"))
    # no sha256 at all: refused before downloading
    _remote_entry(bundled, tmp_path, sha256=None, model_id="unsigned")
    assert "refusing to download" in _one_error_line(capsys, main(["models", "download", "unsigned"]))
    # a missing file behind a file:// url, and an entry without url
    _remote_entry(bundled, tmp_path, url=(tmp_path / "gone.safetensors").as_uri(), model_id="gone")
    line = _one_error_line(capsys, main(["models", "download", "gone", "--no-progress"]))
    assert "cannot download file://" in line and "uad models import" in line
    assert "has no download url" in _one_error_line(capsys, main(["models", "download", "tiny-a"]))
    assert not cache.exists() or not any(cache.rglob("*"))


# ----------------------------------------------------------------------------- remove
def test_remove_user_model_and_refuse_bundled(zoo_env, tmp_path, capsys):
    bundled, cache = zoo_env
    import_model(_run_dir(tmp_path), "keep")
    import_model(_run_dir(tmp_path, "r2"), "drop")
    assert main(["models", "remove", "drop"]) == 0
    assert f"removed drop ({cache / 'drop'})" in capsys.readouterr().out
    assert _manifest_ids(cache) == ["keep"] and not (cache / "drop").exists() and (cache / "keep").is_dir()
    with pytest.raises(ModelError, match="no model with id 'drop'"):
        find_model("drop")
    line = _one_error_line(capsys, main(["models", "remove", "tiny-a"]))
    assert "tiny-a is a bundled model" in line and "cannot be removed" in line
    assert (bundled / "tiny-a" / "model.safetensors").is_file() and "tiny-a" in _manifest_ids(bundled)
    assert "no model with id 'nope'" in _one_error_line(capsys, main(["models", "remove", "nope"]))
    assert remove_model("keep") == cache / "keep"
    assert _manifest_ids(cache) == []


# ----------------------------------------------------------------------------- train options
def test_train_config_precedence(tmp_path):
    from uad.networks import tiny_unet_config
    from uad.training import config_from_args, model_config_for

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"steps": 7, "lr": 0.01, "contrast": "T1", "batch_size": 3,
                                    "model_overrides": {"networks": {"denoiser": tiny_unet_config((8, 16, 16))}}}))
    p = build_parser()
    a = p.parse_args(["train", "--method", "anoddpm", "-o", str(tmp_path / "r"), "--config", str(cfg_file),
                      "--steps", "3", "--contrast", "flair"])
    c = config_from_args(a)
    assert (c.steps, c.lr, c.contrast, c.batch_size, c.data, c.image_size) == (3, 0.01, "FLAIR", 3, "phantoms", None)
    assert c.model_overrides["networks"]["denoiser"]["channels"] == [8, 16, 16]
    assert model_config_for(c)["image_size"] == 64 and c.image_size == 64  # None: 64 without an init model
    c = config_from_args(p.parse_args(["train", "--method", "wolleb", "-o", "r"]))
    assert (c.steps, c.lesion_fraction, c.contrast) == (2000, 0.5, "T2")  # defaults (weakly supervised: lesions)


def test_train_option_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    run = str(tmp_path / "run")
    assert "unknown training option(s): stepz" in _one_error_line(
        capsys, main(["train", "--method", "anoddpm", "-o", run, "--config", str(bad)]))
    bad.write_text("{not json")
    assert "not valid JSON" in _one_error_line(capsys, main(["train", "--method", "anoddpm", "-o", run,
                                                             "--config", str(bad)]))
    assert "unknown method" in _one_error_line(capsys, main(["train", "--method", "nope", "-o", run])).lower()
    assert "positive integer" in _one_error_line(capsys, main(["train", "--method", "anoddpm", "-o", run,
                                                               "--batch-size", "0"]))
    assert "has no config.json" in _one_error_line(capsys, main(["train", "--method", "anoddpm", "-o", run,
                                                                 "--resume"]))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert "already holds a training run" in _one_error_line(capsys, main(["train", "--method", "anoddpm", "-o",
                                                                           run, "--steps", "1"]))
    with pytest.raises(UADError):
        from uad.training import TrainConfig

        TrainConfig.from_dict({"contrast": "PD"})


def test_offline_reasons():
    """DNS failures, timeouts and refused / unreachable connections all count as 'offline'."""
    import errno
    import socket
    import urllib.error

    from uad.zoo import _offline_reason

    assert "Name or service not known" in _offline_reason(
        urllib.error.URLError(socket.gaierror(-2, "Name or service not known")))
    assert "timed out" in _offline_reason(urllib.error.URLError(TimeoutError("timed out")))
    assert _offline_reason(socket.timeout("timed out")) is not None
    assert _offline_reason(urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable"))) == \
        "Network is unreachable"
    assert _offline_reason(urllib.error.URLError(FileNotFoundError(2, "No such file"))) is None


def test_upsert_replaces_an_entry_where_it_stands(tmp_path):
    """A re-imported or re-bundled model keeps its place in the manifest; a new id is appended."""
    from uad.zoo import upsert_manifest_entry

    for i in ("a", "b", "c"):
        upsert_manifest_entry(tmp_path, {"id": i, "v": 1})
    upsert_manifest_entry(tmp_path, {"id": "b", "v": 2})
    upsert_manifest_entry(tmp_path, {"id": "d", "v": 1})
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert [(m["id"], m["v"]) for m in data["models"]] == [("a", 1), ("b", 2), ("c", 1), ("d", 1)]
    upsert_manifest_entry(tmp_path, {"id": "e", "v": 1}, before="b")  # a new entry placed before another
    upsert_manifest_entry(tmp_path, {"id": "d", "v": 2}, before="a")  # an existing one moved there
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert [(m["id"], m["v"]) for m in data["models"]] == [("d", 2), ("a", 1), ("e", 1), ("b", 2), ("c", 1)]
    with pytest.raises(ModelError, match="no entry 'zz'"):
        upsert_manifest_entry(tmp_path, {"id": "f"}, before="zz")


def test_default_model_is_the_best_measured_of_its_contrast(zoo_env):
    """``find_model(method=, contrast=)``: manifest order while nothing is measured; then the model of that
    contrast whose held-out measurements for the method are best, wherever it stands; a model measured only for
    another method does not count for this one."""
    bundled, _ = zoo_env
    path = bundled / "manifest.json"
    data = json.loads(path.read_text())
    assert find_model(method="anoddpm", contrast="T2").id == "tiny-a"  # nothing measured: manifest order

    def held(**aps):
        return {"heldout": {"n_per_type": 5, "results": {
            m: {"preset": "stochastic", "tumour": ap, "stroke": ap, "ms": ap} for m, ap in aps.items()}}}

    data["models"][0]["evaluation"] = held(anoddpm=0.20, thor=0.50)
    data["models"][1]["evaluation"] = held(anoddpm=0.30)
    path.write_text(json.dumps(data))
    assert find_model(method="anoddpm", contrast="T2").id == "tiny-b"  # measured better, second in the manifest
    assert find_model(method="thor", contrast="T2").id == "tiny-a"  # only tiny-a measured for THOR
    assert find_model(method="autoddpm", contrast="T2").id == "tiny-a"  # neither: manifest order
    assert find_model(method="anoddpm").id == "tiny-a"  # no contrast given: manifest order
    data["models"][1]["contrast"] = "FLAIR"  # another contrast's measurement never competes
    path.write_text(json.dumps(data))
    assert find_model(method="anoddpm", contrast="T2").id == "tiny-a"
    assert find_model(method="anoddpm", contrast="FLAIR").id == "tiny-b"
    # A measurement on the training script's phantoms never outranks one on the held-out set, however high:
    # the two test sets give numbers that cannot be compared (the same holds for best_method across models).
    data["models"][1]["contrast"] = "T2"
    data["models"][1]["evaluation"] = {"phantoms": {"n_per_type": 2, "results": {
        "anoddpm": {"preset": "stochastic", "tumour": 0.9, "stroke": 0.9, "ms": 0.9}}}}
    path.write_text(json.dumps(data))
    assert find_model(method="anoddpm", contrast="T2").id == "tiny-a"
    from uad.selection import best_method

    choice = best_method("T2")
    assert (choice.method, choice.model) == ("thor", "tiny-a") and "held-out set" in choice.reason
    data["models"][0]["evaluation"] = {}  # only phantoms measured: they decide
    path.write_text(json.dumps(data))
    assert find_model(method="anoddpm", contrast="T2").id == "tiny-b"
    assert best_method("T2").model == "tiny-b"
