"""The one inference interface every backend implements: a loaded artifact that maps a normalized
float batch (N, 3, H, W) to logits (N, classes) as a float32 numpy array."""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np
import torch

from repconv.artifact import ArtifactInfo

Batch = np.ndarray | torch.Tensor


class Session(abc.ABC):
    """A loaded artifact ready to run."""

    backend: str = ""

    def __init__(self, path: Path, info: ArtifactInfo, device: str):
        self.path, self.info, self.device = path, info, device

    @abc.abstractmethod
    def run(self, batch: Batch) -> np.ndarray:
        """Logits (N, classes), float32, for a normalized batch (N, 3, H, W)."""

    def batch_limits(self) -> tuple[int, int | None]:
        """Smallest and largest batch the artifact runs (None: no upper limit)."""
        return 1, None

    def accepts_batch(self, n: int) -> bool:
        lo, hi = self.batch_limits()
        return lo <= n and (hi is None or n <= hi)

    def run_batched(self, x: Batch, batch_size: int = 32) -> np.ndarray:
        """``run`` over any number of samples: chunks within the artifact's batch limits, padded if need be."""
        x = as_numpy(x)
        lo, hi = self.batch_limits()
        size = max(lo, min(batch_size, hi or batch_size))
        outs = []
        for start in range(0, len(x), size):
            chunk = x[start:start + size]
            n = len(chunk)
            if n < lo:
                chunk = np.concatenate([chunk, np.zeros((lo - n, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self.run(chunk)[:n])
        return np.concatenate(outs)

    @abc.abstractmethod
    def count_params(self) -> int | None: ...

    @abc.abstractmethod
    def count_macs(self) -> int | None:
        """Multiply-accumulates of one image at the artifact's input size."""

    def files(self) -> list[Path]:
        """The files the artifact is made of (what a copy of it must take along)."""
        return [self.path]

    def close(self) -> None:  # noqa: B027 (optional hook: most backends hold nothing to release)
        pass

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.info.input_size

    @property
    def mean(self) -> tuple[float, ...]:
        return self.info.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.info.std

    @property
    def class_names(self) -> list[str] | None:
        return self.info.class_names

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path}, device={self.device})"


def as_numpy(batch: Batch) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch, dtype=np.float32)
