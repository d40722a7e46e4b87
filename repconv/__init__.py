"""repconv: Replacement Learning and parameter-free layers for pretrained PyTorch vision models."""

from __future__ import annotations

import importlib
import sys
import types

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


class _ApiNamedPackage(types.ModuleType):
    """A subpackage that shares its name with an API function (``repconv.convert``, ``repconv.train``).

    Importing ``repconv.convert.graph`` makes Python set the attribute ``repconv.convert`` to the
    subpackage, which would hide the function ``repconv.convert``. Such subpackages are made callable:
    calling one calls the API function, and its submodules stay reachable as attributes.
    """

    def __call__(self, *args, **kwargs):
        api = importlib.import_module("repconv.api")
        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in ("convert", "train") and type(value) is types.ModuleType:
            value.__class__ = _ApiNamedPackage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
