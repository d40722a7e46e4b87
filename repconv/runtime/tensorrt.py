"""TensorRT engines as a :class:`~repconv.runtime.base.Session` (the engine file itself: export/engine.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from repconv.errors import DependencyError
from repconv.export.engine import EngineRunner, EngineSidecar, sidecar_path
from repconv.runtime.base import Batch, Session, as_numpy


class TensorRTSession(Session):
    """Runs a serialized engine (checked against this machine's TensorRT and GPU) on CUDA."""

    backend = "trt"

    def __init__(self, path: Path, device: str = "cuda", *, sidecar: EngineSidecar | None = None):
        if device != "cuda":
            raise DependencyError("TensorRT engines run on an NVIDIA GPU only", "use the cuda device for engines")
        self.runner = EngineRunner(path, sidecar)
        super().__init__(Path(path), self.runner.sidecar.info(), "cuda")

    def files(self) -> list[Path]:
        return [self.path, sidecar_path(self.path)]

    def batch_limits(self) -> tuple[int, int | None]:
        return self.runner.batch_limits()

    def run(self, batch: Batch) -> np.ndarray:
        return self.runner.run(as_numpy(batch))

    def count_params(self) -> int | None:
        return self.runner.sidecar.params

    def count_macs(self) -> int | None:
        return self.runner.sidecar.macs
