"""One inference interface over PyTorch checkpoints, ONNX Runtime and TensorRT engines.

``open_session(path)`` picks the backend from the file (``.onnx`` -> ONNX Runtime, ``.engine`` /
``.plan`` -> TensorRT, anything else -> a checkpoint ``repconv.checkpoint.load`` reads) and returns a
:class:`Session` whose ``run(batch)`` takes a normalized float batch (N, 3, H, W) and returns the logits
as a float32 numpy array.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path

import numpy as np
import torch

from repconv.checkpoint import load as load_checkpoint
from repconv.convert.graph import count_flops, count_params, example_input
from repconv.errors import DependencyError, InputFileError, RepconvError
from repconv.runtime.metadata import ArtifactInfo

BACKENDS = ("torch", "ort", "trt")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
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
        x = _as_numpy(x)
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


def _as_numpy(batch: Batch) -> np.ndarray:
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch, dtype=np.float32)


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
        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(_as_numpy(batch))
        x = x.to(self.device, torch.float32).contiguous(memory_format=self.memory_format)
        return self.model(x).float().cpu().numpy()

    def count_params(self) -> int:
        return count_params(self.model)

    def count_macs(self) -> int:
        x = example_input(self.input_size, batch=1).to(self.device)
        return count_flops(self.model, x) // 2


# ---------------------------------------------------------------- ONNX Runtime


def ort_providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise DependencyError("ONNX Runtime has no CUDA provider here",
                                  "pip install 'repconv[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU, "
                                  "or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtSession(Session):
    backend = "ort"

    def __init__(self, path: Path, device: str, *, threads: int | None = None):
        import onnx
        import onnxruntime as ort

        try:
            self.proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a file that is not ONNX
            raise InputFileError(f"'{path}' is not a readable ONNX file ({type(exc).__name__})",
                                 "re-export it with repconv export --format onnx") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=ort_providers(device))
        except RepconvError:
            raise
        except Exception as exc:
            raise InputFileError(f"ONNX Runtime cannot load '{path}': {str(exc).splitlines()[0][:160]}",
                                 "re-export it with an opset this onnxruntime supports") from exc
        first = self.session.get_inputs()[0]
        self.input_name, self.input_shape = first.name, tuple(first.shape)
        self.input_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        props = {p.key: p.value for p in self.proto.metadata_props}
        super().__init__(path, ArtifactInfo.from_onnx_props(props, self.input_shape), device)

    def batch_limits(self) -> tuple[int, int | None]:
        fixed = self.input_shape[0] if self.input_shape else None
        return (fixed, fixed) if isinstance(fixed, int) and fixed > 0 else (1, None)

    def run(self, batch: Batch) -> np.ndarray:
        x = _as_numpy(batch)
        if not self.accepts_batch(len(x)):
            raise InputFileError(f"'{self.path}' has a fixed batch of {self.input_shape[0]}, not {len(x)}",
                                 "re-export it with a dynamic batch (without --static)")
        out = self.session.run(None, {self.input_name: x.astype(self.input_dtype, copy=False)})[0]
        return np.asarray(out, dtype=np.float32)

    def count_params(self) -> int:
        return onnx_params(self.proto)

    def count_macs(self) -> int:
        return onnx_macs(self.proto)

    def files(self) -> list[Path]:
        """The graph, and the external weight files its initializers name (``model.onnx.data`` and such)."""
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data

        weights = {ExternalDataInfo(t).location for t in self.proto.graph.initializer if uses_external_data(t)}
        return [self.path, *(self.path.parent / name for name in sorted(weights))]


_WEIGHT_TYPES = {1, 2, 3, 6, 10, 11, 16}  # float, uint8, int8, int32, float16, double, bfloat16


def onnx_params(proto) -> int:
    """Weight elements stored in the graph: numeric initializers of more than one element (int8 weights
    count once, like fp32 ones; int64 shape constants and scalars do not count)."""
    return sum(n for t in proto.graph.initializer if t.data_type in _WEIGHT_TYPES
               and (n := int(np.prod(t.dims, dtype=np.int64))) > 1)


def onnx_macs(proto) -> int:
    """Multiply-accumulates of Conv, Gemm and MatMul for one sample (symbolic dims count as 1)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    shapes: dict[str, list[int]] = {t.name: list(t.dims) for t in g.initializer}
    for vi in (*g.input, *g.value_info, *g.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    total = 0
    for node in g.node:
        out = shapes.get(node.output[0])
        if node.op_type == "Conv" and out and node.input[1] in shapes:
            w = shapes[node.input[1]]
            total += int(np.prod(out[1:])) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and out and node.input[0] in shapes:
            k = shapes[node.input[0]][-1]
            if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
                k = shapes[node.input[0]][0]
            total += int(np.prod(out[1:] if len(out) > 2 else out[-1:])) * k
    return total


# ---------------------------------------------------------------- dispatch


def artifact_backend(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "ort"
    if suffix in ENGINE_SUFFIXES:
        return "trt"
    return "torch"


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
    natural = artifact_backend(path)
    if backend is not None and backend not in BACKENDS:
        raise InputFileError(f"unknown backend '{backend}'", f"choose one of {', '.join(BACKENDS)}")
    if backend is not None and backend != natural:
        kinds = {"torch": "a PyTorch checkpoint", "ort": "an ONNX file", "trt": "a TensorRT engine"}
        raise InputFileError(f"'{path}' is {kinds[natural]}, which the {backend} backend cannot run",
                             f"use --backend {natural}, or give {kinds[backend]}")
    if device not in (None, "cpu", "cuda"):
        raise InputFileError(f"unknown device '{device}'", "use cpu or cuda")
    device = device or default_device(natural)
    if natural == "torch" and device == "cuda" and not torch.cuda.is_available():
        raise DependencyError("--device cuda was asked for but PyTorch sees no CUDA GPU", "use --device cpu")
    if natural == "torch":
        return TorchSession(path, device, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle,
                            channels_last=channels_last)
    if channels_last:
        raise InputFileError(f"'{path}' is not a PyTorch checkpoint: channels_last only applies to torch",
                             "drop --channels-last for ONNX files and engines (their layout is fixed at export/build)")
    if natural == "ort":
        return OrtSession(path, device, threads=threads)
    from repconv.runtime.tensorrt import TensorRTSession

    return TensorRTSession(path, device)
