"""Verified ONNX export of a plain (folded) module.

Every stage is checked where it happens: the raw export and each later pass (onnxslim, fp16, int8)
runs in ONNX Runtime, at the optimization level used for deployment, against its reference (PyTorch
for fp32, the verified fp32 graph for fp16/int8). A check above tolerance raises VerificationError and
no file is written. See docs/export.md for the metadata keys the file carries. A graph over protobuf's
2 GiB limit (or any, with ``external_data=True``) is written with its weights in ``FILE.onnx.data``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from repconv._version import __version__
from repconv.checkpoint import CheckpointMeta
from repconv.convert.fold import FusionReport, fuse_conv_bn
from repconv.convert.graph import example_input
from repconv.convert.replacement import replaced_units
from repconv.errors import InputFileError, OptionError, OutputError, VerificationError
from repconv.export import quantize
from repconv.io import check_output_path
from repconv.onnx_graph import (
    INPUT_NAME,
    META_PREFIX,
    OUTPUT_NAME,
    data_file,
    max_ort_opset,
    ort_session,
    parity,
    run_onnx,
    save_onnx,
    too_large,
)
from repconv.options import Dtype, Exporter, OrtLevel, check_choices, with_overrides

__all__ = ["Check", "ExportOptions", "ExportResult", "export_onnx"]
# fp32: max abs error 1e-4 for logits up to 1 in magnitude, 1e-4 relative beyond (float32 rounding grows
# with the values: a random ResNet-50 with logits ~150 differs by 1.5e-4 abs, 1e-6 relative).
FP32_ABS_TOLERANCE = 1e-4
FP16_REL_TOLERANCE = 1e-2  # max |fp16 - fp32| / max |fp32 logit|
MIN_AGREEMENT = {"fp16": 0.99, "int8": 0.98}  # top-1 agreement with the fp32 graph on real images
EXPORT_BATCH = 2  # >= 2: a batch-1 example can make the exporter specialize the batch dim
VERIFY_BATCHES = (1, 3)  # both differ from the export batch


@dataclass
class ExportOptions:
    """How to export and check an ONNX file (shared by ``repconv.export`` and ``repconv export``)."""

    dtype: Dtype = "fp32"
    opset: int | None = None  # default: the newest both onnxruntime and the exporter support
    dynamic_batch: bool = True
    batch_size: int = 1  # the batch of a static export
    exporter: Exporter = "dynamo"
    simplify: bool = True  # onnxslim
    verify: bool = True
    calib: str | None = None  # int8 calibration images: digits or an image folder
    calib_size: int = 256
    check_images: str | None = None  # real images fp16/int8 are checked on (default: calib)
    check_size: int = 512
    fuse_bn: bool = True
    ort_level: OrtLevel = "all"  # optimization level of the checks (the deployment's)
    min_agreement: float | None = None  # top-1 agreement with fp32 (default MIN_AGREEMENT)
    external_data: bool | None = None  # weights in FILE.onnx.data (None: only above protobuf's 2 GiB)

    def __post_init__(self) -> None:
        check_choices(self)
        if self.dtype == "int8" and not self.calib:
            raise OptionError("calib", None, "is needed for an int8 export (calibration images)",
                              "give digits or an image folder")
        for name in ("batch_size", "calib_size", "check_size"):
            if getattr(self, name) < 1:
                raise OptionError(name, getattr(self, name), "must be at least 1", "give a positive integer")
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 1:
            raise OptionError("min_agreement", self.min_agreement, "is outside [0, 1]", "give a fraction, e.g. 0.98")


@dataclass
class Check:
    """One numerical check of one stage of the export."""

    stage: str  # export | simplify | fp16 | int8
    reference: str  # pytorch | onnx-fp32
    inputs: str  # what the check ran on
    batch_sizes: tuple[int, ...]
    max_abs: float
    max_rel: float
    tolerance: str
    passed: bool
    top1_agreement: float | None = None


@dataclass
class ExportResult:
    path: Path
    dtype: str
    opset: int
    exporter: str
    dynamic_batch: bool
    ort_level: str
    ops_before: dict[str, int]  # op type -> count in the raw export
    ops_after: dict[str, int]  # ... in the written file
    checks: list[Check]
    file_size: int
    metadata: dict[str, str]
    fusion: FusionReport | None = None
    data_file: Path | None = None  # the external weights, when the graph has them
    verified: bool = True
    warnings: list[str] = field(default_factory=list)

    @property
    def parity(self) -> dict[str, float]:
        """Worst error over all checks (what a caller usually wants to print)."""
        return {"max_abs": max((c.max_abs for c in self.checks), default=float("nan")),
                "max_rel": max((c.max_rel for c in self.checks), default=float("nan"))}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["data_file"] = str(self.data_file) if self.data_file else None
        data["fusion"] = self.fusion.to_dict() if self.fusion else None
        data["parity"] = self.parity
        return data


# ---------------------------------------------------------------- opsets


def max_exporter_opset(exporter: str) -> int:
    from torch.onnx import _constants

    if exporter == "legacy":
        return getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    return getattr(_constants, "ONNX_MAX_OPSET", 23)


def resolve_opset(opset: int | None, exporter: str) -> int:
    """The requested opset, checked against onnxruntime and the exporter; default the newest both run."""
    import onnxruntime as ort

    ort_max, exp_max = max_ort_opset(), max_exporter_opset(exporter)
    if opset is None:
        return min(ort_max, exp_max)
    if opset > ort_max:
        raise OptionError("opset", opset, f"is newer than onnxruntime {ort.__version__} runs (up to {ort_max})",
                          f"use {min(ort_max, exp_max)} or upgrade onnxruntime")
    if opset > exp_max:
        raise OptionError("opset", opset, f"is newer than the {exporter} exporter of torch {torch.__version__} "
                          f"writes (up to {exp_max})", f"use {exp_max}")
    low = 18 if exporter == "dynamo" else 9
    if opset < low:
        raise OptionError("opset", opset, f"is older than the {exporter} exporter writes (from {low} on)",
                          f"use {low} or higher" + (", or the legacy exporter" if exporter == "dynamo" else ""))
    return opset


# ---------------------------------------------------------------- the export itself


def _torch_export(model: nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: str,
                  dynamic_batch: bool) -> None:
    """torch.onnx.export with the fixed input/output names; the exporter's chatter is silenced."""
    kwargs: dict = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                        dynamo=exporter == "dynamo")
    if dynamic_batch and exporter == "dynamo":
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=65536)},)
    elif dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    if exporter == "dynamo":
        kwargs["external_data"] = True  # a temporary file; needed above 2 GiB, loaded back by onnx.load
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), **kwargs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        other = "legacy" if exporter == "dynamo" else "dynamo"
        raise VerificationError(f"torch.onnx ({exporter} exporter) cannot export this model: {first}",
                                f"try the {other} exporter") from exc


def _check_io(model: onnx.ModelProto, dynamic_batch: bool) -> None:
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise VerificationError(f"the exported graph has inputs {inputs} and outputs {outputs}, not "
                                f"['{INPUT_NAME}'] -> ['{OUTPUT_NAME}']",
                                "export a classifier whose forward takes one image batch and returns logits")
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if dynamic_batch and not batch_dim.dim_param:
        raise VerificationError(f"the exporter saved a fixed batch of {batch_dim.dim_value} although a dynamic "
                                "batch was asked for", "use {option} legacy, or a static batch", option="exporter")


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count over the main graph and any local functions."""
    counts = Counter(n.op_type for n in model.graph.node)
    for fn in model.functions:
        counts.update(n.op_type for n in fn.node)
    return dict(sorted(counts.items()))


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        return onnxslim.slim(model)


# ---------------------------------------------------------------- running and checking


def _run_torch(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(chunk).numpy() for chunk in x.split(batch_size)])


def _parity_check(stage: str, model: onnx.ModelProto, references: Sequence[tuple[torch.Tensor, np.ndarray]],
                  level: str, inputs: str) -> Check:
    session = ort_session(model, level=level)
    worst_abs = worst_rel = 0.0
    for x, ref in references:
        p = parity(ref, run_onnx(session, x))
        worst_abs, worst_rel = max(worst_abs, p.max_abs), max(worst_rel, p.max_rel)
    scale = max(1.0, max(float(np.abs(ref).max()) for _, ref in references))
    tolerance = f"max abs <= {FP32_ABS_TOLERANCE:g}" + (f" x {scale:.3g} (max |logit|)" if scale > 1 else "")
    return Check(stage, "pytorch", inputs, tuple(len(x) for x, _ in references), worst_abs, worst_rel,
                 tolerance, worst_abs <= FP32_ABS_TOLERANCE * scale)


def _precision_check(stage: str, model: onnx.ModelProto, x: torch.Tensor, reference: np.ndarray, level: str,
                     inputs: str, min_agreement: float) -> Check:
    p = parity(reference, run_onnx(ort_session(model, level=level), x))
    diff, rel, agreement = p.max_abs, p.max_rel, p.top1_agreement
    passed = agreement >= min_agreement and (stage != "fp16" or rel <= FP16_REL_TOLERANCE)
    tolerance = f"top-1 agreement >= {min_agreement:.0%}"
    if stage == "fp16":
        tolerance += f", max rel <= {FP16_REL_TOLERANCE:g}"
    return Check(stage, "onnx-fp32", inputs, (len(x),), diff, rel, tolerance, passed, agreement)


def _raise_failed(check: Check) -> None:
    what = f"max abs error {check.max_abs:.3g} (rel {check.max_rel:.3g})"
    if check.top1_agreement is not None:
        what += f", top-1 agreement {check.top1_agreement:.1%}"
    raise VerificationError(f"ONNX {check.stage} check failed against {check.reference} on {check.inputs}: "
                            f"{what}; required {check.tolerance}; nothing was written",
                            "look for an unsupported op, or turn verification off to write it anyway")


# ---------------------------------------------------------------- metadata


def metadata_props(meta: CheckpointMeta, *, dtype: str, opset: int, exporter: str, dynamic_batch: bool,
                   batch_size: int | None, ort_level: str, fused_bn: bool) -> dict[str, str]:
    """The ``repconv.*`` metadata keys written into the ONNX file (documented in docs/export.md)."""
    plan_digest = meta.extra.get("plan_digest") or (meta.plan.digest() if meta.plan and meta.plan.steps else "")
    props = {
        "repconv_version": __version__,
        "torch_version": torch.__version__,
        "arch": meta.arch or "",
        "arch_kwargs": json.dumps(meta.arch_kwargs, sort_keys=True),
        "kind": meta.kind,
        "plan_digest": plan_digest,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": json.dumps(list(meta.input_size)),
        "mean": json.dumps(list(meta.mean)),
        "std": json.dumps(list(meta.std)),
        "class_names": json.dumps(meta.class_names) if meta.class_names else "",
        "dtype": dtype,
        "opset": str(opset),
        "exporter": exporter,
        "dynamic_batch": json.dumps(dynamic_batch),
        "batch_size": "" if dynamic_batch else str(batch_size),
        "ort_optimization_level": ort_level,
        "fused_bn": json.dumps(fused_bn),
    }
    return {META_PREFIX + k: v for k, v in props.items()}


def _set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    kept = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in kept}, **props})
    model.producer_name, model.producer_version = "repconv", __version__


# ---------------------------------------------------------------- the public function


def export_onnx(model: nn.Module, output: str | os.PathLike, *, meta: CheckpointMeta,
                options: ExportOptions | None = None, progress: Callable[[str], None] | None = None,
                **overrides) -> ExportResult:
    """Export a plain module to a verified ONNX file at ``output``.

    ``model`` must hold ordinary weights (fold a converted model first: ``repconv.export`` does). The
    graph has input ``input`` (N, 3, H, W) and output ``logits``; the batch is symbolic unless
    ``dynamic_batch`` is false (then it is ``batch_size``). ``options`` (or keyword overrides of its fields,
    see :class:`ExportOptions`) say how; nothing is written when a check fails (unless ``verify`` is false).
    """
    o = with_overrides(ExportOptions, options, overrides)
    say = progress or (lambda _msg: None)
    opset = check_options(output, o)
    if not isinstance(model, nn.Module):
        raise InputFileError(f"export needs a torch module, not a {type(model).__name__}",
                             "load the checkpoint with repconv.load first")
    if replaced_units(model):
        raise InputFileError("the model still has replaced units (it is converted, not folded)",
                             "fold it first (`repconv fold`), or call repconv.export, which folds")
    notes: list[str] = []
    model = model.eval()
    fusion = None
    if o.fuse_bn:
        say("fusing conv + BN")
        leaves = meta.plan.leaves if meta.plan else ()
        model, fusion = fuse_conv_bn(model, leaves)
    export_batch = EXPORT_BATCH if o.dynamic_batch else o.batch_size
    with tempfile.TemporaryDirectory(prefix="repconv-onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        say(f"exporting ({o.exporter}, opset {opset})")
        _torch_export(model, example_input(meta.input_size, batch=export_batch), raw, opset, o.exporter,
                      o.dynamic_batch)
        graph = onnx.load(raw)
    _check_io(graph, o.dynamic_batch)
    ops_before = op_counts(graph)
    checks: list[Check] = []
    references = _references(model, meta.input_size, o.dynamic_batch, o.batch_size) if o.verify else []
    where = "random inputs"

    def check(stage: str, g: onnx.ModelProto) -> None:
        if o.verify:
            say(f"verifying {stage} in onnxruntime")
            checks.append(_parity_check(stage, g, references, o.ort_level, where))
            if not checks[-1].passed:
                _raise_failed(checks[-1])

    check("export", graph)
    if o.simplify and too_large(graph):
        notes.append("onnxslim was skipped: it cannot size a graph over protobuf's 2 GiB limit (ONNX Runtime "
                     "still applies its own graph optimizations when it loads the file)")
    elif o.simplify:
        say("simplifying (onnxslim)")
        graph = _simplify(graph)
        check("simplify", graph)
    if o.dtype != "fp32":
        graph = _lower_precision(graph, meta, o, checks, notes, say)
    if not o.verify:
        notes.append("not verified (verify off): outputs were not compared with PyTorch")
    _set_metadata(graph, metadata_props(meta, dtype=o.dtype, opset=opset, exporter=o.exporter,
                                        dynamic_batch=o.dynamic_batch, batch_size=o.batch_size, ort_level=o.ort_level,
                                        fused_bn=bool(fusion and fusion.fused)))
    external = too_large(graph) if o.external_data is None else o.external_data
    say("writing and checking (onnx.checker, full)")
    path = _write(graph, output, external)
    weights = data_file(path) if external else None
    size = path.stat().st_size + (weights.stat().st_size if weights else 0)
    return ExportResult(path, o.dtype, opset, o.exporter, o.dynamic_batch, o.ort_level, ops_before, op_counts(graph),
                        checks, size, {p.key: p.value for p in graph.metadata_props}, fusion, weights, o.verify, notes)


def check_options(output: str | os.PathLike, options: ExportOptions) -> int:
    """Reject a bad output name, image folder or opset before any work is done; returns the opset to use."""
    if Path(output).suffix != ".onnx":
        raise OutputError(f"'{output}' does not end in .onnx", "name the output FILE.onnx")
    for name in ("calib", "check_images"):
        source = getattr(options, name)
        if source is not None and str(source) != "digits" and not Path(source).is_dir():
            raise OptionError(name, str(source), "is neither 'digits' nor an existing folder", "check the path")
    check_output_path(output)
    return resolve_opset(options.opset, options.exporter)


def _references(model: nn.Module, input_size, dynamic_batch: bool, batch_size: int):
    if dynamic_batch:
        batches = [example_input(input_size, batch=b, seed=10 + b) for b in VERIFY_BATCHES]
    else:
        batches = [example_input(input_size, batch=batch_size, seed=seed) for seed in (11, 12)]
    return [(x, _run_torch(model, x)) for x in batches]


def _lower_precision(graph: onnx.ModelProto, meta: CheckpointMeta, o: ExportOptions, checks: list[Check],
                     notes: list[str], say) -> onnx.ModelProto:
    """fp16 or int8 from the verified fp32 graph, checked against it on real images."""
    dtype, calib, verify, ort_level = o.dtype, o.calib, o.verify, o.ort_level
    source = o.check_images or calib
    if dtype == "fp16":
        say("converting to fp16")
        lowered = quantize.to_fp16(graph)
    else:
        say(f"calibrating int8 on {calib}")
        data = quantize.images(calib, "train", meta.input_size, meta.mean, meta.std, o.calib_size)
        lowered = quantize.to_int8(graph, data)
    if not verify:
        return lowered
    if source:
        x = quantize.images(source, "val", meta.input_size, meta.mean, meta.std, o.check_size,
                            "check_images" if o.check_images else "calib")
        inputs = f"{len(x)} real images ({source}, val)"
    else:
        x = example_input(meta.input_size, batch=32, seed=13)
        inputs = "32 random inputs"
        notes.append(f"{dtype} was checked on random inputs only: give check images (a folder, or digits) to check "
                     "it on real images")
    say(f"verifying {dtype} against fp32 on {inputs}")
    reference = run_onnx(ort_session(graph, level=ort_level), x)
    check = _precision_check(dtype, lowered, x, reference, ort_level, inputs,
                             MIN_AGREEMENT[dtype] if o.min_agreement is None else o.min_agreement)
    checks.append(check)
    if not check.passed:
        _raise_failed(check)
    return lowered


def _full_check(path: Path) -> None:
    """onnx.checker on the written file (a path, so that graphs with external weights are checked too)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = (str(exc).strip().splitlines() or ["?"])[0][:300]
        raise VerificationError(f"onnx.checker rejects the exported graph: {first}; nothing was written",
                                "try the legacy exporter, or export without simplification") from exc


def _write(graph: onnx.ModelProto, output: str | os.PathLike, external: bool) -> Path:
    """Write and check the file in a temporary folder beside ``output``, then move it (weights first) in place."""
    output = check_output_path(output)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        staged = save_onnx(graph, Path(tmp) / output.name, external)
        _full_check(staged)
        if external:
            os.replace(data_file(staged), data_file(output))
        os.replace(staged, output)
    return output
