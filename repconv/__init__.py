"""repconv: Replacement Learning and parameter-free layers for pretrained PyTorch vision models."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    # The public API (repconv.api.__all__) is imported lazily so that `import repconv` stays light
    # and the low-level modules can import `__version__` without a cycle.
    if name.startswith("__") or name == "api":
        raise AttributeError(name)
    api = importlib.import_module("repconv.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'repconv' has no attribute {name!r}")
