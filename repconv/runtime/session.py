"""Open any artifact as a :class:`~repconv.runtime.base.Session`: PyTorch checkpoints, ONNX Runtime and
TensorRT engines.

``open_session(path)`` picks the backend from the file (``.onnx`` -> ONNX Runtime, ``.engine`` /
``.plan`` -> TensorRT, anything else -> a checkpoint ``repconv.checkpoint.load_checkpoint`` reads).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from repconv.artifact import ArtifactInfo
from repconv.checkpoint import load_checkpoint
from repconv.convert.graph import count_flops, count_params, example_input
from repconv.errors import DependencyError, InputFileError, OptionError
from repconv.io import artifact_backend
from repconv.onnx_graph import load_onnx, onnx_macs, onnx_params, ort_session, weight_files
from repconv.options import Backend, Device, check_choice
from repconv.runtime.base import Batch, Session, as_numpy
from repconv.runtime.tensorrt import TensorRTSession

# ---------------------------------------------------------------- PyTorch


class TorchSession(Session):
    backend = "torch"

    def __init__(self, path: Path, device: str, *, arch: str | None = None, num_classes: int | None = None,
                 trust_pickle: bool = False, channels_last: bool = False):
        """``channels_last`` runs the model and its input in that memory format (NHWC in memory): on CPU,
        torch's max-pool is several times faster in it than in NCHW, which matters for parameter-free models."""
        loaded = load_checkpoint(path, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
        super().__init__(path, ArtifactInfo.from_checkpoint(loaded.meta), device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = loaded.model.eval().to(device, memory_format=self.memory_format)

    @torch.inference_mode()
    def run(self, batch: Batch) -> np.ndarray:
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(as_numpy(batch))
        x = x.to(self.device, torch.float32).contiguous(memory_format=self.memory_format)
        return self.model(x).float().cpu().numpy()

    def count_params(self) -> int:
        return count_params(self.model)

    def count_macs(self) -> int:
        x = example_input(self.input_size, batch=1).to(self.device)
        return count_flops(self.model, x) // 2


# ---------------------------------------------------------------- ONNX Runtime


class OrtSession(Session):
    backend = "ort"

    def __init__(self, path: Path, device: str, *, threads: int | None = None):
        self.proto = load_onnx(path)
        # a session that is measured or used spins its workers, as ONNX Runtime does by default
        self.session = ort_session(path, threads=threads, device=device, spinning="on")
        first = self.session.get_inputs()[0]
        self.input_name, self.input_shape = first.name, tuple(first.shape)
        self.input_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        props = {p.key: p.value for p in self.proto.metadata_props}
        super().__init__(path, ArtifactInfo.from_onnx_props(props, self.input_shape), device)

    def batch_limits(self) -> tuple[int, int | None]:
        fixed = self.input_shape[0] if self.input_shape else None
        return (fixed, fixed) if isinstance(fixed, int) and fixed > 0 else (1, None)

    def run(self, batch: Batch) -> np.ndarray:
        x = as_numpy(batch)
        if not self.accepts_batch(len(x)):
            raise InputFileError(f"'{self.path}' has a fixed batch of {self.input_shape[0]}, not {len(x)}",
                                 "re-export it with a dynamic batch")
        out = self.session.run(None, {self.input_name: x.astype(self.input_dtype, copy=False)})[0]
        return np.asarray(out, dtype=np.float32)

    def count_params(self) -> int:
        return onnx_params(self.proto)

    def count_macs(self) -> int:
        return onnx_macs(self.proto)

    def files(self) -> list[Path]:
        """The graph, and the external weight files its initializers name (``model.onnx.data`` and such)."""
        return [self.path, *weight_files(self.proto, self.path)]

    def close(self) -> None:
        self.session = None  # ONNX Runtime's threads go with the session


# ---------------------------------------------------------------- dispatch


def default_device(backend: str) -> str:
    if backend == "ort":
        import onnxruntime as ort

        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    if backend == "trt":
        return "cuda"  # engines run nowhere else; TensorRTSession says so when there is no GPU
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_session(path: str | os.PathLike, backend: str | None = None, device: str | None = None, *,
                 arch: str | None = None, num_classes: int | None = None, trust_pickle: bool = False,
                 threads: int | None = None, channels_last: bool = False) -> Session:
    """Load ``path`` on the backend its file type calls for (or the one named, when it can run the file).

    ``channels_last`` applies to PyTorch checkpoints only (see :class:`TorchSession`)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"'{path}' does not exist", "check the path")
    if path.is_dir():
        raise InputFileError(f"'{path}' is a folder, not a model file", "give the file inside it")
    if backend is not None:
        check_choice("backend", backend, Backend)
    if device is not None:
        check_choice("device", device, Device)
    natural = artifact_backend(path)
    if backend is not None and backend != natural:
        kinds = {"torch": "a PyTorch checkpoint", "ort": "an ONNX file", "trt": "a TensorRT engine"}
        raise OptionError("backend", backend, f"cannot run '{path}', which is {kinds[natural]}",
                          f"use {natural}, or give {kinds[backend]}")
    device = device or default_device(natural)
    if natural == "torch" and device == "cuda" and not torch.cuda.is_available():
        raise DependencyError("the cuda device was asked for but PyTorch sees no CUDA GPU", "use the cpu device")
    if natural == "torch":
        return TorchSession(path, device, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle,
                            channels_last=channels_last)
    if channels_last:
        raise OptionError("channels_last", None, f"applies to PyTorch checkpoints only, not to '{path}'",
                          "drop it for ONNX files and engines (their layout is fixed at export/build)")
    if natural == "ort":
        return OrtSession(path, device, threads=threads)
    return TensorRTSession(path, device)
