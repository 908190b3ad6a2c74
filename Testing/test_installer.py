"""The dependency installer: the pip command built for an installed torch can never change torch."""

from __future__ import annotations

import importlib.metadata
import shlex
from types import SimpleNamespace

import pytest

from UADExtensionLib import installer


def _env(installed: dict):
    def version(dist):
        if dist in installed:
            return installed[dist]
        raise importlib.metadata.PackageNotFoundError(dist)

    def find_spec(name):
        return object() if name in installed else None

    return version, find_spec


BASE = {"einops": "0.8.0", "safetensors": "0.4.5", "scipy": "1.13.1", "lpips": "0.1.4", "tqdm": "4.66.0",
        "nibabel": "5.2.0", "PIL": "10.0.0", "pillow": "10.0.0", "deepbet": "1.0.2", "nilearn": "0.10.3"}


def _assert_never_changes_torch(cmd, constraints_text, torch_version):
    """Invariants of every command line the installer builds."""
    assert cmd[1:4] == ["-m", "pip", "install"]
    args = cmd[4:]
    for bad in installer.FORBIDDEN_PIP_OPTIONS:
        assert bad not in args, f"{bad} could replace an installed package"
    assert not any(a.startswith("--upgrade=") or a.startswith("--force") for a in args)
    i = args.index("-c")
    reqs = [a for j, a in enumerate(args) if not a.startswith("-") and j not in (i + 1, args.index("--upgrade-strategy") + 1)]
    assert args[args.index("--upgrade-strategy") + 1] == "only-if-needed"
    for r in reqs:  # torch is never a requirement
        name = installer.split_requirement(r)[0].split("[")[0].lower()
        assert name not in installer.PINNED_DISTRIBUTIONS
    assert f"torch=={torch_version}\n" in constraints_text  # the exact installed build, local label included
    return reqs


@pytest.mark.parametrize("torch_version,monai", [
    ("2.1.2+cu118", "monai>=1.4,<1.5"),
    ("2.3.1+cu121", "monai>=1.4,<1.5"),
    ("2.4.0", "monai>=1.4,<1.5"),
    ("2.4.1", "monai>=1.4,<1.6"),
    ("2.7.1+cpu", "monai>=1.4,<1.6"),
    ("2.8.0", "monai>=1.4"),
    ("2.14.1+cu130", "monai>=1.4"),
])
def test_built_command_pins_the_installed_torch_and_a_compatible_monai(tmp_path, torch_version, monai):
    version, find_spec = _env(dict(BASE, torch=torch_version, torchvision="0.16.2"))
    plan = installer.install_plan(version=version, find_spec=find_spec, modules={})
    assert plan.requirements == [monai] and plan.torch_version == torch_version
    path = installer.write_constraints(plan, folder=tmp_path)
    text = path.read_text()
    assert text.splitlines() == [f"torch=={torch_version}", "torchvision==0.16.2"]
    cmd = installer.build_pip_command(plan, path, python="/opt/Slicer/bin/PythonSlicer")
    assert _assert_never_changes_torch(cmd, text, torch_version) == [monai]
    assert cmd[-1] == monai and "-c" in cmd and str(path) in cmd
    assert shlex.split(shlex.join(cmd)) == cmd  # no argument relies on a shell


def test_a_monai_too_new_for_torch_is_replaced_not_torch():
    version, find_spec = _env(dict(BASE, torch="2.3.1", torchvision="0.18.1", monai="1.5.0"))
    plan = installer.install_plan(version=version, find_spec=find_spec, modules={"monai": object()})
    assert plan.requirements == ["monai>=1.4,<1.5"] and plan.restart_needed
    assert "monai 1.5.0 does not meet >=1.4,<1.5" in plan.notes
    version, find_spec = _env(dict(BASE, torch="2.9.0", monai="1.5.0"))
    plan = installer.install_plan(version=version, find_spec=find_spec, modules={})
    assert plan.empty and plan.constraints == ["torch==2.9.0"]


def test_torch_is_never_planned_even_if_listed():
    version, find_spec = _env(dict(BASE, torch="2.2.0"))
    reqs = [("torch", "torch>=2.5"), ("torchvision", "torchvision>=0.30"), ("monai", "monai>=1.4"), ("einops", "einops>=9")]
    plan = installer.install_plan(reqs, version=version, find_spec=find_spec, modules={})
    assert plan.requirements == ["monai>=1.4,<1.5", "einops>=9"]


def test_no_torch_means_the_pytorch_extension_first():
    version, find_spec = _env(dict(BASE))
    with pytest.raises(RuntimeError, match="PyTorch extension"):
        installer.install_plan(version=version, find_spec=find_spec)


def _fake_slicer(testing=False, packaging=False, changes_torch=None, installed=None):
    calls = []

    def pip_install(args):
        path = args[args.index("-c") + 1]
        calls.append(("pip_install", list(args), open(path).read()))
        if changes_torch:
            installed["torch"] = changes_torch

    ns = SimpleNamespace(app=SimpleNamespace(testingEnabled=lambda: testing),
                         util=SimpleNamespace(pip_install=pip_install))
    if packaging:
        def pip_ensure(requirements, constraints=None, **kw):
            calls.append(("pip_ensure", [str(r) for r in requirements], open(constraints).read(), kw))
        ns.packaging = SimpleNamespace(pip_ensure=pip_ensure)
    return ns, calls


def test_run_install_uses_the_right_slicer_api_and_nothing_in_testing_mode():
    installed = dict(BASE, torch="2.3.1+cu121")
    version, find_spec = _env(installed)
    plan = installer.install_plan(version=version, find_spec=find_spec, modules={})

    fake, calls = _fake_slicer(testing=True)
    assert installer.run_install(plan, fake, version=version) == "skipped-testing" and calls == []

    fake, calls = _fake_slicer()  # Slicer <= 5.10: slicer.util.pip_install with the constraint file
    assert installer.run_install(plan, fake, version=version) == "installed"
    (kind, args, text), = calls
    assert kind == "pip_install" and args[-1] == "monai>=1.4,<1.5"
    _assert_never_changes_torch(["PythonSlicer", "-m", "pip", "install"] + args, text, "2.3.1+cu121")

    pytest.importorskip("packaging")
    fake, calls = _fake_slicer(packaging=True)  # Slicer >= 5.12: slicer.packaging.pip_ensure
    assert installer.run_install(plan, fake, version=version) == "installed"
    (kind, reqs, text, kw), = calls
    assert kind == "pip_ensure" and len(reqs) == 1 and reqs[0] in ("monai<1.5,>=1.4", "monai>=1.4,<1.5")
    assert "torch==2.3.1+cu121\n" in text and kw["requester"] == "UADExtension" and kw["prompt_install"] is False

    fake, calls = _fake_slicer(changes_torch="2.9.0", installed=installed)
    with pytest.raises(RuntimeError, match="torch changed"):
        installer.run_install(plan, fake, version=version)
    assert installer.run_install(installer.InstallPlan(), fake) == "nothing"


def test_ensure_requirements_flow():
    """Apply-time flow: testing mode installs nothing; a refusal installs nothing; torch via the extension only."""
    calls = []
    state = {"torch": False, "plan": installer.InstallPlan(requirements=["monai>=1.4,<1.5"],
                                                             constraints=["torch==2.3.1"], torch_version="2.3.1")}

    def plan():
        return state["plan"]

    def install_torch():
        calls.append("torch-extension")
        state["torch"] = True

    def pip_install(args):
        calls.append(("pip", list(args)))
        state["plan"] = installer.InstallPlan(torch_version="2.3.1")

    def fake(testing):
        return SimpleNamespace(app=SimpleNamespace(testingEnabled=lambda: testing),
                               util=SimpleNamespace(pip_install=pip_install, restart=lambda: calls.append("restart")))

    version = lambda dist: "2.3.1"  # noqa: E731  (torch unchanged by the install)
    kw = dict(torch_missing=lambda: not state["torch"], plan_function=plan)
    # testing mode: False, nothing installed, nothing asked
    asked = []
    assert installer.ensure_requirements(fake(True), confirm=lambda t, d: asked.append(t) or True,
                                         installTorch=install_torch, **kw) is False
    assert calls == [] and asked == []
    # the user declines torch: nothing happens
    assert installer.ensure_requirements(fake(False), confirm=lambda t, d: False, installTorch=install_torch,
                                         **kw) is False
    assert calls == []
    # accepted: torch through the extension, then pip with the constraint file, never torch itself
    import UADExtensionLib.installer as inst

    orig = inst._installed
    inst._installed = lambda dist, v: version(dist) if dist == "torch" else None
    try:
        assert installer.ensure_requirements(fake(False), confirm=lambda t, d: True, installTorch=install_torch,
                                             **kw) is True
    finally:
        inst._installed = orig
    assert calls[0] == "torch-extension" and calls[1][0] == "pip"
    args = calls[1][1]
    assert args[-1] == "monai>=1.4,<1.5" and "-c" in args and not any("torch" in a for a in args if not a.endswith(".txt"))
    assert "restart" not in calls
