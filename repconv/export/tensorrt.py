"""TensorRT engines from ONNX files, with the TensorRT 10 / 11 Python API.

Precision lives in the ONNX graph (fp16 casts, int8 Q/DQ nodes): the network is always built strongly
typed, which TensorRT 11 requires (its FP16/INT8 builder flags are gone) and TensorRT 10 offers through
``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; no precision builder flag is ever set. Whenever an input
dim is symbolic an optimization profile (min/opt/max batch) is added. The engine is written with a JSON
sidecar (ONNX metadata, profile, builder settings, TensorRT/CUDA/GPU versions) and verified against
ONNX Runtime before either file appears under its final name.

Everything up to the builder call (reading the ONNX, the profile, the trtexec line, the sidecar) runs
without TensorRT; the build itself needs TensorRT and an NVIDIA GPU.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from repconv.checkpoint import atomic_path
from repconv.convert.graph import example_input
from repconv.errors import InputFileError, OptionError, VerificationError
from repconv.runtime.metadata import ONNX_PREFIX, ArtifactInfo
from repconv.runtime.tensorrt import (
    EngineSidecar,
    TensorRTSession,
    require_tensorrt,
    sidecar_path,
    tensorrt_environment,
)

# Max abs error relative to the largest |logit| of ONNX Runtime. fp32 engines use TF32 kernels by default
# on Ampere and newer GPUs, hence more than the 1e-4 of ONNX export parity.
TOLERANCE = {"fp32": 5e-3, "fp16": 5e-2, "int8": 1e-1}
_ONNX_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8"}


@dataclass
class EngineOptions:
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int = 1024
    timing_cache: Path | None = None
    optimization_level: int = 3  # TensorRT's default; 0 (fast build) .. 5 (slowest build, best kernels)
    verify: bool = True

    def validate(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise OptionError(f"batch profile min {self.min_batch} / opt {self.opt_batch} / max {self.max_batch} "
                              "is not ordered", "use 1 <= --min-batch <= --opt-batch <= --max-batch")
        if not 0 <= self.optimization_level <= 5:
            raise OptionError(f"builder optimization level {self.optimization_level} is out of range",
                              "use 0..5 (TensorRT's default is 3)")
        if self.workspace_mib <= 0:
            raise OptionError(f"workspace of {self.workspace_mib} MiB is not positive", "use e.g. --workspace 1024")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # str = symbolic dim
    dtype: str

    @property
    def dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.shape)


@dataclass
class OnnxGraphInfo:
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, str]
    dtype: str
    params: int
    macs: int

    @property
    def info(self) -> ArtifactInfo:
        return ArtifactInfo.from_onnx_props(self.metadata, self.inputs[0].shape if self.inputs else None)


def read_onnx(path: str | os.PathLike) -> OnnxGraphInfo:
    """Inputs, outputs, metadata and precision of an ONNX file (no TensorRT needed)."""
    import onnx

    from repconv.runtime.session import onnx_macs, onnx_params

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"'{path}' does not exist", "export the model first: repconv export MODEL --format onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends
        raise InputFileError(f"'{path}' is not a readable ONNX file ({type(exc).__name__})",
                             "give the .onnx file repconv export wrote") from exc
    if not proto.graph.input:
        raise InputFileError(f"'{path}' has no graph inputs", "give the .onnx file repconv export wrote")
    initializers = {t.name for t in proto.graph.initializer}

    def spec(vi) -> TensorSpec:
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        return TensorSpec(vi.name, dims, _ONNX_TYPES.get(t.elem_type, str(t.elem_type)))

    metadata = {p.key: p.value for p in proto.metadata_props}
    inputs = [spec(v) for v in proto.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in proto.graph.output]
    return OnnxGraphInfo(path, inputs, outputs, metadata, _graph_dtype(proto, metadata), onnx_params(proto),
                         onnx_macs(proto))


def _graph_dtype(proto, metadata: dict[str, str]) -> str:
    if any(k.removeprefix(ONNX_PREFIX) == "dtype" and v for k, v in metadata.items()):
        return ArtifactInfo.from_onnx_props(metadata).dtype  # what export says it wrote
    ops = {n.op_type for n in proto.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}:
        return "int8"
    if any(t.data_type == 10 for t in proto.graph.initializer):
        return "fp16"
    return "fp32"


def profile_shapes(graph: OnnxGraphInfo, options: EngineOptions) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shape per input: the batch dim from the options, the others from the graph or metadata."""
    options.validate()
    size = graph.info.input_size
    shapes = {}
    for spec in graph.inputs:
        if len(spec.shape) != 4:
            raise InputFileError(f"input '{spec.name}' of '{graph.path}' has shape {spec.shape}, not (N, C, H, W)",
                                 "repconv builds engines for image classifiers exported by repconv")
        dims = []
        for axis, d in enumerate(spec.shape[1:], start=1):
            if isinstance(d, int):
                dims.append(d)
            elif graph.info.known:
                dims.append(int(size[axis - 1]))
            else:
                raise InputFileError(f"input '{spec.name}' of '{graph.path}' has a symbolic dim {axis} ({d}) "
                                     "and no input_size metadata", "re-export with a fixed image size")
        batch = spec.shape[0]
        if isinstance(batch, int):
            lo = opt = hi = batch
        else:
            lo, opt, hi = options.min_batch, options.opt_batch, options.max_batch
        shapes[spec.name] = {"min": [lo, *dims], "opt": [opt, *dims], "max": [hi, *dims]}
    return shapes


def needs_profile(graph: OnnxGraphInfo) -> bool:
    return any(spec.dynamic for spec in graph.inputs)


def trtexec_command(onnx: str | os.PathLike, engine: str | os.PathLike, shapes: dict[str, dict[str, list[int]]],
                    options: EngineOptions, dynamic: bool = True) -> list[str]:
    """The trtexec invocation that builds the same engine on a machine with TensorRT."""

    def fmt(which: str) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in s[which])}" for name, s in shapes.items())

    cmd = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}", "--stronglyTyped"]
    if dynamic:
        cmd += [f"--minShapes={fmt('min')}", f"--optShapes={fmt('opt')}", f"--maxShapes={fmt('max')}"]
    cmd += [f"--memPoolSize=workspace:{options.workspace_mib}M",
            f"--builderOptimizationLevel={options.optimization_level}"]
    if options.timing_cache:
        cmd.append(f"--timingCacheFile={options.timing_cache}")
    return cmd


def format_command(cmd: list[str]) -> str:
    return shlex.join(cmd)


# ---------------------------------------------------------------- build


@dataclass
class EngineBuild:
    engine: Path
    sidecar: Path
    onnx: Path
    dtype: str
    shapes: dict[str, dict[str, list[int]]]
    versions: dict[str, str | None]
    size_bytes: int
    verification: dict[str, Any] = field(default_factory=dict)
    trtexec: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def build_engine(onnx: str | os.PathLike, output: str | os.PathLike, options: EngineOptions | None = None
                 ) -> EngineBuild:
    """Build, verify and write ``output`` (+ ``output.json``) from an ONNX file."""
    options = options or EngineOptions()
    options.validate()
    env = tensorrt_environment()
    require_tensorrt("building a TensorRT engine", env)
    onnx, output = Path(onnx), Path(output)
    graph = read_onnx(onnx)
    shapes = profile_shapes(graph, options)
    serialized = _build_serialized(graph, shapes, options)
    sidecar = EngineSidecar(
        onnx=onnx.name, onnx_sha256=hashlib.sha256(onnx.read_bytes()).hexdigest(), onnx_metadata=graph.metadata,
        inputs=shapes, outputs=[o.name for o in graph.outputs], dtype=graph.dtype,
        builder={"strongly_typed": True, "profile": needs_profile(graph), "workspace_mib": options.workspace_mib,
                 "optimization_level": options.optimization_level,
                 "timing_cache": str(options.timing_cache) if options.timing_cache else None},
        versions=env.to_dict(), params=graph.params, macs=graph.macs)
    with atomic_path(output) as tmp_engine, atomic_path(sidecar_path(output)) as tmp_sidecar:
        tmp_engine.write_bytes(serialized)
        if options.verify:
            sidecar.verification = verify_engine(tmp_engine, sidecar, onnx)
        tmp_sidecar.write_text(sidecar.to_json())
    return EngineBuild(output, sidecar_path(output), onnx, graph.dtype, shapes, env.to_dict(), len(serialized),
                       sidecar.verification, trtexec_command(onnx, output, shapes, options, needs_profile(graph)))


def _network_flags(trt) -> int:
    """STRONGLY_TYPED: required for precision-from-the-graph on TensorRT 10, always on (flag ignored or gone) on 11."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0


def _build_serialized(graph: OnnxGraphInfo, shapes: dict, options: EngineOptions) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph.path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise InputFileError(f"TensorRT's ONNX parser rejects '{graph.path}': {errors[:300]}",
                             "check the opset and operators against this TensorRT version")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.optimization_level
    cache_file = options.timing_cache
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    if cache is None:
        raise InputFileError(f"timing cache '{cache_file}' is not readable by this TensorRT",
                             "delete it; a new one is written after the build")
    config.set_timing_cache(cache, False)
    if needs_profile(graph):
        profile = builder.create_optimization_profile()
        for name, s in shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VerificationError(f"TensorRT could not build an engine from '{graph.path}' (see its log above)",
                                "try a larger --workspace or check the log for unsupported layers")
    if cache_file:
        with atomic_path(cache_file) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def verification_batches(shapes: dict[str, dict[str, list[int]]]) -> list[int]:
    """Two batch sizes inside the profile: the smallest and the optimum (one when they coincide)."""
    s = next(iter(shapes.values()))
    return sorted({s["min"][0], s["opt"][0]})


def compare_logits(reference: np.ndarray, candidate: np.ndarray, dtype: str) -> dict[str, float]:
    """Max abs error, the same relative to max |reference|, top-1 agreement, and the tolerance used."""
    err = float(np.abs(reference - candidate).max())
    scale = float(np.abs(reference).max()) or 1.0
    agree = float((reference.argmax(1) == candidate.argmax(1)).mean())
    return {"max_abs": err, "max_rel": err / scale, "top1_agreement": agree,
            "tolerance_rel": TOLERANCE.get(dtype, TOLERANCE["int8"])}


def verify_engine(engine: Path, sidecar: EngineSidecar, onnx: Path) -> dict[str, Any]:
    """Run the engine and ONNX Runtime (CPU) on the same check batches; raise above the dtype's tolerance."""
    from repconv.runtime.session import OrtSession

    reference = OrtSession(onnx, "cpu")
    trt_session = TensorRTSession(engine, "cuda", sidecar=sidecar)
    results = {}
    for batch in verification_batches(sidecar.inputs):
        x = example_input(reference.input_size, batch=batch, seed=batch).numpy()
        figures = compare_logits(reference.run(x), trt_session.run(x), sidecar.dtype)
        results[f"batch_{batch}"] = figures
        if figures["max_rel"] > figures["tolerance_rel"]:
            raise VerificationError(f"the engine differs from ONNX Runtime by {figures['max_abs']:.3g} "
                                    f"({figures['max_rel']:.2%} of the largest logit) at batch {batch}, above the "
                                    f"{sidecar.dtype} tolerance of {figures['tolerance_rel']:.1%}",
                                    "no engine was written; check the ONNX with ONNX Runtime or build without "
                                    "reduced precision")
    return results
