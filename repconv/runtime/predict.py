"""Top-k classes for image files with any artifact a Session opens."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from repconv.errors import OptionError
from repconv.options import Backend, Device
from repconv.runtime.base import Session
from repconv.runtime.preprocess import load_images
from repconv.runtime.session import open_session

__all__ = ["PredictResult", "predict"]


@dataclass
class ClassScore:
    index: int
    label: str | None
    probability: float


@dataclass
class ImagePrediction:
    path: str
    top: list[ClassScore]


@dataclass
class PredictResult:
    artifact: str
    backend: str
    device: str
    input_size: tuple[int, int, int]
    predictions: list[ImagePrediction]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_images(session: Session, images: Sequence[str | os.PathLike], top_k: int = 5,
                   batch_size: int = 32) -> PredictResult:
    if top_k < 1:
        raise OptionError("top_k", top_k, "is not positive", "use 1 or more")
    batch = load_images(images, session.info)
    probs = softmax(session.run_batched(batch.tensor.numpy(), batch_size))
    if top_k > probs.shape[1]:
        raise OptionError("top_k", top_k, f"is more than the model's {probs.shape[1]} classes",
                          f"use at most {probs.shape[1]}")
    names = session.class_names
    if names is not None and len(names) != probs.shape[1]:
        names = None  # metadata from another head: indices are safer than wrong labels
    k = min(top_k, probs.shape[1])
    predictions = []
    for path, row in zip(batch.paths, probs, strict=True):
        order = np.argsort(-row, kind="stable")[:k]
        predictions.append(ImagePrediction(str(path), [
            ClassScore(int(i), names[i] if names else None, float(row[i])) for i in order]))
    return PredictResult(str(session.path), session.backend, session.device, tuple(session.input_size),
                         predictions, batch.warnings)


def predict(artifact: str | os.PathLike, images: Sequence[str | os.PathLike], *, top_k: int = 5,
            backend: Backend | None = None, device: Device | None = None, arch: str | None = None,
            num_classes: int | None = None, trust_pickle: bool = False, batch_size: int = 32) -> PredictResult:
    """Top-k classes for image files (or folders of them) with any checkpoint, ONNX file or engine."""
    with open_session(artifact, backend, device, arch=arch, num_classes=num_classes,
                      trust_pickle=trust_pickle) as session:
        return predict_images(session, images, top_k=top_k, batch_size=batch_size)
