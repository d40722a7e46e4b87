"""How ``import repconv`` exposes the API: lazily, and with ``repconv.convert`` / ``export`` / ``train`` callable.

``repconv.convert(...)`` is the public stage function, and ``repconv.convert`` is also the package of fx
passes (``repconv.convert.graph``). The package object wins the name once it is imported, so the root
package makes those subpackages callable as they are attached: calling one calls the API function of the
same name. The wiring lives here, at the top, so no subpackage imports upward.
"""

from __future__ import annotations

import sys
import types

_CALLABLE_SUBPACKAGES = ("convert", "export", "train")


class _StagePackage(types.ModuleType):
    """A subpackage that is also its stage's public function."""

    def __call__(self, *args, **kwargs):
        return getattr(_api(), self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Root(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__") or name == "api":
            raise AttributeError(name)
        api = _api()
        if name in api.__all__:
            return getattr(api, name)
        raise AttributeError(f"module 'repconv' has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in _CALLABLE_SUBPACKAGES and type(value) is types.ModuleType:
            value.__class__ = _StagePackage
        super().__setattr__(name, value)


def _api() -> types.ModuleType:
    from repconv import api

    return api


def install(name: str) -> None:
    """Give the root package its lazy attributes and callable stage subpackages."""
    sys.modules[name].__class__ = _Root
