"""TensorRT engine files: the environment, the engine's JSON sidecar, the version check, and running one.

A serialized engine only runs with the TensorRT version that built it, on a GPU of the same compute
capability. The sidecar (``model.engine.json`` beside ``model.engine``) records both, with the ONNX
metadata the engine was built from, so a mismatch is refused with a clear message instead of a crash
inside ``deserialize_cuda_engine``. :class:`EngineRunner` runs an engine with the TensorRT 10/11
name-based tensor API; export verifies engines with it and ``repconv.runtime`` wraps it in a Session.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repconv.artifact import ArtifactInfo
from repconv.errors import DependencyError, InputFileError

SIDECAR_FORMAT = "repconv-tensorrt-engine"
SIDECAR_VERSION = 1
INSTALL_HINT = ("pip install 'repconv[tensorrt]' on a machine with an NVIDIA GPU and CUDA, or build there with "
                "the command `repconv export ... --format engine --print-trtexec` prints")


# ---------------------------------------------------------------- environment


@dataclass(frozen=True)
class TensorRTEnvironment:
    """What this machine offers for TensorRT: versions and the GPU (None where absent)."""

    tensorrt: str | None = None
    cuda: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None

    @property
    def tensorrt_major(self) -> int | None:
        return int(self.tensorrt.split(".")[0]) if self.tensorrt else None

    def missing(self) -> list[str]:
        gaps = []
        if not self.tensorrt:
            gaps.append("TensorRT is not installed")
        if not self.gpu:
            gaps.append("no NVIDIA GPU is visible (CUDA)")
        return gaps

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def tensorrt_environment() -> TensorRTEnvironment:
    version = None
    if importlib.util.find_spec("tensorrt") is not None:
        try:
            import tensorrt as trt

            version = trt.__version__
        except (ImportError, OSError):  # the wheel is there but its CUDA libraries are not
            version = None
    gpu = capability = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        capability = "{}.{}".format(*torch.cuda.get_device_capability(0))
    return TensorRTEnvironment(version, torch.version.cuda, gpu, capability)


def require_tensorrt(what: str = "building a TensorRT engine", env: TensorRTEnvironment | None = None) -> None:
    env = env or tensorrt_environment()
    gaps = env.missing()
    if gaps:
        raise DependencyError(f"{what} needs TensorRT and an NVIDIA GPU, but {' and '.join(gaps)}", INSTALL_HINT)


# ---------------------------------------------------------------- sidecar


def sidecar_path(engine: str | os.PathLike) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


@dataclass
class EngineSidecar:
    """Everything known about an engine, stored as JSON beside it."""

    onnx: str
    onnx_sha256: str
    onnx_metadata: dict[str, str]
    inputs: dict[str, dict[str, list[int]]]  # name -> {"min", "opt", "max"} shapes
    outputs: list[str]
    dtype: str
    builder: dict[str, Any]
    versions: dict[str, str | None]
    params: int | None = None
    macs: int | None = None
    verification: dict[str, Any] = field(default_factory=dict)
    format: str = SIDECAR_FORMAT
    format_version: int = SIDECAR_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: Path) -> EngineSidecar:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"'{source}' is not valid JSON ({exc.msg})", "rebuild the engine") from exc
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise InputFileError(f"'{source}' is not a repconv engine sidecar", "rebuild the engine with repconv")
        if data.get("format_version", 1) > SIDECAR_VERSION:
            raise InputFileError(f"'{source}' has sidecar format {data['format_version']}, newer than this "
                                 "repconv reads", "upgrade repconv")
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise InputFileError(f"'{source}' lacks engine sidecar fields ({exc})", "rebuild the engine") from exc

    @classmethod
    def read(cls, engine: str | os.PathLike) -> EngineSidecar:
        path = sidecar_path(engine)
        if not path.is_file():
            raise InputFileError(f"engine '{engine}' has no sidecar '{path.name}' beside it, so its TensorRT/GPU "
                                 "versions and input contract are unknown",
                                 "rebuild it with `repconv export MODEL.onnx --format engine -o ENGINE`")
        return cls.from_json(path.read_text(), path)

    def info(self) -> ArtifactInfo:
        name = next(iter(self.inputs), None)
        shape = tuple(self.inputs[name]["opt"]) if name else None
        return ArtifactInfo.from_onnx_props(self.onnx_metadata, shape, kind="engine")


def check_compatible(engine: str | os.PathLike, built: dict[str, str | None], here: TensorRTEnvironment) -> None:
    """Refuse an engine built with another TensorRT version or for another GPU generation."""
    problems = []
    if built.get("tensorrt") != here.tensorrt:
        problems.append(f"TensorRT {built.get('tensorrt')} (here: {here.tensorrt})")
    if built.get("compute_capability") != here.compute_capability:
        problems.append(f"compute capability {built.get('compute_capability')} / {built.get('gpu')} "
                        f"(here: {here.compute_capability} / {here.gpu})")
    cuda_major = [(v or "").split(".")[0] for v in (built.get("cuda"), here.cuda)]
    if cuda_major[0] != cuda_major[1]:
        problems.append(f"CUDA {built.get('cuda')} (here: {here.cuda})")
    if problems:
        raise InputFileError(f"engine '{engine}' was built for {', '.join(problems)}; TensorRT engines only run "
                             "with the TensorRT version and GPU generation that built them",
                             f"rebuild it on this machine: repconv export {built.get('onnx_name', 'MODEL.onnx')} "
                             f"--format engine -o {Path(engine).name}")


# ---------------------------------------------------------------- running an engine

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                 "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}


class EngineRunner:
    """A deserialized engine, checked against this machine, that maps a float batch to its logits."""

    def __init__(self, path: str | os.PathLike, sidecar: EngineSidecar | None = None):
        sidecar = sidecar or EngineSidecar.read(path)
        env = tensorrt_environment()
        require_tensorrt("running a TensorRT engine", env)
        check_compatible(path, {**sidecar.versions, "onnx_name": sidecar.onnx}, env)
        import tensorrt as trt

        self.path, self.sidecar = Path(path), sidecar
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise InputFileError(f"TensorRT cannot deserialize '{path}'", "the file is corrupt: rebuild the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.stream = torch.cuda.Stream()

    def _dtype(self, name: str) -> torch.dtype:
        return _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name]

    def batch_limits(self) -> tuple[int, int]:
        shapes = self.sidecar.inputs[self.input_names[0]]
        return shapes["min"][0], shapes["max"][0]

    def run(self, batch: np.ndarray) -> np.ndarray:
        name, out_name = self.input_names[0], self.output_names[0]
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        lo, hi = self.batch_limits()
        if not lo <= len(x) <= hi:
            raise InputFileError(f"engine '{self.path}' takes batches of {lo} to {hi}, not {len(x)}",
                                 "rebuild it with a batch profile covering this batch")
        with torch.cuda.stream(self.stream):
            x = x.to("cuda", self._dtype(name), non_blocking=True).contiguous()
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
            y = torch.empty(tuple(self.context.get_tensor_shape(out_name)), dtype=self._dtype(out_name),
                            device="cuda")
            self.context.set_tensor_address(out_name, y.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise InputFileError(f"TensorRT failed to run '{self.path}'", "rebuild the engine on this machine")
        self.stream.synchronize()
        return y.float().cpu().numpy()
