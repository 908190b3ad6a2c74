"""Method registry: one file per method, selected by name."""

from __future__ import annotations

import importlib

from .base import Method, MethodOutput

# name -> module (relative to this package) that defines the class of the same ``name``.
_MODULES = {
    "anoddpm": "anoddpm",
    "thor": "thor",
    "autoddpm": "autoddpm",
    "disyre": "disyre",
    "wolleb": "wolleb",
    "pddpm": "pddpm",
}


def register(name: str, module: str) -> None:
    _MODULES[name] = module


def available_methods() -> list[str]:
    return sorted(_MODULES)


def get_method_class(name: str) -> type[Method]:
    key = name.lower().replace("-", "_")
    if key not in _MODULES:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    mod = importlib.import_module(f"{__name__}.{_MODULES[key]}")
    for obj in vars(mod).values():
        if isinstance(obj, type) and issubclass(obj, Method) and getattr(obj, "name", None) == key:
            return obj
    raise RuntimeError(f"module {_MODULES[key]} defines no Method named {key!r}")


def build_method(name: str, model, preset: str | None = None, **params) -> Method:
    return get_method_class(name)(model, preset=preset, **params)


__all__ = ["Method", "MethodOutput", "available_methods", "get_method_class", "build_method", "register"]
