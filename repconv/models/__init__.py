"""Architecture registry: repconv's own models, torchvision's classifiers and timm's models.

A name resolves in that order; ``repconv:NAME``, ``torchvision:NAME`` or ``timm:NAME`` picks one source
explicitly. ``package.module:callable`` (any ``X:Y`` whose ``X`` is not one of those sources) imports a
user's own builder: the module must be importable from ``sys.path`` or the current directory, and it is
imported only when a name in that form is asked for. Files saved from such a model record that name as
their ``arch``, so loading them imports the same module again: it must still be importable then (and
loading a file that names one is an explicit choice: see ``resolve_arch(..., import_builders=)``).

Nothing here downloads weights: torchvision's weight enums are read only for their metadata
(input size, mean, std, class names), timm's ImageNet class names come with timm.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from repconv.data import IMAGENET_MEAN, IMAGENET_STD
from repconv.errors import ArchError, DependencyError


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture and what input it expects."""

    name: str  # canonical, with its source: "torchvision:resnet50", "repconv:cifar_resnet32", "pkg.mod:build"
    source: str  # "repconv" | "torchvision" | "timm" | "python"
    builder: Callable[..., nn.Module]
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_classes: int = 1000
    class_names: tuple[str, ...] | None = field(default=None, repr=False)

    @property
    def short_name(self) -> str:
        return self.name.split(":", 1)[1]

    def build(self, **kwargs) -> nn.Module:
        try:
            return self.builder(**kwargs)
        except TypeError as exc:
            raise ArchError(f"cannot build {self.name} with {kwargs}: {exc}",
                            "check {option} and the architecture's keyword arguments", option="num_classes") from exc


_OWN: dict[str, ArchSpec] = {}


def register_model(name: str, *, input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   num_classes: int = 1000, class_names=None):
    """Decorator registering one of repconv's own model builders; a name already taken is refused."""

    def wrap(builder: Callable[..., nn.Module]):
        if name in _OWN:
            raise ValueError(f"An entry is already registered under the name '{name}'.")
        _OWN[name] = ArchSpec(f"repconv:{name}", "repconv", builder, tuple(input_size), tuple(mean),
                              tuple(std), num_classes, tuple(class_names) if class_names else None)
        return builder

    return wrap


def _load_own_models() -> None:
    # Importing the definition modules registers them; done lazily to keep `import repconv` light.
    import repconv.models.definitions  # noqa: F401


def _torchvision_spec(name: str) -> ArchSpec | None:
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        return None
    builder = tvm.get_model_builder(name)
    input_size, mean, std, classes = (3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, None
    try:
        weights = tvm.get_model_weights(name).DEFAULT
        kw = getattr(weights.transforms, "keywords", {})
        crop = kw.get("crop_size", 224)
        input_size = (3, crop, crop)
        mean, std = tuple(kw.get("mean", mean)), tuple(kw.get("std", std))
        classes = tuple(weights.meta.get("categories") or ()) or None
    except (ValueError, AttributeError):
        pass
    if name.startswith("vit_"):  # the constructor's image_size, not the (SWAG) weights' one
        input_size = (3, 224, 224)
    return ArchSpec(f"torchvision:{name}", "torchvision", builder, input_size, mean, std, 1000, classes)


def _timm_spec(name: str) -> ArchSpec | None:
    if importlib.util.find_spec("timm") is None:
        return None
    import timm

    if not timm.is_model(name):
        return None
    cfg = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
    input_size = tuple(getattr(cfg, "input_size", (3, 224, 224)) or (3, 224, 224))
    mean = tuple(getattr(cfg, "mean", IMAGENET_MEAN) or IMAGENET_MEAN)
    std = tuple(getattr(cfg, "std", IMAGENET_STD) or IMAGENET_STD)

    def build(**kwargs):
        return timm.create_model(name, pretrained=False, **kwargs)

    return ArchSpec(f"timm:{name}", "timm", build, input_size, mean, std, 1000, _timm_class_names(cfg))


def _timm_class_names(cfg) -> tuple[str, ...] | None:
    """ImageNet-1k class names (first WordNet lemma: "tench", "goldfish", ...) when the pretrained config is
    a 1000-class ImageNet classifier; the config's own names when it carries some; else None."""
    own = getattr(cfg, "label_names", None)
    num_classes = getattr(cfg, "num_classes", None)
    if own and len(own) == num_classes:
        return tuple(str(n) for n in own)
    if num_classes != 1000 or getattr(cfg, "label_offset", 0):
        return None
    from timm.data import infer_imagenet_subset

    if infer_imagenet_subset(cfg) != "imagenet-1k":
        return None
    return _imagenet1k_names()


@functools.lru_cache(maxsize=1)
def _imagenet1k_names() -> tuple[str, ...] | None:
    try:
        from timm.data import ImageNetInfo

        descriptions = ImageNetInfo("imagenet-1k").label_descriptions(detailed=False)
    except (ImportError, OSError, AssertionError):  # an older timm without its _info files
        return None
    return tuple(d.split(", ")[0] for d in descriptions) if len(descriptions) == 1000 else None


KNOWN_SOURCES = ("repconv", "torchvision", "timm")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_python_arch(name: str) -> bool:
    """Whether ``name`` asks for a user's builder (``package.module:callable``) rather than a known source."""
    source, sep, rest = name.strip().partition(":")
    return bool(sep) and source not in KNOWN_SOURCES and ":" not in rest


def _python_spec(name: str) -> ArchSpec:
    """Import ``module.path:callable`` (cwd on sys.path for that import only) and wrap the callable.

    The callable may carry a ``repconv_spec`` dict (``input_size``, ``mean``, ``std``, ``num_classes``,
    ``class_names``) to describe its input; without one, ImageNet's 224x224 contract is assumed.
    """
    module_name, _, attr = name.partition(":")
    if not _DOTTED.fullmatch(module_name) or not _DOTTED.fullmatch(attr):
        raise ArchError(f"'{name}' is neither a known architecture nor module.path:callable",
                        "use repconv:NAME, torchvision:NAME, timm:NAME, or a Python builder as package.module:function")
    added = None
    if os.getcwd() not in sys.path and "" not in sys.path:
        added = os.getcwd()
        sys.path.insert(0, added)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise ArchError(f"cannot import '{module_name}' for {{option}} {name}: no module named '{missing}'",
                        f"'{module_name}' must be importable from the current directory or PYTHONPATH; "
                        f"known sources are {', '.join(KNOWN_SOURCES)}", option="arch") from exc
    except Exception as exc:  # the user's module failed while importing: say how, in one line
        first = (str(exc).splitlines() or [""])[0][:160]
        raise ArchError(f"importing '{module_name}' for {{option}} {name} failed: {type(exc).__name__}: {first}",
                        f"fix the module, or check it with python -c 'import {module_name}'", option="arch") from exc
    finally:
        if added is not None and added in sys.path:
            sys.path.remove(added)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ArchError(f"module '{module_name}' has no attribute '{attr}'",
                            f"its callables are: {', '.join(public[:8]) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ArchError(f"'{name}' is a {type(obj).__name__}, not a callable that builds a model",
                        "point {option} at a function or nn.Module class", option="arch")
    extra = getattr(obj, "repconv_spec", None) or {}
    names = extra.get("class_names")
    return ArchSpec(name, "python", obj, tuple(extra.get("input_size", (3, 224, 224))),
                    tuple(extra.get("mean", IMAGENET_MEAN)), tuple(extra.get("std", IMAGENET_STD)),
                    int(extra.get("num_classes", 1000)), tuple(names) if names else None)


def resolve_arch(name: str, *, import_builders: bool = True) -> ArchSpec:
    """Find an architecture by name: repconv's own, then torchvision, then timm; or import a user's builder.

    ``import_builders=False`` refuses ``module.path:callable`` names instead of importing them (for names
    read from a file rather than typed by the user: importing runs the module's code)."""
    name = name.strip()
    if is_python_arch(name):
        if not import_builders:
            raise ArchError(f"the file names a Python builder '{name}', and importing it runs that module's code",
                            f"give {{option}} {name} to allow it (the module must be importable)", option="arch")
        return _python_spec(name)
    source, _, bare = name.rpartition(":")
    if source not in ("", "repconv", "torchvision", "timm"):
        raise ArchError(f"unknown architecture source '{source}' in '{name}'",
                        "use repconv:NAME, torchvision:NAME, timm:NAME or package.module:callable")
    if source in ("", "repconv"):
        _load_own_models()
        if bare in _OWN:
            return _OWN[bare]
    if source in ("", "torchvision"):
        spec = _torchvision_spec(bare)
        if spec:
            return spec
    if source == "timm" and importlib.util.find_spec("timm") is None:
        raise DependencyError(f"'{name}' needs timm, which is not installed",
                              "pip install 'repconv[timm]'")
    if source in ("", "timm"):
        spec = _timm_spec(bare)
        if spec:
            return spec
    hint = "run `repconv models` to list known names"
    if importlib.util.find_spec("timm") is None:
        hint += "; timm is not installed (pip install 'repconv[timm]')"
    raise ArchError(f"unknown architecture '{name}'", hint)


def list_models() -> dict[str, list[str]]:
    """Names per source, as `repconv models` shows them."""
    import torchvision.models as tvm

    _load_own_models()
    out = {"repconv": sorted(_OWN), "torchvision": sorted(tvm.list_models(module=tvm))}
    if importlib.util.find_spec("timm") is not None:
        import timm

        out["timm"] = timm.list_models()
    return out


def build_on_meta(spec: ArchSpec, **kwargs) -> nn.Module | None:
    """The architecture on the meta device (no memory, no init), or None when its builder needs real
    tensors (regnet computes its widths with tensor ops, for one)."""
    try:
        with torch.device("meta"):
            return spec.build(**kwargs)
    except (NotImplementedError, RuntimeError):
        return None


def default_num_classes(spec: ArchSpec) -> int:
    try:
        param = inspect.signature(spec.builder).parameters.get("num_classes")
    except (TypeError, ValueError):
        param = None
    if param is not None and isinstance(param.default, int):
        return param.default
    return spec.num_classes


def classifier_keys(spec: ArchSpec) -> list[str]:
    """State-dict keys of the classifier: the trailing parameters whose first dim is the class count.

    Built on the meta device, so this costs no memory and no initialisation time.
    """
    n = default_num_classes(spec)
    model = build_on_meta(spec) or spec.build()
    keys = []
    for key, p in reversed(list(model.named_parameters())):
        if p.ndim == 0 or p.shape[0] != n:
            break
        keys.append(key)
    return keys[::-1]


def infer_num_classes(spec: ArchSpec, state_dict: dict[str, torch.Tensor]) -> int | None:
    """The class count the classifier weights in ``state_dict`` say, or None when they say nothing."""
    for key in classifier_keys(spec):
        if key in state_dict and state_dict[key].ndim >= 1:
            return int(state_dict[key].shape[0])
    return None
