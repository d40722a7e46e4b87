"""What an artifact says about its input: size, normalization, class names, precision.

One reader for every artifact kind: repconv checkpoints (their :class:`CheckpointMeta`), ONNX files
(``metadata_props`` written by export) and TensorRT engines (their JSON sidecar, which carries the
ONNX metadata it was built from).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from repconv.checkpoint import CheckpointMeta
from repconv.data import IMAGENET_MEAN, IMAGENET_STD
from repconv.onnx_graph import META_PREFIX

# ONNX metadata_props written by export: "repconv.<key>", lists as JSON text (docs/export.md)
ONNX_KEYS = ("repconv_version", "arch", "plan_digest", "input_size", "mean", "std", "class_names", "dtype")


@dataclass
class ArtifactInfo:
    """The input contract of a model file and what is known about where it came from."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    class_names: list[str] | None = None
    arch: str | None = None
    dtype: str = "fp32"
    kind: str = "model"  # model | converted | folded | onnx | engine
    known: bool = True  # False when size/mean/std are defaults, not read from the file
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, meta: CheckpointMeta) -> ArtifactInfo:
        return cls(tuple(meta.input_size), tuple(meta.mean), tuple(meta.std),
                   list(meta.class_names) if meta.class_names else None, meta.arch, "fp32", meta.kind,
                   known=meta.arch is not None)

    @classmethod
    def from_onnx_props(cls, props: Mapping[str, str], input_shape: tuple | None = None,
                        kind: str = "onnx") -> ArtifactInfo:
        """From ONNX ``metadata_props``; falls back to the graph's input shape when the size is absent."""
        values = {k.removeprefix(META_PREFIX): _parse(v) for k, v in props.items()}
        size = values.get("input_size")
        if size is None and input_shape and all(isinstance(d, int) for d in input_shape[1:]):
            size = input_shape[1:]
        info = cls(kind=kind, known="input_size" in values and "mean" in values)
        if size is not None:
            info.input_size = tuple(int(s) for s in size)
        if values.get("mean") is not None:
            info.mean = tuple(float(v) for v in values["mean"])
        if values.get("std") is not None:
            info.std = tuple(float(v) for v in values["std"])
        if values.get("class_names"):
            info.class_names = [str(c) for c in values["class_names"]]
        info.arch = values.get("arch")
        info.dtype = str(values.get("dtype") or "fp32")
        info.extra = {k: v for k, v in values.items() if k not in ONNX_KEYS}
        return info


def _parse(value: str) -> Any:
    if value == "":
        return None
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        if isinstance(value, str) and "," in value:  # "3,224,224" style
            parts = [p.strip() for p in value.strip("[]()").split(",")]
            try:
                return [float(p) if "." in p else int(p) for p in parts]
            except ValueError:
                return parts
        return value
