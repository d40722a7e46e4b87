"""The convert, inspect and fold stages: a checkpoint in, its converted (or folded back) module out.

The torch.fx passes live in :mod:`repconv.convert`; this module reads the checkpoint, chooses the plan
(by position, by measured damage, or a given one), applies it, counts what changed, and folds a converted
model back into static weights with its parity checked.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from repconv.checkpoint import (
    CheckpointMeta,
    Loaded,
    ModelLike,
    build_from_meta,
    fit_state_dict,
    load,
    load_checkpoint,
    save,
    save_state_dict,
)
from repconv.convert.apply import apply_plan
from repconv.convert.fold import FusionReport, compare, folded_state_dict, fuse_conv_bn, has_trivial_bn_statistics
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
from repconv.convert.measure import candidate_steps, least_harmful, measure_damage
from repconv.convert.parameter_free import POLICIES, apply_parameter_free, describe_step, find_targets
from repconv.convert.parameter_free import plan_parameter_free as _plan_parameter_free
from repconv.convert.plan import Plan
from repconv.convert.replacement import replaced_units, select_units
from repconv.data import calibration_batches
from repconv.errors import ArchError, NothingToReplace, OptionError, OutputError, PlanError, VerificationError
from repconv.io import check_output_path, write_text_atomic
from repconv.models.remap import RemapMode
from repconv.onnx_graph import Parity
from repconv.options import Init, Method, PfOp, PfPolicy, Select, check_choices, with_overrides

__all__ = ["Conversion", "ConversionSummary", "ConvertOptions", "FoldResult", "check_round_trip", "convert", "fold",
           "inspect", "measured_units", "parameter_free_report", "summarize"]

FOLD_TOLERANCE = 1e-5  # max |converted - folded| / max |converted|


@dataclass
class ConvertOptions:
    """What ``convert`` / ``inspect`` change (shared by the API and ``repconv convert`` / ``inspect``)."""

    method: Method = "replacement"
    every: int = 2  # replace every K-th interior member of each run (K >= 2)
    units: Sequence[str] | None = None  # replace exactly these units (globs)
    max_fraction: float | None = None  # replace at most this share of the parameters
    init: Init = "half"  # initial scalars: (0.5, 0.5) or weight-space least squares
    neighbor_grad: bool = False  # gradients flow into the neighbours through the synthesis
    plan: Plan | str | os.PathLike | None = None  # apply this plan instead of choosing
    leaves: Sequence[str] = ()  # module paths kept opaque (not traced into, not rewritten)
    pf_policy: PfPolicy = "all"
    pf_op: PfOp = "max"
    pf_units: Sequence[str] | None = None  # parameter-free targets (globs)
    select: Select = "position"  # position (every / units) | measured (least KL damage on data)
    budget: int | None = None  # most units replaced with select="measured"
    data: str | os.PathLike | None = None  # calibration images for select="measured"
    calib_batches: int = 4

    def __post_init__(self) -> None:
        check_choices(self)
        self.units = list(self.units) if self.units else None
        self.pf_units = list(self.pf_units) if self.pf_units else None
        self.leaves = list(self.leaves or ())
        if self.budget is not None and self.budget < 1:
            raise OptionError("budget", self.budget, "replaces nothing", "give at least 1 unit")
        if self.calib_batches < 1:
            raise OptionError("calib_batches", self.calib_batches, "must be at least 1", "give a positive integer")


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
        self.output = save(path, self.model, self.meta)
        return self.output


# ---------------------------------------------------------------- choosing the plan


def _runs_table(runs: Sequence[Run], shapes: dict[str, tuple[int, ...]] | None = None) -> list[dict]:
    shapes = shapes or {}
    return [{"container": r.container or "<root>", "members": list(r.members),
             "interior": list(r.interior), "params_per_member": r.params_per_member,
             "output_shape": list(shapes.get(r.members[0], ())) or None} for r in runs]


def plan_conversion(model: nn.Module, options: ConvertOptions, arch: str | None = None) -> tuple[Plan, list[Run]]:
    """Choose what to change by position. Raises NothingToReplace when the method finds nothing to do."""
    o = options
    runs = find_runs(model, opaque=o.leaves)
    steps: list = []
    if o.method in ("replacement", "both"):
        steps += select_units(runs, every=o.every, units=o.units, max_fraction=o.max_fraction,
                              total_params=count_params(model), init=o.init, neighbor_grad=o.neighbor_grad)
        if not steps and o.method == "replacement":
            raise NothingToReplace(_nothing_to_replace(runs), "choose another model or the parameter-free method")
    if o.method in ("parameter-free", "both"):
        kept = [p for s in steps for p in (s.unit, s.prev, s.next)]  # replaced units and their weight sources
        steps += _plan_parameter_free(model, policy=o.pf_policy, op=o.pf_op, units=o.pf_units, exclude=kept,
                                      leaves=o.leaves)
    return Plan(steps, arch, list(o.leaves)), runs


def _nothing_to_replace(runs: Sequence[Run]) -> str:
    if not runs:
        return "the model has no repeated unit (no consecutive siblings with identical parameter shapes)"
    longest = max(len(r.members) for r in runs)
    return (f"the model has {len(runs)} run(s) of repeated units but none with an interior member "
            f"(the longest run has {longest}; a replaced unit needs a neighbour on each side)")


def measured_units(original: nn.Module, input_size, *, data, budget: int | None = None, leaves: Sequence[str] = (),
                   batches: int = 4, batch_size: int = 32, mean=None, std=None, seed: int = 0):
    """Rank every replaceable unit by the KL its replacement alone (scalars fitted) does to the logits on
    calibration data; return (the least harmful non-touching units up to ``budget``, all damages)."""
    if data is None:
        raise OptionError("data", None, "is needed to measure which units to replace (select='measured')",
                          "give calibration images: digits or a folder")
    meta = CheckpointMeta(input_size=tuple(input_size))
    spec = (tuple(input_size), tuple(mean or meta.mean), tuple(std or meta.std))
    runs = find_runs(original, opaque=leaves)
    candidates = candidate_steps(runs)
    if not candidates:
        raise NothingToReplace(_nothing_to_replace(runs), "choose another model or the parameter-free method")
    damages = measure_damage(original.eval(), candidates, calibration_batches(data, spec, batches, batch_size, seed))
    return least_harmful(damages, budget), damages


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


# ---------------------------------------------------------------- the stages


def convert(model: ModelLike, *, arch: str | None = None, num_classes: int | None = None, trust_pickle: bool = False,
            remap: RemapMode | None = None, remap_rules: str | os.PathLike | None = None,
            output: str | os.PathLike | None = None, plan_output: str | os.PathLike | None = None,
            input_size=None, mean=None, std=None, options: ConvertOptions | None = None,
            **overrides) -> Conversion:
    """Rewrite a model into the chosen form. The input model is never modified.

    ``output``: write the converted checkpoint; ``plan_output``: also write the plan as JSON.
    ``input_size`` / ``mean`` / ``std``: the model's preprocessing, recorded in the file (default: the
    architecture's), when it was trained with other values. ``remap`` / ``remap_rules`` map a foreign
    checkpoint's keys onto ``arch`` (see :func:`repconv.checkpoint.read_checkpoint`).

    ``options`` (or keyword overrides of its fields: ``method``, ``every``, ``units``, ``pf_policy``, ...; see
    :class:`ConvertOptions`) say what to change. ``select="measured"`` replaces the ``budget`` units whose
    replacement alone hurts the logits least on ``data`` (see :func:`measured_units`).
    """
    o = with_overrides(ConvertOptions, options, overrides)
    for target in (output, plan_output):
        if target is not None:
            check_output_path(target)  # before the work, not after it
    loaded = load_checkpoint(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, remap=remap,
                             remap_rules=remap_rules)
    if loaded.meta.kind == "converted":
        raise PlanError("the model is already converted", "convert the original checkpoint instead")
    original = loaded.model.eval()
    meta = loaded.meta.with_input(input_size, mean, std)
    plan = o.plan if isinstance(o.plan, Plan) or o.plan is None else Plan.load(o.plan)
    leaves = list(plan.leaves if plan is not None and plan.leaves else o.leaves)
    gm = trace(copy.deepcopy(original), leaves)  # first, so an untraceable model is reported as such
    if output is not None and loaded.meta.arch is None:  # before the work: saving would need it
        raise OptionError("arch", None, f"is needed to save the conversion of '{loaded.path or 'the model'}', a "
                          "pickled module whose architecture repconv cannot name", "give its name, e.g. resnet50")
    propagate_shapes(gm, example_input(meta.input_size, batch=1))
    if plan is not None:
        plan.leaves = leaves
        runs = find_runs(original, opaque=leaves)
    else:
        units = o.units
        if o.select == "measured":
            units, damages = measured_units(original, meta.input_size, data=o.data, budget=o.budget, leaves=leaves,
                                            batches=o.calib_batches, mean=meta.mean, std=meta.std)
            meta.extra["measured_damage"] = [asdict(d) for d in damages]
        plan, runs = plan_conversion(original, with_overrides(ConvertOptions, o, {"units": units, "leaves": leaves}),
                                     meta.arch)
    plan.arch = meta.arch
    apply_plan(gm, plan, model_for_init=original)
    gm.eval()
    meta.kind, meta.plan = "converted", plan
    shapes = module_output_shapes(gm, [m for r in runs for m in r.members[:1]])
    summary = summarize(original, gm, plan, arch=meta.arch, method=o.method, input_size=meta.input_size,
                        runs=runs, leaves=leaves, shapes=shapes)
    result = Conversion(gm, plan, meta, summary)
    if output is not None:
        result.save(output)
    if plan_output is not None:
        write_text_atomic(plan_output, plan.to_json())
    return result


def inspect(model: ModelLike, *, arch: str | None = None, num_classes: int | None = None, trust_pickle: bool = False,
            remap: RemapMode | None = None, remap_rules: str | os.PathLike | None = None,
            options: ConvertOptions | None = None, **overrides) -> ConversionSummary:
    """What ``convert`` with the same options would do, without writing anything.

    A model with nothing to replace is reported (``message``), not raised. The summary also lists the
    model's parameter-free targets and what each parameter-free policy would save.
    """
    o = with_overrides(ConvertOptions, options, overrides)
    loaded = load_checkpoint(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, remap=remap,
                             remap_rules=remap_rules)
    try:
        summary = convert(loaded, options=o).summary
    except NothingToReplace as exc:
        runs = find_runs(loaded.model, opaque=o.leaves)
        flops = count_flops(loaded.model, example_input(loaded.meta.input_size, batch=1))
        params = count_params(loaded.model)
        summary = ConversionSummary(loaded.meta.arch, o.method, params, params, count_params(loaded.model, True),
                                    flops, flops, flops // 2, flops // 2, [], [], runs=_runs_table(runs),
                                    opaque_modules=list(o.leaves), input_size=loaded.meta.input_size,
                                    message=str(exc))
    summary.parameter_free_targets, summary.parameter_free_policies = parameter_free_report(
        loaded.model, leaves=o.leaves, input_size=loaded.meta.input_size, op=o.pf_op)
    return summary


def check_round_trip(conversion: Conversion, path: str | os.PathLike) -> float:
    """Max abs difference between the in-memory converted model and the one re-loaded from ``path``."""
    x = example_input(conversion.meta.input_size, batch=2, seed=1)
    reloaded = load(path)
    with torch.no_grad():
        return float((conversion.model.eval()(x) - reloaded.eval()(x)).abs().max())


def parameter_free_report(model: nn.Module, *, leaves: Sequence[str] = (), input_size: Sequence[int] = (3, 224, 224),
                          op: PfOp = "max") -> tuple[list[dict], list[dict]]:
    """The model's parameter-free targets, and the params / MACs each policy would leave.

    Returns ``(targets, policies)``; both are empty when the model has no target.
    """
    targets = find_targets(model, leaves=leaves)
    if not targets:
        return [], []
    rows = [{"target": t.path, "kind": t.kind, "kernel": t.kernel, "stride": t.stride, "absorbed": t.absorbed,
             "params": t.params} for t in targets]
    x = example_input(input_size, batch=1)
    policies = []
    for policy in POLICIES:
        steps = _plan_parameter_free(model, policy=policy, op=op, leaves=leaves)
        by_target = {s.target: s for s in steps}
        for row in rows:
            row[policy] = describe_step(by_target.get(row["target"]))
        gm = apply_parameter_free(trace(copy.deepcopy(model), leaves), steps)
        flops = count_flops(gm, x)
        policies.append({"policy": policy, "steps": len(steps), "params_after": count_params(gm),
                         "flops_after": flops, "macs_after": flops // 2})
    return rows, policies


# ---------------------------------------------------------------- fold


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
            self.output = save(path, self.model, self.meta)
        return self.output

    def to_dict(self) -> dict:
        return {"arch": self.meta.arch, "folded_units": self.folded_units, "parity": self.parity.to_dict(),
                "original_architecture": self.original_architecture,
                "fusion": self.fusion.to_dict() if self.fusion else None, "warnings": self.warnings,
                "output": str(self.output) if self.output else None}


def as_loaded(model: ModelLike | Conversion, **load_options) -> Loaded:
    """A Conversion, path, module or Loaded as a Loaded."""
    if isinstance(model, Conversion):
        return Loaded(model.model, model.meta)
    return load_checkpoint(model, **load_options)


def fold(model: ModelLike | Conversion, *, output: str | os.PathLike | None = None, fuse_bn: bool = False,
         tolerance: float = FOLD_TOLERANCE, arch: str | None = None, num_classes: int | None = None,
         trust_pickle: bool = False, remap: RemapMode | None = None,
         remap_rules: str | os.PathLike | None = None) -> FoldResult:
    """Evaluate every replaced unit's ``a * P_prev + b * P_next`` once into ordinary weights.

    The folded model is checked against the converted one on a check batch (eval mode); a relative
    difference above ``tolerance`` raises VerificationError and nothing is written. An unconverted model
    comes out as a repconv file: with ``remap`` / ``remap_rules``, the way to bring a foreign checkpoint in.
    """
    if output is not None:
        check_output_path(output)
    loaded = as_loaded(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle, remap=remap,
                       remap_rules=remap_rules)
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
                            "load it from its repconv file, or give its architecture")
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
