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

from repconv.artifact import ArtifactInfo
from repconv.convert.graph import example_input
from repconv.errors import InputFileError, OptionError, VerificationError
from repconv.export.engine import EngineRunner, EngineSidecar, require_tensorrt, sidecar_path, tensorrt_environment
from repconv.io import atomic_path
from repconv.onnx_graph import OnnxGraphInfo, ort_session, parity, read_onnx, run_onnx

__all__ = ["EngineBuild", "EngineOptions", "build_engine", "profile_shapes", "trtexec_command"]

# Max abs error relative to the largest |logit| of ONNX Runtime. fp32 engines use TF32 kernels by default
# on Ampere and newer GPUs, hence more than the 1e-4 of ONNX export parity.
TOLERANCE = {"fp32": 5e-3, "fp16": 5e-2, "int8": 1e-1}


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
            raise OptionError("opt_batch", (self.min_batch, self.opt_batch, self.max_batch),
                              "(min, opt, max batch of the profile) is not ordered", "use 1 <= min <= opt <= max")
        if not 0 <= self.optimization_level <= 5:
            raise OptionError("optimization_level", self.optimization_level, "is out of range",
                              "use 0..5 (TensorRT's default is 3)")
        if self.workspace_mib <= 0:
            raise OptionError("workspace_mib", self.workspace_mib, "is not positive", "use e.g. 1024")


def profile_shapes(graph: OnnxGraphInfo, options: EngineOptions) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shape per input: the batch dim from the options, the others from the graph or metadata."""
    options.validate()
    info = ArtifactInfo.from_onnx_props(graph.metadata, graph.inputs[0].shape if graph.inputs else None)
    size = info.input_size
    shapes = {}
    for spec in graph.inputs:
        if len(spec.shape) != 4:
            raise InputFileError(f"input '{spec.name}' of '{graph.path}' has shape {spec.shape}, not (N, C, H, W)",
                                 "repconv builds engines for image classifiers exported by repconv")
        dims = []
        for axis, d in enumerate(spec.shape[1:], start=1):
            if isinstance(d, int):
                dims.append(d)
            elif info.known:
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
        builder={"strongly_typed": True, "profile": graph.dynamic, "workspace_mib": options.workspace_mib,
                 "optimization_level": options.optimization_level,
                 "timing_cache": str(options.timing_cache) if options.timing_cache else None},
        versions=env.to_dict(), params=graph.params, macs=graph.macs)
    with atomic_path(output) as tmp_engine, atomic_path(sidecar_path(output)) as tmp_sidecar:
        tmp_engine.write_bytes(serialized)
        if options.verify:
            sidecar.verification = verify_engine(tmp_engine, sidecar, onnx)
        tmp_sidecar.write_text(sidecar.to_json())
    return EngineBuild(output, sidecar_path(output), onnx, graph.dtype, shapes, env.to_dict(), len(serialized),
                       sidecar.verification, trtexec_command(onnx, output, shapes, options, graph.dynamic))


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
    if graph.dynamic:
        profile = builder.create_optimization_profile()
        for name, s in shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VerificationError(f"TensorRT could not build an engine from '{graph.path}' (see its log above)",
                                "try a larger workspace or check the log for unsupported layers")
    if cache_file:
        with atomic_path(cache_file) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def verification_batches(shapes: dict[str, dict[str, list[int]]]) -> list[int]:
    """Two batch sizes inside the profile: the smallest and the optimum (one when they coincide)."""
    s = next(iter(shapes.values()))
    return sorted({s["min"][0], s["opt"][0]})


def verify_engine(engine: Path, sidecar: EngineSidecar, onnx: Path) -> dict[str, Any]:
    """Run the engine and ONNX Runtime (CPU) on the same check batches; raise above the dtype's tolerance."""
    reference = ort_session(onnx)
    runner = EngineRunner(engine, sidecar)
    info = sidecar.info()
    tolerance = TOLERANCE.get(sidecar.dtype, TOLERANCE["int8"])
    results = {}
    for batch in verification_batches(sidecar.inputs):
        x = example_input(info.input_size, batch=batch, seed=batch).numpy()
        p = parity(run_onnx(reference, x), runner.run(x))
        results[f"batch_{batch}"] = {"max_abs": p.max_abs, "max_rel": p.max_rel, "top1_agreement": p.top1_agreement,
                                     "tolerance_rel": tolerance}
        if p.max_rel > tolerance:
            raise VerificationError(f"the engine differs from ONNX Runtime by {p.max_abs:.3g} "
                                    f"({p.max_rel:.2%} of the largest logit) at batch {batch}, above the "
                                    f"{sidecar.dtype} tolerance of {tolerance:.1%}",
                                    "no engine was written; check the ONNX with ONNX Runtime or build without "
                                    "reduced precision")
    return results
