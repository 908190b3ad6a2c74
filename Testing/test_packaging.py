"""Extensions Index packaging: catalog JSON valid against the Index's schema, literal URLs, consistency.

The schema is kept in Testing/data (source in Testing/data/README.md).  ``jsonschema``
validates when it is installed; otherwise a small validator of exactly the draft-07
keywords this schema uses (checked below) does, and both are shown to reject bad entries.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from test_slicer_module import ACCEPTED_CATEGORIES, _cmake_sets, _cmake_text

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "Testing" / "data" / "slicer-extension-catalog-entry-schema-v1.0.1.json"
CATALOG = REPO / "UADExtension.json"
SUPPORTED = {"$schema", "$id", "type", "title", "description", "required", "additionalProperties", "properties",
             "enum", "default", "minimum", "maximum", "items", "additionalItems"}
TYPES = {"object": dict, "string": str, "array": list, "boolean": bool, "integer": int}


def _keywords(schema):
    if isinstance(schema, dict):
        out = set(schema)
        for key, value in schema.items():
            if key == "properties":
                for sub in value.values():
                    out |= _keywords(sub)
            elif key == "items":
                out |= _keywords(value)
        return out
    return set()


def _errors(instance, schema, path="$") -> list[str]:
    """Errors of ``instance`` against the SUPPORTED keywords (draft-07 semantics)."""
    errs = []
    t = schema.get("type")
    if t is not None:
        ok = isinstance(instance, TYPES[t]) and not (t == "integer" and isinstance(instance, bool))
        if not ok:
            return [f"{path}: not of type {t}"]
    if "enum" in schema and instance not in schema["enum"]:
        errs.append(f"{path}: {instance!r} not in {schema['enum']}")
    if "minimum" in schema and instance < schema["minimum"]:
        errs.append(f"{path}: {instance} < {schema['minimum']}")
    if "maximum" in schema and instance > schema["maximum"]:
        errs.append(f"{path}: {instance} > {schema['maximum']}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errs.append(f"{path}: {key!r} is a required property")
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                errs += _errors(value, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errs.append(f"{path}: additional property {key!r}")
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            errs += _errors(item, schema["items"], f"{path}[{i}]")
    return errs


def _validate(instance, schema) -> list[str]:
    try:
        import jsonschema
    except ImportError:
        return _errors(instance, schema)
    return [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(instance)]


@pytest.fixture(scope="module")
def schema():
    s = json.loads(SCHEMA.read_text())
    assert s["title"] == "3D Slicer extensions catalog entry schema"
    assert _keywords(s) <= SUPPORTED, f"keywords the fallback validator does not know: {_keywords(s) - SUPPORTED}"
    return s


def test_catalog_json_is_valid_against_the_extensions_index_schema(schema):
    entry = json.loads(CATALOG.read_text())
    assert _validate(entry, schema) == []
    assert _errors(entry, schema) == []  # and with the fallback validator
    assert entry["$schema"].rstrip("#").endswith(SCHEMA.name)
    for bad, why in ((dict(entry, tier=7), "tier"), (dict(entry, tier="1"), "tier"),
                     ({k: v for k, v in entry.items() if k != "category"}, "category"),
                     (dict(entry, homepage="https://x"), "homepage"), (dict(entry, scm_type="svn"), "svn"),
                     (dict(entry, build_dependencies="PyTorch"), "build_dependencies")):
        for validate in (_validate, _errors):
            errs = validate(bad, schema)
            assert errs, f"{why}: accepted"


def test_catalog_json_agrees_with_the_cmake_and_the_index_rules():
    entry = json.loads(CATALOG.read_text())
    sets = _cmake_sets(REPO / "CMakeLists.txt")
    project = re.search(r"\bproject\(\s*(\w+)\s*\)", _cmake_text(REPO / "CMakeLists.txt")).group(1)
    assert CATALOG.stem == project == "UADExtension" and not project.startswith("Slicer")
    assert entry["category"] == sets["EXTENSION_CATEGORY"][0] and entry["category"] in ACCEPTED_CATEGORIES
    assert entry["build_dependencies"] == sets["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert entry["scm_url"].startswith("https://github.com/")
    repo_name = entry["scm_url"].rstrip("/").split("/")[-1]
    assert re.match(r"^Slicer(-|_|Extension-)?[A-Z0-9]", repo_name), "the Index wants the repository named Slicer..."
    assert sets["EXTENSION_HOMEPAGE"][0].startswith(entry["scm_url"])
    assert 1 <= entry["tier"] <= 5 and entry["scm_revision"] == "main"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_cmake_urls_are_literal_https_urls_to_files_in_this_repository():
    text = (REPO / "CMakeLists.txt").read_text()
    entry = json.loads(CATALOG.read_text())
    owner_repo = "/".join(entry["scm_url"].rstrip("/").split("/")[-2:])
    raw = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        m = re.search(rf'set\({var}\s+"([^"]*)"\)', text)
        assert m, f"{var} must be one quoted literal"
        value = m.group(1)
        assert "${" not in value, f"{var} uses a variable; the Index reads it literally"
        for url in value.split():
            assert url.startswith("https://"), url
            if var != "EXTENSION_HOMEPAGE":
                assert url.startswith(raw) and url.endswith(".png"), url
                w, h = _png_size(REPO / url[len(raw):])
                assert w >= 128 and h >= 128
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS\s+"([^"]*)"\)', text).group(1)
    assert contributors != "UADExtension developers" and "(" in contributors  # name (affiliation)
