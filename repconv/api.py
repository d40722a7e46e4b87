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

from repconv.checkpoint import CheckpointMeta, Loaded, build_from_meta, fit_state_dict, save_state_dict
from repconv.checkpoint import load as _load_checkpoint
from repconv.checkpoint import save as _save
from repconv.convert.apply import apply_plan
from repconv.convert.fold import (
    FusionReport,
    Parity,
    compare,
    folded_state_dict,
    fuse_conv_bn,
    has_trivial_bn_statistics,
)
from repconv.convert.graph import (
    Run,
    count_flops,
    count_params,
    example_input,
    find_runs,
    module_output_shapes,
    propagate_shapes,
    trace,
)
from repconv.convert.plan import Plan
from repconv.convert.replacement import replaced_units, select_units
from repconv.errors import ArchError, NothingToReplace, OutputError, PlanError, VerificationError
from repconv.export.onnx import ExportResult, check_options, export_onnx

__all__ = [
    "Conversion",
    "ConversionSummary",
    "ExportResult",
    "FoldResult",
    "convert",
    "export",
    "fold",
    "inspect",
    "load",
    "load_checkpoint",
    "parameter_free_report",
    "save",
    "summarize",
]

METHODS = ("replacement", "parameter-free", "both")
FOLD_TOLERANCE = 1e-5  # max |converted - folded| / max |converted|

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
    parameter_free_policies: list[dict] = field(default_factory=list)
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


def _runs_table(runs: Sequence[Run], shapes: dict[str, tuple[int, ...]] | None = None) -> list[dict]:
    shapes = shapes or {}
    return [{"container": r.container or "<root>", "members": list(r.members),
             "interior": list(r.interior), "params_per_member": r.params_per_member,
             "output_shape": list(shapes.get(r.members[0], ())) or None} for r in runs]


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

        kept = [p for s in steps for p in (s.unit, s.prev, s.next)]  # replaced units and their weight sources
        steps += plan_parameter_free(model, policy=pf_policy, op=pf_op, units=pf_units, exclude=kept, leaves=leaves)
    return Plan(steps, arch, list(leaves)), runs


def _nothing_to_replace(runs: Sequence[Run]) -> str:
    if not runs:
        return "the model has no repeated unit (no consecutive siblings with identical parameter shapes)"
    longest = max(len(r.members) for r in runs)
    return (f"the model has {len(runs)} run(s) of repeated units but none with an interior member "
            f"(the longest run has {longest}; a replaced unit needs a neighbour on each side)")


def summarize(original: nn.Module, converted: nn.Module, plan: Plan, *, arch: str | None, method: str,
              input_size: Sequence[int], runs: Sequence[Run] = (), leaves: Sequence[str] = (),
              shapes: dict | None = None) -> ConversionSummary:
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
        runs=_runs_table(runs, shapes), opaque_modules=list(leaves), input_size=tuple(input_size))


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
    propagate_shapes(gm, example_input(meta.input_size, batch=1))
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
    shapes = module_output_shapes(gm, [m for r in runs for m in r.members[:1]])
    summary = summarize(original, gm, plan, arch=meta.arch, method=method, input_size=meta.input_size,
                        runs=runs, leaves=leaves, shapes=shapes)
    result = Conversion(gm, plan, meta, summary)
    if output is not None:
        result.save(output)
    return result


def inspect(model: ModelLike, **options) -> ConversionSummary:
    """What ``convert`` with the same options would do, without writing anything.

    A model with nothing to replace is reported (``message``), not raised. The summary also lists the
    model's parameter-free targets and what each parameter-free policy would save.
    """
    summary = _inspect(model, **options)
    loaded = load_checkpoint(model, arch=options.get("arch"), num_classes=options.get("num_classes"),
                             trust_pickle=options.get("trust_pickle", False))
    summary.parameter_free_targets, summary.parameter_free_policies = parameter_free_report(
        loaded.model, leaves=options.get("leaves", ()), input_size=loaded.meta.input_size,
        op=options.get("pf_op", "max"))
    return summary


def _inspect(model: ModelLike, **options) -> ConversionSummary:
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


# ---------------------------------------------------------------- parameter-free (issue 7)


def parameter_free_report(model: nn.Module, *, leaves: Sequence[str] = (), input_size: Sequence[int] = (3, 224, 224),
                          op: str = "max") -> tuple[list[dict], list[dict]]:
    """The model's parameter-free targets, and the params / MACs each policy would leave.

    Returns ``(targets, policies)``; both are empty when the model has no target.
    """
    from repconv.convert.parameter_free import (
        POLICIES,
        apply_parameter_free,
        describe_step,
        find_targets,
        plan_parameter_free,
    )

    targets = find_targets(model, leaves=leaves)
    if not targets:
        return [], []
    rows = [{"target": t.path, "kind": t.kind, "kernel": t.kernel, "stride": t.stride, "absorbed": t.absorbed,
             "params": t.params} for t in targets]
    x = example_input(input_size, batch=1)
    policies = []
    for policy in POLICIES:
        steps = plan_parameter_free(model, policy=policy, op=op, leaves=leaves)
        by_target = {s.target: s for s in steps}
        for row in rows:
            row[policy] = describe_step(by_target.get(row["target"]))
        gm = apply_parameter_free(trace(copy.deepcopy(model), leaves), steps)
        flops = count_flops(gm, x)
        policies.append({"policy": policy, "steps": len(steps), "params_after": count_params(gm),
                         "flops_after": flops, "macs_after": flops // 2})
    return rows, policies


# ---------------------------------------------------------------- deploy (issue 4): fold, export


@dataclass
class FoldResult:
    model: nn.Module  # plain module: the original architecture for a replacement-only plan
    meta: CheckpointMeta  # kind == "folded"
    folded_units: list[str]
    parity: Parity  # converted vs folded on the check batch
    original_architecture: bool  # the state_dict loads strictly into the original model class
    fusion: FusionReport | None = None
    warnings: list[str] = field(default_factory=list)
    output: Path | None = None

    def save(self, path: str | os.PathLike) -> Path:
        """``.safetensors`` (state_dict + repconv header) or ``.pt`` (plain state_dict, original architecture only)."""
        path = Path(path)
        if path.suffix in (".pt", ".pth"):
            if not self.original_architecture:
                raise OutputError(f"'{path}': this folded model is not the plain original architecture (fused BN "
                                  "or parameter-free steps), so it needs repconv's container",
                                  "name the output *.safetensors")
            self.output = save_state_dict(path, self.model.state_dict())
        else:
            self.output = _save(path, self.model, self.meta)
        return self.output

    def to_dict(self) -> dict:
        return {"arch": self.meta.arch, "folded_units": self.folded_units, "parity": self.parity.to_dict(),
                "original_architecture": self.original_architecture,
                "fusion": self.fusion.to_dict() if self.fusion else None, "warnings": self.warnings,
                "output": str(self.output) if self.output else None}


def _as_loaded(model: ModelLike | Conversion, **load_options) -> Loaded:
    if isinstance(model, Conversion):
        return Loaded(model.model, model.meta)
    return load_checkpoint(model, **load_options)


def fold(model: ModelLike | Conversion, *, output: str | os.PathLike | None = None, fuse_bn: bool = False,
         tolerance: float = FOLD_TOLERANCE, arch: str | None = None, num_classes: int | None = None,
         trust_pickle: bool = False) -> FoldResult:
    """Evaluate every replaced unit's ``a * P_prev + b * P_next`` once into ordinary weights.

    The folded model is checked against the converted one on a check batch (eval mode); a relative
    difference above ``tolerance`` raises VerificationError and nothing is written.
    """
    loaded = _as_loaded(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
    converted = loaded.model.eval()
    meta = copy.deepcopy(loaded.meta)
    units = list(replaced_units(converted))
    plan = meta.plan
    meta.kind = "folded"
    if plan is not None and plan.steps:
        meta.extra.setdefault("plan_digest", plan.digest())
        meta.plan = plan.without_replacement()
    meta.extra["folded_units"] = units
    if units or (plan is not None and plan.steps):
        if meta.arch is None:
            raise ArchError("cannot fold a converted model whose architecture is unknown",
                            "load it from its repconv file, or pass arch=")
        folded = build_from_meta(CheckpointMeta(arch=meta.arch, arch_kwargs=meta.arch_kwargs, plan=meta.plan))
        fit_state_dict(folded, folded_state_dict(converted), meta.arch, loaded.path)
    else:
        folded = copy.deepcopy(converted)
    folded.eval()
    fusion = None
    if fuse_bn:
        folded, fusion = fuse_conv_bn(folded, plan.leaves if plan else ())
        meta.extra["fused_bn"] = True
    notes = []
    if has_trivial_bn_statistics(converted):
        notes.append("every BatchNorm still has its initial statistics (mean 0, var 1): the parity check "
                     "cannot see BN-folding mistakes on this model")
    parity = compare(converted, folded, [example_input(meta.input_size, batch=2, seed=1)])
    if parity.max_rel > tolerance:
        raise VerificationError(f"the folded model differs from the converted one by {parity.max_abs:.3g} "
                                f"(relative {parity.max_rel:.3g} > {tolerance:g}); nothing was written",
                                "report this with the model and plan (repconv --debug fold ...)")
    original = not meta.plan.steps if meta.plan else True
    result = FoldResult(folded, meta, units, parity, original and not fuse_bn, fusion, notes)
    if output is not None:
        result.save(output)
    return result


def export(model: ModelLike | Conversion, output: str | os.PathLike, *, format: str = "onnx",
           arch: str | None = None, num_classes: int | None = None, trust_pickle: bool = False,
           **options) -> ExportResult:
    """Export a checkpoint (path, module, Loaded or Conversion) as a verified ONNX file.

    A converted model is folded first (its fold parity is checked as in :func:`fold`). ``options`` are
    those of :func:`repconv.export.onnx.export_onnx` (dtype, opset, dynamic_batch, exporter, calib, ...).
    """
    if format != "onnx":
        raise PlanError(f"unknown export format '{format}'", "use --format onnx")
    check_options(output, **options)  # fail fast, before loading and folding
    loaded = _as_loaded(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
    if replaced_units(loaded.model) or loaded.meta.kind == "converted":
        folded = fold(loaded)
        loaded = Loaded(folded.model, folded.meta, loaded.path)
    return export_onnx(loaded.model, output, meta=loaded.meta, **options)
