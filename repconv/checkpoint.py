"""Reading checkpoints safely and writing repconv's own files atomically.

Accepted inputs: a state_dict saved with ``torch.save`` (bare, or under ``state_dict`` / ``model`` /
``model_state_dict``, with DDP's ``module.`` prefix stripped), a ``.safetensors`` state_dict, and
repconv's own container (``*.repconv.safetensors``: safetensors weights plus a JSON header holding the
architecture, the plan and the input spec). ``torch.load`` always runs with ``weights_only=True``; a
pickled ``nn.Module`` loads only with ``trust_pickle=True``.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repconv._version import __version__
from repconv.convert.graph import FX_CONSTANT, trace
from repconv.convert.plan import Plan
from repconv.errors import ArchError, InputFileError, OptionError, RepconvError
from repconv.io import atomic_path, sniff
from repconv.models import ArchSpec, build_on_meta, infer_num_classes, resolve_arch
from repconv.models.remap import RemapMode, remap_for_arch

FORMAT_VERSION = 1
META_KEY = "repconv"
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


# ---------------------------------------------------------------- metadata


@dataclass
class CheckpointMeta:
    """The header of a repconv container; also what export writes into ONNX metadata."""

    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = "model"  # model | converted | folded
    plan: Plan | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    class_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    repconv_version: str = __version__
    torch_version: str = torch.__version__
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["plan"] = self.plan.to_dict() if self.plan else None
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        data = json.loads(text)
        if data.get("format_version", 1) > FORMAT_VERSION:
            raise InputFileError(f"file format version {data['format_version']} is newer than this repconv reads",
                                 "upgrade repconv")
        data["plan"] = Plan.from_dict(data["plan"]) if data.get("plan") else None
        data["input_size"] = tuple(data.get("input_size", (3, 224, 224)))
        data["mean"], data["std"] = tuple(data.get("mean", ())), tuple(data.get("std", ()))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_input(self, input_size=None, mean=None, std=None) -> CheckpointMeta:
        """A copy with the user's preprocessing (a square ``input_size`` int, or (C, H, W)), where given."""
        import copy

        meta = copy.deepcopy(self)
        if input_size is not None:
            meta.input_size = (3, input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        meta.mean = tuple(mean) if mean is not None else meta.mean
        meta.std = tuple(std) if std is not None else meta.std
        return meta

    @classmethod
    def for_arch(cls, spec: ArchSpec, arch_kwargs: dict | None = None, **kw) -> CheckpointMeta:
        names = list(spec.class_names) if spec.class_names else None
        if names and arch_kwargs and arch_kwargs.get("num_classes", len(names)) != len(names):
            names = None
        names = kw.pop("class_names", names)
        return cls(arch=spec.name, arch_kwargs=dict(arch_kwargs or {}), input_size=spec.input_size,
                   mean=spec.mean, std=spec.std, class_names=names, **kw)


@dataclass
class Loaded:
    """A model read from disk with everything known about it."""

    model: nn.Module
    meta: CheckpointMeta
    path: Path | None = None

    @property
    def is_converted(self) -> bool:
        return self.meta.kind == "converted"


# ---------------------------------------------------------------- reading raw files


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputFileError(f"'{path}' does not exist", "check the path")
    if path.is_dir():
        raise InputFileError(f"'{path}' is a folder, not a checkpoint file", "give the file inside it")
    if path.stat().st_size == 0:
        raise InputFileError(f"'{path}' is empty (0 bytes)", "re-save the checkpoint; the write was interrupted?")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        return load_file(str(path)), header
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputFileError(f"'{path}' is not a readable safetensors file ({exc})",
                             "the file is truncated or corrupt: re-save it") from exc


def _describe_pickle_error(path: Path, exc: Exception) -> RepconvError:
    text = str(exc)
    if "Unsupported global" in text or "GLOBAL" in text or "weights_only" in text.lower():
        name = ""
        for marker in ("Unsupported global: GLOBAL ", "GLOBAL "):
            if marker in text:
                name = text.split(marker, 1)[1].split()[0].rstrip(".,:")
                break
        what = f" ({name})" if name else ""
        return OptionError(
            "trust_pickle", None, f"is needed to load '{path}': it holds a pickled Python object{what}, not plain "
            "weights, and loading it could run code from the file",
            "save model.state_dict() instead, or allow it only if you trust where the file came from")
    return InputFileError(f"'{path}' is not a PyTorch checkpoint ({type(exc).__name__}: "
                          f"{text.splitlines()[0][:120] if text else ''})",
                          "give a state_dict saved with torch.save, a .safetensors file or a repconv file")


def read_torch_file(path: Path, trust_pickle: bool = False) -> Any:
    """``torch.load`` of a zip archive or pickle stream, never running code unless ``trust_pickle``."""
    if sniff(path) == "torch-zip" and not zipfile.is_zipfile(path):
        raise InputFileError(f"'{path}' is truncated or corrupt (not a complete zip archive)",
                             "re-save or re-download the checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # torch.load raises many kinds on bad input; all are the file's fault
        if isinstance(exc, (EOFError, zipfile.BadZipFile)) or "PytorchStreamReader" in str(exc):
            raise InputFileError(f"'{path}' is truncated or corrupt ({type(exc).__name__})",
                                 "re-save or re-download the checkpoint") from exc
        raise _describe_pickle_error(path, exc) from exc


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(2):
        if isinstance(obj, dict) and not _is_state_dict(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        raise InputFileError(f"'{path}' holds a {type(obj).__name__}, not a state_dict",
                             "expected a dict of tensors, optionally under 'state_dict' or 'model'")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and \
        sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


# ---------------------------------------------------------------- building models


def fit_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], arch: str, path: Path | None) -> None:
    """``load_state_dict(strict=True)`` with a short readable report instead of a stack trace.

    Tensors torch.fx creates while tracing (``_tensor_constant{i}`` at the root, e.g. maxvit_t's relative
    position index) belong to the graph, not to the weights: each side keeps its own.
    """
    own = model.state_dict()
    state_dict = OrderedDict((k, v) for k, v in state_dict.items() if k in own or not FX_CONSTANT.fullmatch(k))
    state_dict.update((k, v) for k, v in own.items() if k not in state_dict and FX_CONSTANT.fullmatch(k))
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                shown = ", ".join(keys[:4]) + (f", ... ({len(keys)} in all)" if len(keys) > 4 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        src = f"'{path}'" if path else "the weights"
        raise ArchError(f"{src} do not fit {arch}: " + "; ".join(parts),
                        "check {option} (and the class count), or that the file belongs to this architecture",
                        option="arch")
    # Modules that check their version while loading (torchvision's MNASNet) need the state_dict metadata,
    # which safetensors files and rebuilt dicts do not carry. The keys and shapes match this freshly built
    # model exactly, so its own module versions are the right ones.
    state_dict._metadata = own._metadata  # type: ignore[attr-defined]
    model.load_state_dict(state_dict, strict=True)


def build_empty(spec: ArchSpec, **kwargs) -> nn.Module:
    """Build with uninitialised storage when a strict load will fill every tensor.

    Random initialisation costs ~0.5 s for a ResNet-50 and is thrown away by the load. The module is
    built on the meta device and materialised with ``to_empty`` (fresh, aligned CPU storage: loading
    with ``assign=True`` instead would keep safetensors' buffers, on which oneDNN may pick kernels that
    round differently, and a re-loaded model would no longer be bit-exact).
    """
    model = build_on_meta(spec, **kwargs)
    if model is None:
        return spec.build(**kwargs)
    persistent = set(model.state_dict())
    if all(n in persistent for n, _ in [*model.named_parameters(), *model.named_buffers()]):
        return model.to_empty(device="cpu")
    return spec.build(**kwargs)


def build_from_meta(meta: CheckpointMeta, import_builders: bool = True) -> nn.Module:
    """A fresh module with the structure the metadata describes (weights still random).

    ``import_builders=False`` refuses an ``arch`` naming a user's ``module:callable`` (importing it would run
    code named by a file's header)."""
    from repconv.convert.apply import apply_plan  # the one place plans are applied

    model = build_empty(resolve_arch(meta.arch, import_builders=import_builders), **meta.arch_kwargs)
    if meta.plan is not None and meta.plan.steps:
        model = apply_plan(trace(model, meta.plan.leaves), meta.plan, model_for_init=None)
    if meta.extra.get("fused_bn"):  # a folded file saved with conv + BN fused: same fusion, same structure
        from repconv.convert.fold import fuse_conv_bn

        model, _ = fuse_conv_bn(model.eval(), meta.plan.leaves if meta.plan else ())
    return model


def read_checkpoint(path: str | os.PathLike, *, arch: str | None = None, num_classes: int | None = None,
                    trust_pickle: bool = False, remap: RemapMode | None = None,
                    remap_rules: str | os.PathLike | None = None) -> Loaded:
    """Read any supported checkpoint file into a module, with its metadata. The format is recognised by the
    file's content (:func:`repconv.io.sniff`), whatever its name: a repconv file saved as ``model.pt`` loads.

    A foreign layout (other key names) is mapped onto ``arch`` by ``remap="position"`` (in order, shapes
    checked) or by ``remap_rules`` (a rules file, or the name of one repconv ships): see
    :mod:`repconv.models.remap`; the mapping is recorded in the metadata (``extra["remap"]``).
    """
    path = Path(path)
    _check_file(path)
    kind = sniff(path)
    foreign = {"mode": remap, "rules": remap_rules}
    if kind == "safetensors":
        sd, header = read_safetensors(path)
        if META_KEY in header:
            if remap or remap_rules:
                raise OptionError("remap", remap or str(remap_rules), f"does not apply to '{path}', a repconv file",
                                  "leave it out: its keys are repconv's own")
            meta = CheckpointMeta.from_json(header[META_KEY])
            return _from_container(sd, meta, path, arch, trusted=trust_pickle or (arch or "").strip() == meta.arch)
        return _from_state_dict(sd, path, arch, num_classes, **foreign)
    if kind in _NOT_CHECKPOINTS:
        raise InputFileError(f"'{path}' is {_NOT_CHECKPOINTS[kind]}, not a checkpoint",
                             "give the PyTorch checkpoint (a state_dict, .safetensors or repconv file)")
    if kind not in ("torch-zip", "pickle"):
        head = path.read_bytes()[:8]
        raise InputFileError(f"'{path}' is not a PyTorch checkpoint (it starts with {head!r})",
                             "give a state_dict saved with torch.save, a .safetensors file or a repconv file")
    obj = read_torch_file(path, trust_pickle)
    if isinstance(obj, nn.Module):
        if arch:
            return _from_state_dict(obj.state_dict(), path, arch, num_classes, **foreign)
        meta = CheckpointMeta(arch=None, extra={"python_class": type(obj).__qualname__})
        return Loaded(obj.eval(), meta, path)
    return _from_state_dict(_unwrap_state_dict(obj, path), path, arch, num_classes, **foreign)


_NOT_CHECKPOINTS = {"torchscript": "a TorchScript archive (save the eager model's weights with "
                                   "torch.save(model.state_dict(), path))",
                    "onnx": "an ONNX file", "engine": "a TensorRT engine"}


def _from_container(sd: dict[str, torch.Tensor], meta: CheckpointMeta, path: Path, arch: str | None,
                    trusted: bool) -> Loaded:
    """A repconv file. Its header may name a user's builder (``module:callable``): that module is imported only
    when the user named the same architecture or trusts the file, as for a pickle."""
    if arch and meta.arch and resolve_arch(arch).name != meta.arch:
        raise OptionError("arch", arch, f"does not match '{path}', which was made for {meta.arch}",
                          "leave it out for repconv files")
    model = build_from_meta(meta, import_builders=trusted)
    fit_state_dict(model, sd, meta.arch, path)
    model.eval()
    return Loaded(model, meta, path)


def _from_state_dict(sd: dict[str, torch.Tensor], path: Path, arch: str | None, num_classes: int | None,
                     mode: RemapMode | None = None, rules: str | os.PathLike | None = None) -> Loaded:
    if not arch:
        raise OptionError("arch", None, f"is needed: '{path}' holds only weights, so repconv cannot tell the "
                          "architecture", "give its name, e.g. resnet50")
    spec = resolve_arch(arch)
    if mode or rules:
        sd, report, kwargs = remap_for_arch(sd, spec, num_classes=num_classes, mode=mode, rules=rules)
        model = build_empty(spec, **kwargs)
        fit_state_dict(model, sd, spec.name, path)
        meta = CheckpointMeta.for_arch(spec, kwargs)
        meta.extra["remap"] = {"mode": report.mode, "rules_file": report.rules_file, "renamed": report.renamed}
        return Loaded(model.eval(), meta, path)
    nc = num_classes or infer_num_classes(spec, sd)
    kwargs = {"num_classes": nc} if nc is not None and nc != spec.num_classes else {}
    if nc is not None and spec.source == "repconv":
        kwargs = {"num_classes": nc}
    model = build_empty(spec, **kwargs)
    fit_state_dict(model, sd, spec.name, path)
    model.eval()
    return Loaded(model, CheckpointMeta.for_arch(spec, kwargs), path)


# ---------------------------------------------------------------- the public functions

ModelLike = str | os.PathLike | nn.Module | Loaded


def load_checkpoint(model: ModelLike, *, arch: str | None = None, num_classes: int | None = None,
                    trust_pickle: bool = False, remap: RemapMode | None = None,
                    remap_rules: str | os.PathLike | None = None) -> Loaded:
    """A path, a module or a Loaded -> Loaded (module + metadata); see :func:`read_checkpoint`."""
    if isinstance(model, Loaded):
        return model
    if isinstance(model, nn.Module):
        meta = CheckpointMeta.for_arch(resolve_arch(arch)) if arch else CheckpointMeta()
        return Loaded(model, meta)
    return read_checkpoint(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, remap=remap,
                           remap_rules=remap_rules)


def load(path: str | os.PathLike, *, arch: str | None = None, num_classes: int | None = None,
         trust_pickle: bool = False, remap: RemapMode | None = None,
         remap_rules: str | os.PathLike | None = None) -> nn.Module:
    """Read any checkpoint repconv accepts and return the module (converted ones come back converted)."""
    return load_checkpoint(path, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, remap=remap,
                           remap_rules=remap_rules).model


# ---------------------------------------------------------------- writing


def save(path: str | os.PathLike, model: nn.Module, meta: CheckpointMeta) -> Path:
    """Write a repconv container (safetensors weights + JSON header), atomically."""
    from safetensors.torch import save_file

    if meta.arch is None:
        raise ArchError("cannot save a model whose architecture is unknown",
                        "load it with {option} NAME so that the file can be rebuilt later", option="arch")
    sd = _plain_tensors(model.state_dict())
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={META_KEY: meta.to_json()})
    return Path(path)


def save_state_dict(path: str | os.PathLike, state_dict: dict[str, torch.Tensor],
                    metadata: dict[str, str] | None = None) -> Path:
    """A plain state_dict (``.safetensors``, or ``.pt`` by suffix) that any PyTorch code can load."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = _plain_tensors(state_dict)
    with atomic_path(path) as tmp:
        if path.suffix in (".pt", ".pth"):
            torch.save(sd, tmp)
        else:
            save_file(sd, str(tmp), metadata=metadata)
    return path


def _plain_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous, unshared CPU tensors, as safetensors requires."""
    seen: set[int] = set()
    out = {}
    for k, v in sd.items():
        t = v.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out
