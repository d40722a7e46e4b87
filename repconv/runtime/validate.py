"""Accuracy of one or more artifacts on labeled data, side by side, in one run.

``validate([ckpt, onnx, engine], data="digits")`` scores every artifact that
:func:`repconv.runtime.session.open_session` opens (checkpoint, converted, folded, ONNX, TensorRT engine) on
the same samples: top-1, top-5, accuracy per class, and how often each pair of artifacts agrees on the top-1
class. Each artifact sees the data preprocessed with its own input contract (size, mean, std, from its
metadata); artifacts that share one share the dataset.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from repconv.errors import DataError, OptionError
from repconv.runtime.base import Session
from repconv.runtime.session import open_session

Progress = Callable[[str], None]


@dataclass
class ArtifactScore:
    """One artifact's scores on the data."""

    artifact: str
    backend: str
    device: str
    kind: str
    input_size: tuple[int, int, int]
    top1: float
    top5: float  # top-k with k = min(5, classes)
    per_class: dict[str, float]  # class name -> top-1 accuracy on that class's samples
    seconds: float  # time spent running the artifact (preprocessing excluded)
    class_names_match: bool = True  # False when the artifact names its classes differently from the data


@dataclass
class ValidateResult:
    data: str
    split: str  # "val" for digits and ROOT/val, "all" when a folder has no val subfolder
    classes: list[str]
    class_counts: dict[str, int]
    samples: int
    scores: list[ArtifactScore]
    agreement: list[list[float]]  # [i][j]: fraction of samples where artifacts i and j predict the same class
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> list[str]:
        """Plain-text lines: one per artifact, then the agreement matrix (for the CLI, or logs)."""
        width = max(len(s.artifact) for s in self.scores)
        lines = [f"{self.samples} samples, {len(self.classes)} classes ({self.data}, {self.split})",
                 f"{'#':>2}  {'artifact':<{width}}  {'backend':<7}  {'top-1':>7}  {'top-5':>7}  {'seconds':>7}"]
        for i, s in enumerate(self.scores):
            lines.append(f"{i:>2}  {s.artifact:<{width}}  {s.backend:<7}  {s.top1:>7.2%}  {s.top5:>7.2%}  "
                         f"{s.seconds:>7.2f}")
        if len(self.scores) > 1:
            lines.append("top-1 agreement: " + "   ".join(
                f"#{i}-#{j} {self.agreement[i][j]:.2%}" for i in range(len(self.scores))
                for j in range(i + 1, len(self.scores))))
        return lines + [f"warning: {w}" for w in self.warnings]


def _split_for(data: str | os.PathLike) -> str:
    """``val`` for digits and for a folder with ROOT/val; the folder itself (split "all") otherwise."""
    if str(data) == "digits":
        return "val"
    root = Path(data)
    if not root.is_dir():
        raise OptionError("data", str(data), "is neither 'digits' nor an existing folder",
                          "give digits or a labeled folder ROOT/CLASS/*.jpg")
    if (root / "val").is_dir():
        return "val"
    if (root / "train").is_dir():
        raise DataError(f"'{root}' has a train subfolder but no val subfolder",
                        "validate on held-out images: give ROOT/val, or the folder of validation images itself")
    return "all"


def _subset(n: int, limit: int | None) -> np.ndarray:
    """Indices of the samples to use: all, or ``limit`` spread evenly over the dataset (every class is hit
    even when folders list their samples class by class)."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise OptionError("limit", limit, "is not positive", "use 1 or more, or leave it out")
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def _dataset(data, split: str, session: Session):
    from repconv.data import make_dataset

    return make_dataset(data, "val" if split == "val" else "train", session.input_size, session.mean, session.std,
                        labeled=True)


def _batches(dataset, indices: np.ndarray, batch_size: int):
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=False, num_workers=0)
    for x, y in loader:
        yield x.numpy(), np.asarray(y)


def validate(artifacts: Sequence[str | os.PathLike], *, data: str | os.PathLike = "digits", batch_size: int = 64,
             backend: str | None = None, device: str | None = None, arch: str | None = None,
             num_classes: int | None = None, trust_pickle: bool = False, threads: int | None = None,
             limit: int | None = None, progress: Progress | None = None) -> ValidateResult:
    """Score every artifact on ``data`` ("digits" or a labeled folder ROOT/CLASS/*.jpg; ROOT/val when present).

    ``backend``, ``device``, ``threads`` go to every :func:`open_session`; ``arch``, ``num_classes`` and
    ``trust_pickle`` matter only for checkpoints that need them (bare state_dicts, pickled modules).
    ``limit`` keeps that many samples, spread evenly over the data. A class count that differs between the
    data and an artifact is a :class:`DataError`; differing class names are a warning (indices are compared).
    """
    if not artifacts:
        raise OptionError("artifacts", None, "are missing: validate needs at least one", "give one or more model files")
    if batch_size < 1:
        raise OptionError("batch_size", batch_size, "is not positive", "use 1 or more")
    say = progress or (lambda _msg: None)
    split = _split_for(data)
    datasets: dict[tuple, object] = {}  # (input_size, mean, std) -> dataset
    classes: list[str] | None = None
    labels: np.ndarray | None = None
    indices: np.ndarray | None = None
    scores: list[ArtifactScore] = []
    predictions: list[np.ndarray] = []
    warnings: list[str] = []
    for artifact in artifacts:
        session = open_session(artifact, backend, device, arch=arch, num_classes=num_classes,
                               trust_pickle=trust_pickle, threads=threads)
        try:
            key = (tuple(session.input_size), tuple(session.mean), tuple(session.std))
            if key not in datasets:
                say(f"data: {data} ({split}) at {key[0][1]}x{key[0][2]}, mean {key[1]}, std {key[2]}")
                datasets[key] = _dataset(data, split, session)
            dataset = datasets[key]
            if classes is None:
                classes = list(dataset.classes)
                indices = _subset(len(dataset), limit)
            assert indices is not None
            top5, seconds, seen = [], 0.0, []
            for x, y in _batches(dataset, indices, batch_size):
                start = time.perf_counter()
                logits = session.run_batched(x, batch_size)
                seconds += time.perf_counter() - start
                if logits.ndim != 2 or logits.shape[1] != len(classes):
                    raise DataError(f"'{artifact}' predicts {logits.shape[-1]} classes, the data '{data}' has "
                                    f"{len(classes)} ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})",
                                    "validate on data with the classes the model was trained on")
                k = min(5, logits.shape[1])
                top5.append(np.argsort(-logits, axis=1, kind="stable")[:, :k])
                seen.append(y)
                say(f"{artifact}: {sum(len(s) for s in seen)}/{len(indices)}")
            top = np.concatenate(top5)
            y_all = np.concatenate(seen)
            if labels is None:
                labels = y_all
            names_match = session.class_names is None or list(session.class_names) == classes
            if not names_match:
                i = next(i for i, (a, b) in enumerate(zip(session.class_names, classes, strict=True)) if a != b)
                warnings.append(f"'{artifact}' names its classes differently from the data (#{i}: "
                                f"'{session.class_names[i]}' vs '{classes[i]}'); classes are compared by index")
            scores.append(_score(session, str(artifact), top, labels, classes, seconds, names_match))
            predictions.append(top[:, 0])
        finally:
            session.close()
            del session
    assert classes is not None and labels is not None
    n = len(predictions)
    agreement = [[float(np.mean(predictions[i] == predictions[j])) for j in range(n)] for i in range(n)]
    counts = {c: int(np.sum(labels == i)) for i, c in enumerate(classes)}
    return ValidateResult(str(data), split, classes, counts, len(labels), scores, agreement, warnings)


def _score(session: Session, artifact: str, top: np.ndarray, labels: np.ndarray, classes: list[str], seconds: float,
           names_match: bool) -> ArtifactScore:
    hit1 = top[:, 0] == labels
    hit5 = (top == labels[:, None]).any(axis=1)
    per_class = {c: float(np.mean(hit1[labels == i])) for i, c in enumerate(classes) if np.any(labels == i)}
    return ArtifactScore(artifact, session.backend, session.device, session.info.kind,
                         tuple(int(s) for s in session.input_size), float(np.mean(hit1)), float(np.mean(hit5)),
                         per_class, round(seconds, 4), names_match)

