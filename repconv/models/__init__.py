"""Architecture registry: repconv's own models, torchvision's classifiers and timm's models.

A name resolves in that order; ``torchvision:NAME`` or ``timm:NAME`` picks one source explicitly.
Nothing here downloads weights: torchvision's weight enums are read only for their metadata
(input size, mean, std, class names).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from repconv.data import IMAGENET_MEAN, IMAGENET_STD
from repconv.errors import ArchError, DependencyError


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture and what input it expects."""

    name: str  # canonical, with its source: "torchvision:resnet50", "repconv:cifar_resnet32"
    source: str  # "repconv" | "torchvision" | "timm"
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
    """Decorator registering one of repconv's own model builders."""

    def wrap(builder: Callable[..., nn.Module]):
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

    return ArchSpec(f"timm:{name}", "timm", build, input_size, mean, std, 1000)


def resolve_arch(name: str) -> ArchSpec:
    """Find an architecture by name: repconv's own, then torchvision, then timm."""
    name = name.strip()
    source, _, bare = name.rpartition(":")
    if source not in ("", "repconv", "torchvision", "timm"):
        raise ArchError(f"unknown architecture source '{source}' in '{name}'",
                        "use repconv:NAME, torchvision:NAME or timm:NAME")
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
