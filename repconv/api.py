"""The public Python API: one function per pipeline stage (see docs/architecture.md).

Each function takes paths or modules and returns a dataclass; nothing here prints.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from repconv.checkpoint import CheckpointMeta, Loaded
from repconv.checkpoint import load as _load_checkpoint
from repconv.checkpoint import save as _save
from repconv.convert.apply import apply_plan
from repconv.convert.graph import (
    Run,
    count_flops,
    count_params,
    example_input,
    find_runs,
    trace,
)
from repconv.convert.plan import Plan
from repconv.convert.replacement import replaced_units, select_units
from repconv.errors import NothingToReplace, PlanError
from repconv.export.tensorrt import EngineBuild, EngineOptions
from repconv.runtime.bench import BenchOptions, BenchReport, Target
from repconv.runtime.predict import PredictResult
from repconv.runtime.session import Session, artifact_backend, open_session

__all__ = [
    "Conversion",
    "ConversionSummary",
    "convert",
    "inspect",
    "load",
    "load_checkpoint",
    "save",
    "summarize",
]

METHODS = ("replacement", "parameter-free", "both")

ModelLike = str | os.PathLike | nn.Module | Loaded


# ---------------------------------------------------------------- loading and saving


def load_checkpoint(model: ModelLike, *, arch: str | None = None, num_classes: int | None = None,
                    trust_pickle: bool = False) -> Loaded:
    """A path, a module or a Loaded -> Loaded (module + metadata)."""
    if isinstance(model, Loaded):
        return model
    if isinstance(model, nn.Module):
        from repconv.models import resolve_arch

        meta = CheckpointMeta.for_arch(resolve_arch(arch)) if arch else CheckpointMeta()
        return Loaded(model, meta)
    return _load_checkpoint(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)


def load(path: str | os.PathLike, *, arch: str | None = None, num_classes: int | None = None,
         trust_pickle: bool = False) -> nn.Module:
    """Read any checkpoint repconv accepts and return the module (converted ones come back converted)."""
    return load_checkpoint(path, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle).model


def save(path: str | os.PathLike, model: nn.Module, meta: CheckpointMeta) -> Path:
    return _save(path, model, meta)


# ---------------------------------------------------------------- inspect / convert


@dataclass
class ConversionSummary:
    arch: str | None
    method: str
    params_before: int
    params_after: int
    trainable_params: int
    flops_before: int
    flops_after: int
    macs_before: int
    macs_after: int
    replaced_units: list[str]
    steps: list[dict]
    runs: list[dict] = field(default_factory=list)
    parameter_free_targets: list[dict] = field(default_factory=list)
    opaque_modules: list[str] = field(default_factory=list)
    input_size: tuple[int, int, int] = (3, 224, 224)
    message: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Conversion:
    model: nn.Module  # the converted GraphModule
    plan: Plan
    meta: CheckpointMeta
    summary: ConversionSummary
    output: Path | None = None

    def save(self, path: str | os.PathLike) -> Path:
        self.output = _save(path, self.model, self.meta)
        return self.output


def _runs_table(runs: Sequence[Run]) -> list[dict]:
    return [{"container": r.container or "<root>", "members": list(r.members),
             "interior": list(r.interior), "params_per_member": r.params_per_member} for r in runs]


def plan_conversion(model: nn.Module, *, arch: str | None = None, method: str = "replacement", every: int = 2,
                    units: Sequence[str] | None = None, max_fraction: float | None = None, init: str = "half",
                    neighbor_grad: bool = False, leaves: Sequence[str] = (), pf_policy: str = "all",
                    pf_op: str = "max", pf_units: Sequence[str] | None = None) -> tuple[Plan, list[Run]]:
    """Choose what to change. Raises PlanError when the chosen method finds nothing to do."""
    if method not in METHODS:
        raise PlanError(f"unknown method '{method}'", f"use one of {', '.join(METHODS)}")
    runs = find_runs(model, opaque=leaves)
    steps: list = []
    if method in ("replacement", "both"):
        steps += select_units(runs, every=every, units=units, max_fraction=max_fraction,
                              total_params=count_params(model), init=init, neighbor_grad=neighbor_grad)
        if not steps and method == "replacement":
            raise NothingToReplace(_nothing_to_replace(runs), "choose another model or --method parameter-free")
    if method in ("parameter-free", "both"):
        from repconv.convert.parameter_free import plan_parameter_free

        steps += plan_parameter_free(model, policy=pf_policy, op=pf_op, units=pf_units,
                                     exclude=[s.unit for s in steps])
    return Plan(steps, arch, list(leaves)), runs


def _nothing_to_replace(runs: Sequence[Run]) -> str:
    if not runs:
        return "the model has no repeated unit (no consecutive siblings with identical parameter shapes)"
    longest = max(len(r.members) for r in runs)
    return (f"the model has {len(runs)} run(s) of repeated units but none with an interior member "
            f"(the longest run has {longest}; a replaced unit needs a neighbour on each side)")


def summarize(original: nn.Module, converted: nn.Module, plan: Plan, *, arch: str | None, method: str,
              input_size: Sequence[int], runs: Sequence[Run] = (), leaves: Sequence[str] = ()) -> ConversionSummary:
    x = example_input(input_size, batch=1)
    flops_before, flops_after = count_flops(original, x), count_flops(converted, x)
    return ConversionSummary(
        arch=arch, method=method,
        params_before=count_params(original), params_after=count_params(converted),
        trainable_params=count_params(converted, trainable_only=True),
        flops_before=flops_before, flops_after=flops_after,
        macs_before=flops_before // 2, macs_after=flops_after // 2,
        replaced_units=list(replaced_units(converted)),
        steps=[{"kind": s.kind, **asdict(s)} for s in plan.steps],
        runs=_runs_table(runs), opaque_modules=list(leaves), input_size=tuple(input_size))


def convert(model: ModelLike, *, arch: str | None = None, num_classes: int | None = None,
            method: str = "replacement", every: int = 2, units: Sequence[str] | None = None,
            max_fraction: float | None = None, init: str = "half", neighbor_grad: bool = False,
            plan: Plan | str | os.PathLike | None = None, leaves: Sequence[str] = (), pf_policy: str = "all",
            pf_op: str = "max", pf_units: Sequence[str] | None = None, trust_pickle: bool = False,
            output: str | os.PathLike | None = None) -> Conversion:
    """Rewrite a model into the chosen form. The input model is never modified."""
    loaded = load_checkpoint(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
    if loaded.meta.kind == "converted":
        raise PlanError("the model is already converted", "convert the original checkpoint instead")
    original = loaded.model.eval()
    meta = copy.deepcopy(loaded.meta)
    leaves = list(Plan.load(plan).leaves if isinstance(plan, (str, os.PathLike)) else
                  plan.leaves if isinstance(plan, Plan) else ()) or list(leaves)
    gm = trace(copy.deepcopy(original), leaves)  # first, so an untraceable model is reported as such
    if plan is not None:
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        plan.leaves = leaves
        runs = find_runs(original, opaque=leaves)
    else:
        plan, runs = plan_conversion(original, arch=meta.arch, method=method, every=every, units=units,
                                     max_fraction=max_fraction, init=init, neighbor_grad=neighbor_grad,
                                     leaves=leaves, pf_policy=pf_policy, pf_op=pf_op, pf_units=pf_units)
    plan.arch = meta.arch
    apply_plan(gm, plan, model_for_init=original)
    gm.eval()
    meta.kind, meta.plan = "converted", plan
    summary = summarize(original, gm, plan, arch=meta.arch, method=method, input_size=meta.input_size,
                        runs=runs, leaves=leaves)
    result = Conversion(gm, plan, meta, summary)
    if output is not None:
        result.save(output)
    return result


def inspect(model: ModelLike, **options) -> ConversionSummary:
    """What ``convert`` with the same options would do, without writing anything.

    A model with nothing to replace is reported (``message``), not raised.
    """
    try:
        return convert(model, **options).summary
    except NothingToReplace as exc:
        loaded = load_checkpoint(model, arch=options.get("arch"), num_classes=options.get("num_classes"),
                                 trust_pickle=options.get("trust_pickle", False))
        leaves = options.get("leaves", ())
        runs = find_runs(loaded.model, opaque=leaves)
        x = example_input(loaded.meta.input_size, batch=1)
        flops = count_flops(loaded.model, x)
        params = count_params(loaded.model)
        return ConversionSummary(loaded.meta.arch, options.get("method", "replacement"), params, params,
                                 count_params(loaded.model, True), flops, flops, flops // 2, flops // 2, [], [],
                                 runs=_runs_table(runs), opaque_modules=list(leaves),
                                 input_size=loaded.meta.input_size, message=str(exc))


def check_round_trip(conversion: Conversion, path: str | os.PathLike) -> float:
    """Max abs difference between the in-memory converted model and the one re-loaded from ``path``."""
    x = example_input(conversion.meta.input_size, batch=2, seed=1)
    reloaded = load(path)
    with torch.no_grad():
        return float((conversion.model.eval()(x) - reloaded.eval()(x)).abs().max())


# ---------------------------------------------------------------- runtime (issue 4 parts 4-5, issue 5 part 1)
# TensorRT engines, the Session interface, predict, bench.

__all__ += ["BenchOptions", "BenchReport", "EngineBuild", "EngineOptions", "EnginePlan", "PredictResult", "Session",
            "bench", "build_engine", "engine_plan", "open_session", "predict"]


def predict(artifact: str | os.PathLike, images: Sequence[str | os.PathLike], *, top_k: int = 5,
            backend: str | None = None, device: str | None = None, arch: str | None = None,
            num_classes: int | None = None, trust_pickle: bool = False, batch_size: int = 32) -> PredictResult:
    """Top-k classes for image files (or folders of them) with any checkpoint, ONNX file or engine."""
    from repconv.runtime.predict import predict_images

    with open_session(artifact, backend, device, arch=arch, num_classes=num_classes,
                      trust_pickle=trust_pickle) as session:
        return predict_images(session, images, top_k=top_k, batch_size=batch_size)


@dataclass
class EnginePlan:
    """What a TensorRT build of ``source`` would do: shapes, and the equivalent trtexec command."""

    source: Path
    onnx: Path
    engine: Path
    shapes: dict[str, dict[str, list[int]]]
    dynamic: bool
    trtexec: list[str]
    onnx_first: list[str] | None = None  # the repconv command that writes the ONNX, when source is a checkpoint

    def to_dict(self) -> dict:
        from repconv.export.tensorrt import format_command

        return {"source": str(self.source), "onnx": str(self.onnx), "engine": str(self.engine),
                "shapes": self.shapes, "dynamic": self.dynamic, "trtexec": self.trtexec,
                "command": format_command(self.trtexec),
                "onnx_first": format_command(self.onnx_first) if self.onnx_first else None}


def engine_plan(source: str | os.PathLike, output: str | os.PathLike, options: EngineOptions | None = None, *,
                dtype: str = "fp32", arch: str | None = None, num_classes: int | None = None,
                trust_pickle: bool = False) -> EnginePlan:
    """The engine build for ``source`` (an ONNX file, or a checkpoint to export first) without TensorRT."""
    from repconv.export.tensorrt import profile_shapes, read_onnx, trtexec_command
    from repconv.runtime.metadata import ArtifactInfo

    options = options or EngineOptions()
    options.validate()
    source, output = Path(source), Path(output)
    if artifact_backend(source) == "ort":
        graph = read_onnx(source)
        shapes, dynamic, onnx_path, first = profile_shapes(graph, options), any(s.dynamic for s in graph.inputs), \
            source, None
    else:
        loaded = load_checkpoint(source, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
        size = list(ArtifactInfo.from_checkpoint(loaded.meta).input_size)
        shapes = {"input": {"min": [options.min_batch, *size], "opt": [options.opt_batch, *size],
                            "max": [options.max_batch, *size]}}
        dynamic, onnx_path = True, output.with_suffix(".onnx")
        first = ["repconv", "export", str(source), "--format", "onnx", "--dtype", dtype, "-o", str(onnx_path)]
        if arch:
            first[3:3] = ["--arch", arch]
    return EnginePlan(source, onnx_path, output, shapes, dynamic,
                      trtexec_command(onnx_path, output, shapes, options, dynamic), first)


def build_engine(source: str | os.PathLike, output: str | os.PathLike, options: EngineOptions | None = None
                 ) -> EngineBuild:
    """Build a TensorRT engine (+ JSON sidecar) from an ONNX file and verify it against ONNX Runtime.

    Needs TensorRT and an NVIDIA GPU; without them a DependencyError says how to get them.
    """
    from repconv.errors import InputFileError
    from repconv.export.tensorrt import build_engine as _build
    from repconv.runtime.tensorrt import require_tensorrt

    require_tensorrt("building a TensorRT engine")
    if artifact_backend(source) != "ort":
        raise InputFileError(f"'{source}' is not an ONNX file; engines are built from the exported ONNX",
                             f"run `repconv export {source} --format onnx -o MODEL.onnx` first, then "
                             "`repconv export MODEL.onnx --format engine -o MODEL.engine`")
    return _build(source, output, options)


def bench(artifacts: Sequence[str | os.PathLike], *, batches: Sequence[int] = (1, 8, 32), size: int | None = None,
          backends: Sequence[str] | None = None, device: str | None = None, warmup: int = 3, repeats: int = 20,
          max_seconds: float = 10.0, threads: int | None = None, arch: str | None = None,
          num_classes: int | None = None, trust_pickle: bool = False, json_out: str | os.PathLike | None = None,
          plot: str | os.PathLike | None = None, progress=None) -> BenchReport:
    """Measure artifacts side by side in this process; the first one is the baseline of every ratio.

    Each artifact runs on every backend in ``backends`` that can run it (torch: checkpoints; ort: ONNX;
    trt: engines, and ONNX files through a temporary engine when TensorRT is present); by default on
    its own backend. ``json_out`` / ``plot`` are written at the end (checked for writability first).
    """
    import json

    from repconv.checkpoint import check_output_path, write_text_atomic
    from repconv.errors import OptionError
    from repconv.runtime.bench import plot_report
    from repconv.runtime.session import BACKENDS

    options = BenchOptions(tuple(batches), size, warmup, repeats, max_seconds, device, threads)
    options.validate()
    if not artifacts:
        raise OptionError("no artifact to bench", "give one or more checkpoints, .onnx files or .engine files")
    for target in (json_out, plot):
        if target is not None:
            check_output_path(target)
    if plot is not None and Path(plot).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise OptionError(f"--plot '{plot}' has no image suffix", "end it with .png, .svg or .pdf")
    unknown = [b for b in backends or () if b not in BACKENDS]
    if unknown:
        raise OptionError(f"unknown backend {', '.join(unknown)}", f"choose from {','.join(BACKENDS)}")
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        report = _bench_targets(artifacts, options, backends, device, arch, num_classes, trust_pickle, threads,
                                progress)
    finally:
        torch.set_num_threads(previous_threads)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(report.to_dict(), indent=2) + "\n")
    if plot is not None:
        plot_report(report, Path(plot))
    return report


def _bench_targets(artifacts, options, backends, device, arch, num_classes, trust_pickle, threads, progress
                   ) -> BenchReport:
    import tempfile

    from repconv.errors import InputFileError, OptionError
    from repconv.runtime.bench import run_bench
    from repconv.runtime.tensorrt import require_tensorrt

    with tempfile.TemporaryDirectory(prefix="repconv-bench-") as scratch:
        targets = []
        for artifact in artifacts:
            path = Path(artifact)
            if not path.is_file():
                raise InputFileError(f"'{path}' does not exist or is not a file", "check the artifact paths")
            natural = artifact_backend(path)
            chosen = [b for b in (backends or [natural]) if b == natural or (natural, b) == ("ort", "trt")]
            if "trt" in chosen:  # refuse now, not after measuring the artifacts before this one
                require_tensorrt(f"benchmarking '{path.name}' with TensorRT")
            if not chosen:
                raise OptionError(f"'{path}' runs on the {natural} backend, which --backend "
                                  f"{','.join(backends)} leaves out", f"add {natural} to --backend")
            for b in chosen:
                run_path = path
                if (natural, b) == ("ort", "trt"):
                    run_path = build_engine(path, Path(scratch) / f"{path.stem}.engine").engine
                targets.append(Target(path.name, run_path, b, _opener(run_path, b, device, arch, num_classes,
                                                                      trust_pickle, threads)))
        return run_bench(targets, options, progress)


def _opener(path: Path, backend: str, device, arch, num_classes, trust_pickle, threads):
    return lambda: open_session(path, backend if backend != "torch" else None, device, arch=arch,
                                num_classes=num_classes, trust_pickle=trust_pickle, threads=threads)
