"""Packaging and module-file checks of the Slicer side (no Slicer application needed).

* CMake: the extension metadata, and that every Python file of the module, of
  UADExtensionLib and of the ``uad`` engine (and every sample-data and model
  file) is listed, since Slicer packages only what is listed.
* The Qt Designer file parses and names every widget the Widget class uses.
* The icons are real 128 x 128 PNGs.
* ``UADExtension.py`` imports no heavy package at module level and loads
  before torch is installed; its Logic is the Qt-free logic plus Slicer's
  ScriptedLoadableModuleLogic.
* The packages the Slicer module installs cover what the engine imports.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "UADExtension"
MODULE_PY = MODULE_DIR / "UADExtension.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "UADExtension.ui"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

ACCEPTED_CATEGORIES = {"Segmentation", "Neuroimaging", "Image Synthesis", "Quantification", "Filtering", "Utilities"}
METHOD_NAMES = ["THOR", "AutoDDPM", "pDDPM", "DISYRE", "Wolleb", "AnoDDPM"]


# -- CMake parsing ----------------------------------------------------------------------
def _strip_comment(line: str) -> str:
    in_quote = False
    for i, ch in enumerate(line):
        if ch == '"':
            in_quote = not in_quote
        elif ch == "#" and not in_quote:
            return line[:i]
    return line


def _cmake_text(path: Path) -> str:
    return "\n".join(_strip_comment(line) for line in path.read_text().splitlines())


def _cmake_sets(path: Path) -> dict[str, list[str]]:
    """``set(NAME a "b c" d)`` blocks -> {NAME: ["a", "b c", "d"]}, ${VAR} of earlier sets expanded."""
    text = _cmake_text(path)
    out = {}
    for name, body in re.findall(r'\bset\(\s*(\w+)((?:\s*(?:"[^"]*"|[^\s()"]+))*)\s*\)', text, flags=re.S):
        out[name] = [t.strip('"') for t in re.findall(r'"[^"]*"|[^\s"]+', body)]

    def expand(token):  # ${VAR} of variables set in the same file
        return re.sub(r"\$\{(\w+)\}", lambda m: " ".join(out[m.group(1)]) if m.group(1) in out else m.group(0), token)

    for name in out:  # in file order, so earlier variables are expanded first
        out[name] = [expand(t) for t in out[name]]
    return out


def _python_files(*folders: str) -> set[str]:
    files = set()
    for folder in folders:
        for p in (MODULE_DIR / folder).rglob("*.py"):
            if "__pycache__" not in p.parts:
                files.add(p.relative_to(MODULE_DIR).as_posix())
    return files


def _data_files(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(folder).parts)}


def _missing_message(missing, var):
    lines = "\n".join(f"  {m}" for m in sorted(missing))
    return f"add to {var} in UADExtension/CMakeLists.txt:\n{lines}"


def test_every_python_file_is_listed_in_the_module_cmake():
    sets = _cmake_sets(MODULE_DIR / "CMakeLists.txt")
    listed = set(sets["MODULE_PYTHON_SCRIPTS"])
    on_disk = _python_files("uad", "UADExtensionLib") | {"UADExtension.py"}
    missing = on_disk - listed
    assert not missing, _missing_message(missing, "MODULE_PYTHON_SCRIPTS")
    stale = {f for f in listed if not (MODULE_DIR / f).is_file()}
    assert not stale, f"listed in MODULE_PYTHON_SCRIPTS but missing on disk: {sorted(stale)}"
    assert "uad/pipeline.py" in listed and "UADExtensionLib/logic.py" in listed


def test_resources_sample_data_and_models_are_listed():
    sets = _cmake_sets(MODULE_DIR / "CMakeLists.txt")
    resources = sets["MODULE_PYTHON_RESOURCES"]
    assert "Resources/UI/UADExtension.ui" in resources and "Resources/Icons/UADExtension.png" in resources
    for r in resources:
        assert (MODULE_DIR / r).is_file(), r
    on_disk = {str(f.relative_to(MODULE_DIR)) for f in (MODULE_DIR / "Resources").rglob("*") if f.is_file()}
    missing = on_disk - set(resources)
    assert not missing, _missing_message(missing, "MODULE_PYTHON_RESOURCES")
    for var, folder in (("MODULE_SAMPLE_DATA", REPO / "Resources" / "SampleData"), ("MODULE_MODELS", REPO / "models")):
        listed = set(sets.get(var, []))
        on_disk = _data_files(folder)
        missing = on_disk - listed
        assert not missing, _missing_message(missing, var)
        stale = {f for f in listed if not (folder / f).is_file()}
        assert not stale, f"listed in {var} but missing in {folder}: {sorted(stale)}"


def test_module_cmake_follows_the_scripted_module_template():
    text = _cmake_text(MODULE_DIR / "CMakeLists.txt")
    assert _cmake_sets(MODULE_DIR / "CMakeLists.txt")["MODULE_NAME"] == ["UADExtension"]
    macro = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, flags=re.S).group(1).split()
    assert macro[:2] == ["NAME", "${MODULE_NAME}"]
    for token in ("SCRIPTS", "${MODULE_PYTHON_SCRIPTS}", "RESOURCES", "${MODULE_PYTHON_RESOURCES}", "WITH_GENERIC_TESTS"):
        assert token in macro
    testing = re.search(r"if\(BUILD_TESTING\)(.*?)endif\(\)", text, flags=re.S).group(1)
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", testing)
    assert "add_subdirectory(Testing)" in testing
    assert "add_subdirectory(Python)" in _cmake_text(MODULE_DIR / "Testing" / "CMakeLists.txt")
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()
    # the shared data goes where uad/imageio.py and uad/zoo.py look for it in an installed extension
    assert '"Resources/SampleData"' in text and '"Resources/models"' in text
    import uad.imageio
    import uad.zoo

    module_dir = Path(uad.zoo.__file__).resolve().parents[1]
    assert module_dir / "Resources" / "models" in uad.zoo._candidate_dirs()
    assert module_dir / "Resources" / "SampleData" in uad.imageio._sample_dirs()


def test_extension_cmake_metadata():
    path = REPO / "CMakeLists.txt"
    text = _cmake_text(path)
    sets = _cmake_sets(path)
    assert re.search(r"^\s*cmake_minimum_required\(VERSION", text, flags=re.M)
    assert re.search(r"\bproject\(\s*UADExtension\s*\)", text)
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert sets.get(var), f"{var} is not set"
    assert sets["EXTENSION_CATEGORY"][0] in ACCEPTED_CATEGORIES
    assert sets["EXTENSION_HOMEPAGE"][0].startswith("https://")
    assert sets["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert sets["EXTENSION_ICONURL"][0].endswith("/Resources/UADExtension.png")
    assert (REPO / "Resources" / "UADExtension.png").is_file()
    order = [text.index(s) for s in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                                     "add_subdirectory(UADExtension)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                                     "include(${Slicer_EXTENSION_CPACK})")]
    assert order == sorted(order)
    assert (REPO / "LICENSE").is_file()


FAKE_SLICER_USE_FILE = r"""
# Stand-in for Slicer's UseSlicer.cmake: the two macros copy and install files the way
# ctkMacroCompilePythonScript does (<dest>/<path as listed>), so a configure + install
# checks that every listed file exists and shows the installed layout.
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer/qt-scripted-modules)
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT MY_WITH_GENERIC_TESTS)
    message(FATAL_ERROR "WITH_GENERIC_TESTS missing")
  endif()
  foreach(file ${MY_SCRIPTS} ${MY_RESOURCES})
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${file} ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${file} COPYONLY)
    get_filename_component(dir "${file}" DIRECTORY)
    install(FILES ${CMAKE_CURRENT_SOURCE_DIR}/${file} DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${dir})
  endforeach()
  file(APPEND ${CMAKE_BINARY_DIR}/macro_calls.txt "module ${MY_NAME}\n")
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  file(APPEND ${CMAKE_BINARY_DIR}/macro_calls.txt "unittest ${MY_SCRIPT}\n")
endfunction()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_configures_and_installs_the_engine_layout(tmp_path):
    cmake = shutil.which("cmake")
    fake = tmp_path / "fake-slicer"
    fake.mkdir()
    (fake / "UseSlicer.cmake").write_text(FAKE_SLICER_USE_FILE)
    (fake / "empty.cmake").write_text("")
    (fake / "SlicerConfig.cmake").write_text(
        f'set(Slicer_USE_FILE "{fake}/UseSlicer.cmake")\n'
        f'set(Slicer_EXTENSION_GENERATE_CONFIG "{fake}/empty.cmake")\n'
        f'set(Slicer_EXTENSION_CPACK "{fake}/empty.cmake")\n')
    build, prefix = tmp_path / "build", tmp_path / "install"
    run = lambda *args: subprocess.run([cmake, *args], capture_output=True, text=True, timeout=120)  # noqa: E731
    out = run("-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={fake}", "-DBUILD_TESTING=ON",
              f"-DCMAKE_INSTALL_PREFIX={prefix}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    calls = (build / "macro_calls.txt").read_text().split("\n")
    assert "module UADExtension" in calls and "unittest UADExtension.py" in calls
    out = run("--install", str(build))
    assert out.returncode == 0, out.stderr[-3000:]
    installed = prefix / "lib" / "Slicer" / "qt-scripted-modules"
    for f in ("UADExtension.py", "UADExtensionLib/logic.py", "uad/pipeline.py", "uad/methods/base.py",
              "Resources/UI/UADExtension.ui", "Resources/Icons/UADExtension.png"):
        assert (installed / f).is_file(), f
    for f in _data_files(REPO / "Resources" / "SampleData"):
        assert (installed / "Resources" / "SampleData" / f).is_file(), f
    for f in _data_files(REPO / "models"):
        assert (installed / "Resources" / "models" / f).is_file(), f
    # the installed engine finds its sample and model folder next to itself
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(installed)!r})
        import uad.imageio, uad.zoo
        print(uad.imageio.__file__)
        print(sorted(str(p) for p in uad.zoo._candidate_dirs()))
        print(uad.imageio.sample_paths()["image"])
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UAD_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(str(installed))
    assert str(installed / "Resources" / "models") in lines[1]
    assert lines[2] == str(installed / "Resources" / "SampleData" / "sample_T2_tumour.nii.gz")


# -- UI ----------------------------------------------------------------------------------
def _ui_widgets() -> dict[str, str]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def test_ui_parses_and_has_every_widget_the_widget_class_uses():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "UADExtension"
    widgets = _ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text()))
    assert {"inputSelector", "methodComboBox", "modelComboBox", "presetComboBox", "deviceComboBox", "seedSpinBox",
            "thresholdSliderWidget", "applyButton", "progressBar", "statusLabel"} <= used
    missing = used - set(widgets)
    assert not missing, f"the Widget uses {sorted(missing)} that the .ui does not define"
    expected = {
        "inputSelector": "qMRMLNodeComboBox", "brainMaskSelector": "qMRMLNodeComboBox",
        "methodComboBox": "QComboBox", "modelComboBox": "QComboBox", "presetComboBox": "QComboBox",
        "deviceComboBox": "QComboBox", "seedSpinBox": "QSpinBox", "batchSizeSpinBox": "QSpinBox",
        "thresholdSliderWidget": "ctkSliderWidget", "thresholdModeComboBox": "QComboBox",
        "applyButton": "QPushButton", "progressBar": "QProgressBar", "statusLabel": "QLabel",
        "warningsLabel": "QLabel", "deviceInfoLabel": "QLabel", "backgroundCheckBox": "QCheckBox",
        "inputsCollapsibleButton": "ctkCollapsibleButton", "methodCollapsibleButton": "ctkCollapsibleButton",
        "advancedCollapsibleButton": "ctkCollapsibleButton", "outputsCollapsibleButton": "ctkCollapsibleButton",
        "thresholdCollapsibleButton": "ctkCollapsibleButton", "modelsCollapsibleButton": "ctkCollapsibleButton",
        "restorationSelector": "qMRMLNodeComboBox", "heatmapSelector": "qMRMLNodeComboBox",
        "segmentationSelector": "qMRMLNodeComboBox", "show3DButton": "qMRMLSegmentationShow3DButton",
        "jumpButton": "QPushButton", "modelsTableWidget": "QTableWidget",
    }
    # the threshold keeps enough precision for calibrated thresholds (e.g. 0.0129482)
    slider = next(w for w in root.iter("widget") if w.get("name") == "thresholdSliderWidget")
    props = {pr.get("name"): pr for pr in slider.findall("property")}
    assert int(props["decimals"].findtext("number")) >= 6
    for name, cls in expected.items():
        assert widgets.get(name) == cls, (name, widgets.get(name))
    # names are unique, custom (non-Qt) classes are declared
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names))
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    assert {cls for cls in widgets.values() if not cls.startswith("Q")} <= declared
    # connections refer to existing widgets
    for c in root.iter("connection"):
        assert c.findtext("sender") in widgets and c.findtext("receiver") in widgets


def test_ui_input_selector_accepts_scalar_volumes_only():
    root = ET.parse(UI_FILE).getroot()
    node = next(w for w in root.iter("widget") if w.get("name") == "inputSelector")
    props = {p.get("name"): p for p in node.findall("property")}
    assert [s.text for s in props["nodeTypes"].iter("string")] == ["vtkMRMLScalarVolumeNode"]
    assert props["showChildNodeTypes"].findtext("bool") == "false"  # no label maps
    assert props["noneEnabled"].findtext("bool") == "false"
    scene_targets = {c.findtext("receiver") for c in root.iter("connection")
                     if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert {"inputSelector", "brainMaskSelector", "restorationSelector", "heatmapSelector",
            "segmentationSelector"} <= scene_targets


# -- icons ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [MODULE_DIR / "Resources" / "Icons" / "UADExtension.png",
                                  REPO / "Resources" / "UADExtension.png"], ids=["module", "extension"])
def test_icons_are_real_128px_pngs(path):
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (128, 128)
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float64)
    assert len(np.unique(rgba.reshape(-1, 4), axis=0)) > 200  # a drawing, not a flat square
    opaque = rgba[..., 3] > 0
    assert 0.3 < opaque.mean() < 0.95  # a shape on a transparent background
    r, b = rgba[..., 0], rgba[..., 2]
    assert ((r - b > 80) & opaque).sum() > 50  # the warm "heat" spot


# -- UADExtension.py -------------------------------------------------------------------------
HEAVY = {"torch", "torchvision", "monai", "lpips", "safetensors", "einops", "scipy", "sklearn", "matplotlib"}


def test_module_file_has_no_heavy_module_level_imports():
    tree = ast.parse(MODULE_PY.read_text())
    top_imports = set()
    for node in tree.body:  # module level only (also inside try/if at module level)
        for sub in ast.walk(node) if isinstance(node, (ast.Try, ast.If)) else [node]:
            if isinstance(sub, ast.Import):
                top_imports |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom) and sub.level == 0:
                top_imports.add(sub.module)
    assert not {m for m in top_imports if m.split(".")[0] in HEAVY}, top_imports
    assert not {m for m in top_imports if m.split(".")[0] == "uad"}, "the engine is imported on Apply only"
    assert all(m.split(".")[0] in {"__future__", "importlib", "logging", "os", "slicer", "vtk", "qt", "ctk",
                                   "UADExtensionLib"} for m in top_imports), top_imports
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes["UADExtension"] == ["ScriptedLoadableModule"]
    assert classes["UADExtensionWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["UADExtensionLogic"] == ["ScriptedLoadableModuleLogic", "_UADExtensionCoreLogic"]
    assert classes["UADExtensionTest"] == ["ScriptedLoadableModuleTest"]
    source = MODULE_PY.read_text()
    assert "tryWithErrorDisplay" in source and "PyTorchUtils" in source
    for call in re.findall(r"pip_install\(([^)]*)\)", source):
        assert "torch" not in call, "torch must come from the PyTorch extension, never pip_install"


def _slicer_app_standins():
    """Minimal stand-ins for Slicer's application-only ``slicer.ScriptedLoadableModule`` (not MRML):
    the module file's classes subclass them, so it can be imported and its Logic used headless."""
    mod = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # same constructor contract as Slicer's
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[:-5]
            self.isSingletonParameterNode = True

    class ScriptedLoadableModuleTest:
        pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(mod, cls.__name__, cls)
    return mod


STANDIN_SOURCE = textwrap.dedent('''
    import sys, types
    mod = types.ModuleType("slicer.ScriptedLoadableModule")
    class ScriptedLoadableModule:
        def __init__(self, parent): self.parent = parent
    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = type(self).__name__[:-5]
    class ScriptedLoadableModuleWidget:
        pass
    class ScriptedLoadableModuleTest:
        pass
    for c in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
              ScriptedLoadableModuleTest):
        setattr(mod, c.__name__, c)
    sys.modules["slicer.ScriptedLoadableModule"] = mod
''')


def test_module_file_loads_before_torch_is_installed():
    code = STANDIN_SOURCE + textwrap.dedent(f"""
        for blocked in ("torch", "torchvision", "monai", "lpips", "safetensors"):
            sys.modules[blocked] = None   # "not installed": importing them raises ImportError
        sys.path.insert(0, {str(MODULE_DIR)!r})
        import UADExtension
        heavy = [m for m in ("torch", "monai", "uad.pipeline", "uad.methods") if sys.modules.get(m) is not None]
        assert not heavy, heavy
        from types import SimpleNamespace
        m = UADExtension.UADExtension(SimpleNamespace())
        print(m.parent.title)
        print(",".join(UADExtension.UADExtensionLogic.availableMethods()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "Anomaly Detection (UAD)"
    assert lines[-1] == "thor,autoddpm,pddpm,disyre,wolleb,anoddpm"


@pytest.fixture
def module(monkeypatch):
    """UADExtension.py imported with the application-only base classes stood in."""
    pytest.importorskip("slicer", reason="slicer-core is needed")
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", _slicer_app_standins())
    monkeypatch.delitem(sys.modules, "UADExtension", raising=False)
    mod = importlib.import_module("UADExtension")
    yield mod
    sys.modules.pop("UADExtension", None)


def test_module_metadata(module):
    from types import SimpleNamespace

    m = module.UADExtension(SimpleNamespace())
    p = m.parent
    assert p.title == "Anomaly Detection (UAD)"
    assert p.categories == ["Segmentation"]
    assert p.contributors and p.helpText
    for name in METHOD_NAMES:
        assert name in p.acknowledgementText, name
    assert "MICCAI" in p.acknowledgementText and "MONAI" in p.acknowledgementText


def test_slicer_logic_is_the_core_logic(module, tmp_path):
    import slicer

    from UADExtensionLib.logic import UADExtensionLogic as CoreLogic

    scene = slicer.vtkMRMLScene()
    logic = module.UADExtensionLogic(scene)
    assert isinstance(logic, CoreLogic)
    assert logic.moduleName == "UADExtension"
    assert logic.isSingletonParameterNode
    assert logic.scene is scene
    assert module.UADExtensionLogic.process is CoreLogic.process
    # with everything installed, the dependency check installs nothing (and needs no slicer.app)
    assert logic.setupPythonRequirements(askConfirmation=False) is True
    # parameter defaults fill only what is unset
    node = slicer.vtkMRMLScriptedModuleNode()
    node.SetParameter("Seed", "7")
    logic.setDefaultParameters(node)
    assert node.GetParameter("Seed") == "7" and node.GetParameter("Device") == "auto"
    assert node.GetParameter("Method") in logic.availableMethods()
    served = [m for m in logic.availableMethods() if logic.modelsForMethod(m)]
    assert node.GetParameter("Method") == ("disyre" if "disyre" in served or not served else served[0])


def test_default_method_is_one_with_a_model(module, tmp_path, monkeypatch):
    import json

    import slicer

    monkeypatch.setenv("UAD_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("UAD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("uad.zoo._candidate_dirs", lambda: [tmp_path])  # only this folder
    (tmp_path / "manifest.json").write_text(json.dumps({"models": [{"id": "m", "methods": ["disyre"]}]}))
    logic = module.UADExtensionLogic(slicer.vtkMRMLScene())
    node = slicer.vtkMRMLScriptedModuleNode()
    logic.setDefaultParameters(node)
    assert node.GetParameter("Method") == "disyre"
    node.SetParameter("Method", "anoddpm")  # a user's choice is kept
    logic.setDefaultParameters(node)
    assert node.GetParameter("Method") == "anoddpm"


# -- dependencies ------------------------------------------------------------------------------
def _engine_third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party modules imported (anywhere, also inside functions) by the modules a
    detection run reaches: uad.pipeline, every method, and what they import from uad."""
    pkg = MODULE_DIR / "uad"

    def path_of(name):
        p = MODULE_DIR.joinpath(*name.split("."))
        if (p / "__init__.py").is_file():
            return p / "__init__.py"
        return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None

    todo = ["uad.pipeline", "uad.simplex"] + [f"uad.methods.{p.stem}" for p in (pkg / "methods").glob("*.py")]
    seen, found = set(), {}
    while todo:
        name = todo.pop()
        path = path_of(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for a in node.names:
                    top = a.name.split(".")[0]
                    if top == "uad":
                        todo.append(a.name)
                    else:
                        found.setdefault(top, set()).add(name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                    todo += [target] + [f"{target}.{a.name}" for a in node.names]
                elif node.module.split(".")[0] == "uad":
                    todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    found.setdefault(node.module.split(".")[0], set()).add(name)
    assert "uad.pipeline" in seen and "uad.preprocess" in seen
    return {k: v for k, v in found.items() if k not in sys.stdlib_module_names}


def test_slicer_installs_what_the_engine_imports():
    from UADExtensionLib import dependencies as deps

    provided = deps.SLICER_BUNDLED | deps.TORCH_PACKAGES | {name for name, _ in deps.REQUIREMENTS}
    needed = _engine_third_party_imports()
    uncovered = {k: sorted(v) for k, v in needed.items() if k not in provided}
    assert not uncovered, f"add to UADExtensionLib/dependencies.py REQUIREMENTS: {uncovered}"
    assert {"torch", "monai", "numpy", "SimpleITK"} <= set(needed)
    # the pip names agree with the engine's own pyproject dependencies
    pyproject = (REPO / "pyproject.toml").read_text()
    for _, req in deps.REQUIREMENTS:
        name, _minimum = deps.requirement_name_and_minimum(req)
        assert re.search(rf'"{re.escape(name)}\s*[><=~!;"]', pyproject, flags=re.I), f"{name} not in pyproject.toml"


def test_requirement_checks():
    from UADExtensionLib import dependencies as deps

    installed = {"monai": "1.5.0", "einops": "0.5.1", "safetensors": "0.4.5", "scipy": "1.13.1", "lpips": "0.1.4",
                 "tqdm": "4.66.0", "nibabel": "5.2.0", "PIL": "10.0.0", "pillow": "10.0.0",
                 "deepbet": "1.0.2", "nilearn": "0.10.3",
                 "torch": "2.0.1+cu118", "torchvision": "0.18.0"}
    find_spec = lambda name: object() if name in installed or name == "numpy" else None  # noqa: E731

    def version(dist):
        if dist in installed:
            return installed[dist]
        raise importlib.metadata.PackageNotFoundError(dist)

    assert deps.missing_requirements(find_spec=find_spec, version=version) == ["einops>=0.6"]  # too old
    installed.pop("lpips")
    assert deps.missing_requirements(find_spec=find_spec, version=version) == ["einops>=0.6", "lpips>=0.1.4"]
    assert deps.torch_missing(find_spec=find_spec, version=version)  # torch 2.0.1 < 2.1
    installed["torch"] = "2.4.1"
    assert not deps.torch_missing(find_spec=find_spec, version=version)
    installed.pop("torchvision")
    assert deps.torch_missing(find_spec=find_spec, version=version)
    # importable but not pip-managed (shipped inside Slicer): accepted
    assert deps.is_satisfied("numpy", "numpy>=1.26", find_spec=find_spec, version=version)
    assert deps.requirement_name_and_minimum("monai[fire]>=1.4") == ("monai", "1.4")
    assert deps.requirement_name_and_minimum("einops") == ("einops", None)
    with pytest.raises(ValueError):
        deps.requirement_name_and_minimum("torch<2")
