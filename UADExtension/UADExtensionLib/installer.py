"""Safe installation of the engine's Python packages inside Slicer: torch can never be changed.

torch (and torchvision) come from the PyTorch extension, which picks the build for the
GPU; everything else is pip-installed here.  pip resolves dependencies, and MONAI 1.5
needs torch >= 2.4.1 and MONAI 1.6 torch >= 2.8, so a plain ``pip install monai`` on a
Slicer with an older torch silently replaces torch (on Windows by a CPU-only build).
This module prevents that in two ways:

1. a *constraint file* pins every installed torch-family package to its installed
   version (``torch==2.3.1+cu121``): pip then either keeps it or fails with a
   resolution error, it cannot upgrade, downgrade or replace it;
2. the MONAI requirement is narrowed to the releases that support the installed torch
   (``monai_requirement_for_torch``), so the resolution succeeds.

No ``--upgrade``, ``--force-reinstall`` or ``--ignore-installed`` is ever passed, and torch
is never a requirement.  ``install_plan`` says what is missing; ``build_pip_arguments`` /
``build_pip_command`` give the exact pip arguments (unit-tested); ``run_install`` executes
the plan with ``slicer.packaging.pip_ensure`` (Slicer >= 5.12) or ``slicer.util.pip_install``
(older), does nothing in testing mode, and checks afterwards that torch is unchanged.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import dependencies as deps

#: Distributions pinned by the constraint file when installed (never changed by this module).
PINNED_DISTRIBUTIONS = ("torch", "torchvision", "torchaudio", "triton")
#: pip options that could replace an installed package; never used.
FORBIDDEN_PIP_OPTIONS = ("-U", "--upgrade", "--force-reinstall", "--ignore-installed", "-I", "--no-deps")

# (lowest torch version, highest MONAI release series it may use, exclusive upper bound)
_MONAI_FOR_TORCH = (
    ((2, 8), None),          # torch >= 2.8: any MONAI >= 1.4 (1.6 needs 2.8)
    ((2, 4, 1), "1.6"),      # 2.4.1 <= torch < 2.8: MONAI 1.4 or 1.5
    ((0,), "1.5"),           # older torch: MONAI 1.4.x only
)
MONAI_MINIMUM = "1.4"


def _vt(text: str) -> tuple[int, ...]:
    return deps._version_tuple(str(text).split("+")[0])


def monai_requirement_for_torch(torch_version: str) -> str:
    """The MONAI requirement compatible with ``torch_version`` (MONAI 1.5 needs 2.4.1, 1.6 needs 2.8)."""
    v = _vt(torch_version)
    for lowest, upper in _MONAI_FOR_TORCH:
        if v >= lowest:
            return f"monai>={MONAI_MINIMUM}" + (f",<{upper}" if upper else "")
    return f"monai>={MONAI_MINIMUM},<1.5"  # pragma: no cover


def _satisfies(version: str, spec: str) -> bool:
    """``version`` meets a comma-separated list of >=, >, <, <=, == clauses."""
    v = _vt(version)
    for clause in (c.strip() for c in spec.split(",") if c.strip()):
        for op in (">=", "<=", "==", ">", "<"):
            if clause.startswith(op):
                w = _vt(clause[len(op):].strip())
                n = max(len(v), len(w))
                a, b = v + (0,) * (n - len(v)), w + (0,) * (n - len(w))
                ok = {">=": a >= b, "<=": a <= b, "==": a == b, ">": a > b, "<": a < b}[op]
                if not ok:
                    return False
                break
        else:
            raise ValueError(f"unsupported version clause {clause!r}")
    return True


def split_requirement(req: str) -> tuple[str, str]:
    """'monai>=1.4,<1.5' -> ('monai', '>=1.4,<1.5')."""
    for i, ch in enumerate(req):
        if ch in "<>=!~":
            return req[:i].strip(), req[i:].strip()
    return req.strip(), ""


@dataclass
class InstallPlan:
    """What would be installed, and under which constraints."""

    requirements: list[str] = field(default_factory=list)  # pip requirement strings (torch never among them)
    constraints: list[str] = field(default_factory=list)   # "torch==2.3.1+cu121", ...
    torch_version: str | None = None
    restart_needed: bool = False                            # a package to change is already imported
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.requirements

    def constraint_text(self) -> str:
        return "".join(line + "\n" for line in self.constraints)


def _installed(dist: str, version) -> str | None:
    try:
        return version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_plan(requirements=None, version=importlib.metadata.version, find_spec=importlib.util.find_spec,
                 modules=None) -> InstallPlan:
    """Requirements that are missing (or too old / too new for the installed torch), with the torch pins.

    Raises ``RuntimeError`` when torch itself is missing: it must come from the PyTorch extension first.
    """
    modules = sys.modules if modules is None else modules
    torch_version = _installed("torch", version)
    if torch_version is None:
        raise RuntimeError("torch is not installed: install it with the PyTorch extension (PyTorch Utils) first")
    plan = InstallPlan(torch_version=torch_version)
    for dist in PINNED_DISTRIBUTIONS:
        v = _installed(dist, version)
        if v is not None:
            plan.constraints.append(f"{dist}=={v}")
    for import_name, req in (deps.REQUIREMENTS if requirements is None else requirements):
        name, spec = split_requirement(req)
        if name.split("[")[0].lower() in PINNED_DISTRIBUTIONS:
            continue  # torch-family packages are never pip-installed here
        if name.split("[")[0].lower() == "monai":
            req = monai_requirement_for_torch(torch_version)
            name, spec = split_requirement(req)
        dist = name.split("[")[0]
        try:
            importable = find_spec(import_name) is not None
        except (ImportError, ValueError):
            importable = False
        have = _installed(dist, version)
        if importable and (have is None or not spec or _satisfies(have, spec)):
            continue  # present (or not pip-managed, e.g. shipped inside Slicer)
        plan.requirements.append(req)
        if have is not None:
            plan.notes.append(f"{dist} {have} does not meet {spec}")
            if import_name in modules:
                plan.restart_needed = True
    return plan


def build_pip_arguments(plan: InstallPlan, constraints_path) -> list[str]:
    """Arguments after ``pip install``: constraints first, then the requirements."""
    args = ["--upgrade-strategy", "only-if-needed", "-c", str(constraints_path)]
    return args + list(plan.requirements)


def build_pip_command(plan: InstallPlan, constraints_path, python: str | None = None) -> list[str]:
    """The full command line (``python -m pip install ...``) that the plan runs."""
    return [python or sys.executable, "-m", "pip", "install"] + build_pip_arguments(plan, constraints_path)


def write_constraints(plan: InstallPlan, folder=None) -> Path:
    """Write the plan's constraint file (a new file in ``folder`` or the temp folder)."""
    fd, path = tempfile.mkstemp(prefix="uad-constraints-", suffix=".txt", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(plan.constraint_text())
    return Path(path)


def run_install(plan: InstallPlan, slicer_module, version=importlib.metadata.version) -> str:
    """Install the plan in Slicer; returns "nothing", "skipped-testing", "installed" or "installed-restart".

    ``slicer_module`` is the ``slicer`` package (passed in so the choice between
    ``slicer.packaging`` and ``slicer.util.pip_install`` is testable).  In testing mode
    nothing is installed.  Raises ``RuntimeError`` if torch changed anyway.
    """
    if plan.empty:
        return "nothing"
    app = getattr(slicer_module, "app", None)
    if app is not None and app.testingEnabled():
        return "skipped-testing"
    constraints = write_constraints(plan)
    try:
        packaging = getattr(slicer_module, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            from packaging.requirements import Requirement

            packaging.pip_ensure([Requirement(r) for r in plan.requirements], constraints=str(constraints),
                                 prompt_install=False, prompt_restart=True, requester="UADExtension")
        else:
            slicer_module.util.pip_install(build_pip_arguments(plan, constraints))
    finally:
        constraints.unlink(missing_ok=True)
    importlib.invalidate_caches()
    after = _installed("torch", version)
    if after != plan.torch_version:
        raise RuntimeError(f"torch changed from {plan.torch_version} to {after} during the installation; "
                           "reinstall it with the PyTorch Utils module and restart Slicer")
    return "installed-restart" if plan.restart_needed else "installed"


def ensure_requirements(slicer_module, askConfirmation: bool = True, confirm=None, installTorch=None,
                        torch_missing=None, plan_function=None) -> bool:
    """The module's Apply-time check: torch (PyTorch extension), then the engine's packages; True when ready.

    ``confirm(text, details) -> bool`` asks the user (``slicer.util.confirmOkCancelDisplay`` in
    the GUI); ``installTorch()`` installs torch through the PyTorch extension.  In testing
    mode nothing is installed (False is returned when something is missing).  After an
    installation that updated an already-imported package, ``confirm`` offers a restart
    (``slicer.util.restart``).  Raises ``RuntimeError`` when packages are still missing.
    """
    torch_missing = torch_missing or deps.torch_missing
    plan_function = plan_function or install_plan
    app = getattr(slicer_module, "app", None)
    testing = app is not None and app.testingEnabled()
    ask = (lambda text, details="": confirm(text, details)) if (askConfirmation and confirm is not None) else \
        (lambda text, details="": True)
    if torch_missing():
        if testing:
            return False
        if not ask("Anomaly detection needs PyTorch. Install it now with the PyTorch extension? "
                   "This can take several minutes."):
            return False
        installTorch()
        importlib.invalidate_caches()
        if torch_missing():
            raise RuntimeError("PyTorch could not be installed; install it in the PyTorch Utils module, "
                               "restart Slicer and try again.")
    plan = plan_function()
    if plan.empty:
        return True
    if testing:
        return False
    details = "\n".join(plan.requirements + ["", "constraints (kept as installed):"] + plan.constraints + plan.notes)
    if not ask("Anomaly detection needs Python packages that are not installed yet. Install them now? "
               "The installed PyTorch is kept as it is.", details):
        return False
    outcome = run_install(plan, slicer_module)
    still = plan_function()
    if not still.empty:
        raise RuntimeError("These Python packages could not be installed: " + ", ".join(still.requirements) +
                           ". Restart Slicer and try again.")
    if outcome == "installed-restart" and confirm is not None and \
            confirm("Packages that were already loaded were updated; restart Slicer now to use them?", ""):
        slicer_module.util.restart()
    return True


def install_torch_with_pytorch_extension(slicer_module) -> None:
    """torch and torchvision through the PyTorch extension's PyTorchUtils (never pip here)."""
    if not hasattr(slicer_module.modules, "pytorchutils"):
        raise RuntimeError("This module needs the PyTorch extension: install 'PyTorch' from the Extensions "
                           "Manager, restart Slicer and try again.")
    import PyTorchUtils

    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if torchLogic.torchInstalled() and not deps.torch_satisfied():
        raise RuntimeError(f"The installed PyTorch is older than {deps.TORCH_REQUIREMENT}; upgrade it in the "
                           "PyTorch Utils module and restart Slicer.")
    torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=deps.TORCH_REQUIREMENT,
                            torchvisionVersionRequirement=deps.TORCHVISION_REQUIREMENT)
