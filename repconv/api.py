"""The public Python API: one function per pipeline stage (see docs/architecture.md).

Each function takes paths or modules and returns a dataclass; nothing here prints.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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
from repconv.export.tensorrt import EngineBuild, EngineOptions
from repconv.runtime.bench import BenchOptions, BenchReport, Target
from repconv.runtime.predict import PredictResult
from repconv.runtime.session import Session, artifact_backend, open_session

if TYPE_CHECKING:
    from repconv import demo as demo_module

__all__ = [
    "BenchOptions",
    "BenchReport",
    "CalibrationResult",
    "Conversion",
    "ConversionSummary",
    "EngineBuild",
    "EngineOptions",
    "EnginePlan",
    "ExportResult",
    "FinetuneResult",
    "FoldResult",
    "PredictResult",
    "ReportResult",
    "Session",
    "TrainResult",
    "bench",
    "build_engine",
    "calibrate",
    "convert",
    "demo",
    "engine_plan",
    "export",
    "finetune",
    "fold",
    "inspect",
    "load",
    "load_checkpoint",
    "measured_units",
    "open_session",
    "parameter_free_report",
    "predict",
    "report",
    "save",
    "summarize",
    "train",
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
            output: str | os.PathLike | None = None, select: str = "position", budget: int | None = None,
            data: str | os.PathLike | None = None, calib_batches: int = 4) -> Conversion:
    """Rewrite a model into the chosen form. The input model is never modified.

    ``select="measured"`` replaces the ``budget`` units whose replacement alone hurts the logits least on
    ``data`` (see :func:`measured_units`) instead of choosing by position (``every``).
    """
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
        if select not in ("position", "measured"):
            raise PlanError(f"unknown --select '{select}'", "use position or measured")
        if select == "measured":
            units, damages = measured_units(original, meta.input_size, data=data, budget=budget, leaves=leaves,
                                            batches=calib_batches, mean=meta.mean, std=meta.std)
            meta.extra["measured_damage"] = [asdict(d) for d in damages]
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


# ---------------------------------------------------------------- recover and train (issue 3)
# calibrate, finetune, train; measured unit selection for convert. The work lives in repconv.train.


def _data_spec(meta: CheckpointMeta, input_size, mean, std) -> tuple[tuple[int, ...], tuple, tuple]:
    """The preprocessing a model expects (its checkpoint metadata), with user overrides."""
    size = meta.input_size if input_size is None else (
        (3, input_size, input_size) if isinstance(input_size, int) else tuple(input_size))
    return tuple(size), tuple(mean or meta.mean), tuple(std or meta.std)


def _datasets(data, val_data, spec, labeled: bool):
    """(train set, validation set or None): ``val_data`` wins, else the data's own ``val`` split."""
    from repconv.train.data import has_split, make_dataset

    train_set = make_dataset(data, "train", *spec, labeled=labeled)
    if val_data is not None:
        val_set = make_dataset(val_data, "val" if has_split(val_data, "val") else "train", *spec, labeled=True)
    elif has_split(data, "val"):
        val_set = make_dataset(data, "val", *spec, labeled=True)
    else:
        val_set = None
    return train_set, val_set


def _num_outputs(model: nn.Module, input_size) -> int:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        n = int(model(example_input(input_size, batch=1)).shape[-1])
    model.train(was_training)
    return n


def _check_classes(datasets, model: nn.Module, input_size) -> None:
    from repconv.errors import DataError

    n = _num_outputs(model, input_size)
    for ds in datasets:
        classes = getattr(ds, "classes", None)
        if ds is not None and classes and len(classes) != n:
            raise DataError(f"the data has {len(classes)} classes ({', '.join(classes[:5])}"
                            f"{', ...' if len(classes) > 5 else ''}) but the model's classifier has {n} outputs",
                            "give data with the model's classes, or use --objective distill (labels unused)")


def _calibration_batches(data, spec, batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    from repconv.train.data import make_dataset

    ds = make_dataset(data, "train", *spec, labeled=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    return [x for _, (x, _) in zip(range(batches), loader, strict=False)]


def _load_teacher(teacher: ModelLike | None, trust_pickle: bool, why: str) -> Loaded:
    from repconv.errors import InputFileError

    if teacher is None:
        raise InputFileError(f"{why} needs the original model", "pass --teacher ORIGINAL_CHECKPOINT")
    loaded = load_checkpoint(teacher, trust_pickle=trust_pickle)
    if loaded.meta.kind == "converted":
        raise InputFileError("--teacher is a converted model", "give the original checkpoint it was converted from")
    return loaded


def _val_accuracy(model: nn.Module, val_set) -> float | None:
    from repconv.train.loop import evaluate

    return None if val_set is None else evaluate(model, val_set)


def measured_units(original: nn.Module, input_size, *, data, budget: int | None = None, leaves: Sequence[str] = (),
                   batches: int = 4, batch_size: int = 32, mean=None, std=None, seed: int = 0):
    """Rank every replaceable unit by the KL its replacement alone (scalars fitted) does to the logits on
    calibration data; return (the least harmful non-touching units up to ``budget``, all damages)."""
    from repconv.train.calibrate import candidate_steps, least_harmful, measure_damage

    if data is None:
        raise PlanError("--select measured needs calibration data", "pass --data DIR (or --data digits)")
    if budget is not None and budget < 1:
        raise PlanError(f"--budget {budget} replaces nothing", "give at least 1 unit")
    spec = _data_spec(CheckpointMeta(input_size=tuple(input_size)), None, mean, std)
    candidates = candidate_steps(find_runs(original, opaque=leaves))
    if not candidates:
        raise NothingToReplace(_nothing_to_replace(find_runs(original, opaque=leaves)),
                               "choose another model or --method parameter-free")
    damages = measure_damage(original.eval(), candidates, _calibration_batches(data, spec, batches, batch_size, seed))
    return least_harmful(damages, budget), damages


@dataclass
class CalibrationResult:
    units: list[dict]  # per unit: a, b before and after
    kl_before: float  # KL(teacher || model) on the calibration batches
    kl_after: float
    val_acc: float | None
    val_acc_before: float | None
    teacher_val_acc: float | None
    batches: int
    images: int
    selected: list[str] | None = None  # --select measured: the units kept
    damage: list[dict] | None = None
    output: Path | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(model: ModelLike, *, teacher: ModelLike | None, data: str | os.PathLike,
              output: str | os.PathLike | None = None, val_data: str | os.PathLike | None = None,
              batches: int = 4, batch_size: int = 32, select: str = "all", budget: int | None = None,
              max_iter: int = 20, input_size=None, mean=None, std=None, seed: int = 0,
              trust_pickle: bool = False) -> CalibrationResult:
    """Fit each replaced unit's (a, b) to the teacher unit's outputs on a few batches (function space).

    ``select="measured"`` keeps only the ``budget`` least harmful of the model's replaced units (ranked by
    KL to the teacher's logits); the others get their original weights back (rebuilt from the teacher).
    """
    from repconv.train.calibrate import calibrate_units

    loaded = load_checkpoint(model, trust_pickle=trust_pickle)
    if not replaced_units(loaded.model):
        raise NothingToReplace(f"'{loaded.path or 'the model'}' has no replaced unit, so there is nothing to calibrate",
                               "convert with --method replacement (or both) first")
    if select not in ("all", "measured"):
        raise PlanError(f"unknown --select '{select}'", "use all or measured")
    t = _load_teacher(teacher, trust_pickle, "calibrate")
    spec = _data_spec(loaded.meta, input_size, mean, std)
    _, val_set = _datasets(data, val_data, spec, labeled=False)
    _check_classes([val_set], loaded.model, spec[0])
    calib = _calibration_batches(data, spec, batches, batch_size, seed)
    selected = damage = None
    if select == "measured":
        from repconv.train.calibrate import least_harmful, measure_damage

        damages = measure_damage(t.model, loaded.meta.plan.replace_steps, calib)
        selected = least_harmful(damages, budget)
        plan = Plan([s for s in loaded.meta.plan.steps if getattr(s, "unit", None) in (None, *selected)],
                    loaded.meta.plan.arch, list(loaded.meta.plan.leaves))
        loaded = Loaded(convert(t, plan=plan).model, copy.deepcopy(loaded.meta), loaded.path)
        loaded.meta.plan = plan
        damage = [asdict(d) for d in damages]
    student = loaded.model.eval()
    before = _val_accuracy(student, val_set)
    cal = calibrate_units(student, t.model, calib, max_iter)
    for s in loaded.meta.plan.replace_steps:  # the plan records the calibrated scalars too
        fit = next((f for f in cal.units if f.unit == s.unit), None)
        if fit:
            s.a, s.b, s.init = fit.a, fit.b, "fixed"
    result = CalibrationResult([asdict(f) for f in cal.units], cal.kl_before, cal.kl_after,
                               _val_accuracy(student, val_set), before,
                               _val_accuracy(t.model, val_set), len(calib), sum(len(x) for x in calib),
                               selected, damage)
    if output is not None:
        loaded.meta.extra["calibration"] = {"batches": result.batches, "images": result.images}
        result.output = _save(output, student, loaded.meta)
    return result


@dataclass(kw_only=True)
class FitOutcome:
    """What a training run (``finetune``, ``train``) reports, whichever it was."""

    epochs: int
    trainable_params: int
    val_acc: float | None
    train_loss: float | None
    history: list[dict]
    resumed_from_epoch: int | None
    world_size: int
    ranks_in_sync: bool | None
    rank: int = 0
    output: Path | None = None
    state_file: Path | None = None
    metrics_file: Path | None = None

    @staticmethod
    def fields_of(res, output: Path | None, state: Path | None, metrics: Path | None) -> dict:
        """The shared fields from the loop's FitResult and the files it wrote."""
        from repconv.train.loop import dist_env

        return {"epochs": res.epochs, "trainable_params": res.trainable_params, "val_acc": res.val_acc,
                "train_loss": res.train_loss, "history": res.history, "resumed_from_epoch": res.resumed_from_epoch,
                "world_size": res.world_size, "ranks_in_sync": res.ranks_in_sync, "rank": dist_env()[0],
                "output": output, "state_file": state, "metrics_file": metrics}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class FinetuneResult(FitOutcome):
    objective: str
    train: str
    total_params: int
    amp: str
    device: str


def _train_config(**kw):
    from repconv.train.loop import TrainConfig

    cfg = TrainConfig(**kw)
    cfg.check()
    return cfg


def _fit(model: nn.Module, meta: CheckpointMeta, cfg, *, train_set, val_set, teacher, output, resume, progress,
         to_save=None):
    """Run the loop; after each epoch (rank 0) save ``to_save(model)`` (default: the model) with ``meta``."""
    from repconv.errors import OutputError
    from repconv.train.loop import fit, metrics_path_for, state_path_for

    folder = Path(output).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write '{output}': folder '{folder}' does not exist or is not writable",
                          "create it or choose another output path")
    def save_model(m: nn.Module, metrics: dict) -> None:
        meta.extra["training"] = {k: metrics.get(k) for k in ("epoch", "train_loss", "val_acc")}
        _save(output, to_save(m) if to_save else m, meta)

    res = fit(model, train_set, cfg, val_set=val_set, teacher=teacher, save_model=save_model, output=output,
              resume=resume, progress=progress)
    return res, Path(output), state_path_for(output), metrics_path_for(output)


def finetune(model: ModelLike, *, data: str | os.PathLike, output: str | os.PathLike,
             teacher: ModelLike | None = None, objective: str = "ce", train: str = "scalars",
             val_data: str | os.PathLike | None = None, epochs: int = 3, batch_size: int = 64, lr: float = 1e-3,
             optimizer: str = "adamw", weight_decay: float = 1e-4, momentum: float = 0.9,
             warmup_epochs: float = 0.0, accum_steps: int = 1, temperature: float = 2.0, alpha: float = 0.5,
             amp: str = "auto", seed: int = 0, workers: int = 0, batches_per_epoch: int | None = None,
             input_size=None, mean=None, std=None, resume: bool = False, progress: bool = False,
             trust_pickle: bool = False) -> FinetuneResult:
    """Recover a converted (or any) model: labels (ce), distillation from ``teacher`` (distill) or both.

    Writes ``output`` after every epoch, plus ``OUTPUT.state.pt`` (resume) and ``OUTPUT.metrics.jsonl``.
    Under ``torchrun`` every process calls this; only rank 0 writes.
    """

    cfg = _train_config(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
                        weight_decay=weight_decay, warmup_epochs=warmup_epochs, accum_steps=accum_steps,
                        objective=objective, temperature=temperature, alpha=alpha, trainable=train, amp=amp,
                        seed=seed, workers=workers, batches_per_epoch=batches_per_epoch)
    loaded = load_checkpoint(model, trust_pickle=trust_pickle)
    t = _load_teacher(teacher, trust_pickle, f"--objective {objective}") if objective != "ce" else None
    spec = _data_spec(loaded.meta, input_size, mean, std)
    labeled = objective != "distill" or str(data) == "digits"
    train_set, val_set = _datasets(data, val_data, spec, labeled=labeled)
    _check_classes([train_set if labeled else None, val_set], loaded.model, spec[0])
    student = loaded.model
    if t is not None and _num_outputs(t.model, spec[0]) != _num_outputs(student, spec[0]):
        from repconv.errors import ArchError

        raise ArchError("the teacher's classifier and the model's have different output counts",
                        "give the original checkpoint the model was converted from")
    meta = copy.deepcopy(loaded.meta)
    res, out, state, metrics = _fit(student, meta, cfg, train_set=train_set, val_set=val_set,
                                    teacher=t.model if t else None, output=output, resume=resume, progress=progress)
    return FinetuneResult(objective=objective, train=train, total_params=count_params(student), amp=res.amp,
                          device=res.device, **FitOutcome.fields_of(res, out, state, metrics))


@dataclass(kw_only=True)
class TrainResult(FitOutcome):
    arch: str
    kind: str  # what the output file holds: "model" (replaced units folded back) or "converted"
    replaced_units: list[str]
    params: int


def folded_replacement(model: nn.Module, meta: CheckpointMeta) -> nn.Module:
    """A replacement-only converted model as its original architecture (see :func:`fold`)."""
    return fold(Loaded(model, meta)).model


def train(arch: str, *, data: str | os.PathLike, output: str | os.PathLike, replace: bool = True,
          replace_every: int = 2, val_data: str | os.PathLike | None = None, epochs: int = 30,
          batch_size: int = 64, lr: float = 0.1, optimizer: str = "sgd", weight_decay: float = 5e-4,
          momentum: float = 0.9, warmup_epochs: float = 1.0, accum_steps: int = 1, label_smoothing: float = 0.0,
          amp: str = "auto", seed: int = 0, workers: int = 0, batches_per_epoch: int | None = None,
          input_size=None, mean=None, std=None, resume: bool = False, progress: bool = False) -> TrainResult:
    """Train ``arch`` from scratch with labels; with ``replace``, every ``replace_every``-th interior unit of
    each run is a replaced unit (scalars initialised 0.5/0.5, neighbour gradients detached: the papers'
    setting). The output is an ordinary model file (replaced units folded), which ``convert`` and
    ``--teacher`` accept."""
    from repconv.errors import DataError
    from repconv.models import resolve_arch

    cfg = _train_config(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
                        weight_decay=weight_decay, warmup_epochs=warmup_epochs, accum_steps=accum_steps,
                        objective="ce", trainable="all", amp=amp, seed=seed, workers=workers,
                        batches_per_epoch=batches_per_epoch, label_smoothing=label_smoothing)
    arch_spec = resolve_arch(arch)
    spec = _data_spec(CheckpointMeta(input_size=arch_spec.input_size, mean=arch_spec.mean, std=arch_spec.std),
                      input_size, mean, std)
    train_set, val_set = _datasets(data, val_data, spec, labeled=True)
    classes = list(train_set.classes)
    if len(classes) < 2:
        raise DataError(f"'{data}' has {len(classes)} class", "training a classifier needs at least 2 classes")
    torch.manual_seed(seed)
    meta = CheckpointMeta.for_arch(arch_spec, {"num_classes": len(classes)})
    meta.input_size, meta.mean, meta.std, meta.class_names = *spec, classes
    model = arch_spec.build(num_classes=len(classes))
    _check_classes([val_set], model, spec[0])
    to_save, units = None, []
    if replace:
        conv = convert(Loaded(model, meta), every=replace_every, init="half")
        model, units = conv.model, conv.summary.replaced_units
        meta.extra["replacement_learning"] = {"plan": conv.plan.to_dict()}
        to_save = lambda m: folded_replacement(m, meta)  # noqa: E731
    res, out, state, metrics = _fit(model, meta, cfg, train_set=train_set, val_set=val_set, teacher=None,
                                    output=output, resume=resume, progress=progress, to_save=to_save)
    return TrainResult(arch=arch_spec.name, kind="model", replaced_units=units, params=count_params(model),
                       **FitOutcome.fields_of(res, out, state, metrics))
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
# ---------------------------------------------------------------- runtime (issue 4 parts 4-5, issue 5 part 1)
# TensorRT engines, the Session interface, predict, bench.



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


def build_engine(source: str | os.PathLike, output: str | os.PathLike, options: EngineOptions | None = None, *,
                 dtype: str = "fp32", arch: str | None = None, num_classes: int | None = None,
                 trust_pickle: bool = False, **export_options) -> EngineBuild:
    """Build a TensorRT engine (+ JSON sidecar) and verify it against ONNX Runtime.

    ``source`` is an ONNX file, or a checkpoint that is first exported (``export``, with ``dtype`` and
    ``export_options``) to ``output`` with the suffix ``.onnx``. Needs TensorRT and an NVIDIA GPU; without
    them a DependencyError says how to get them, before anything is written.
    """
    from repconv.export.tensorrt import build_engine as _build
    from repconv.runtime.tensorrt import require_tensorrt

    require_tensorrt("building a TensorRT engine")
    if artifact_backend(source) != "ort":
        onnx_path = Path(output).with_suffix(".onnx")
        export(source, onnx_path, dtype=dtype, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle,
               **export_options)
        source = onnx_path
    return _build(source, output, options)


def bench(artifacts: Sequence[str | os.PathLike], *, batches: Sequence[int] = (1, 8, 32), size: int | None = None,
          backends: Sequence[str] | None = None, device: str | None = None, warmup: int = 3, repeats: int = 20,
          max_seconds: float = 10.0, threads: int | None = None, channels_last: bool = False,
          arch: str | None = None, num_classes: int | None = None, trust_pickle: bool = False,
          json_out: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
          progress=None) -> BenchReport:
    """Measure artifacts side by side in this process; the first one is the baseline of every ratio.

    Each artifact runs on every backend in ``backends`` that can run it, by default on its own: a checkpoint on
    torch, and on ort / trt through a temporary export (``export``, then ``build_engine``); an ONNX file on
    ort, and on trt through a temporary engine; an engine on trt. ``json_out`` / ``plot`` are written at the
    end (their folders are checked first). ``channels_last`` runs the torch targets in that memory format.
    """
    import json

    from repconv.checkpoint import check_output_path, write_text_atomic
    from repconv.errors import OptionError
    from repconv.runtime.bench import plot_report
    from repconv.runtime.session import BACKENDS

    options = BenchOptions(tuple(batches), size, warmup, repeats, max_seconds, device, threads, channels_last)
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
            chosen = [b for b in (backends or [natural]) if b == natural or (natural, b) in _DERIVED]
            if "trt" in chosen:  # refuse now, not after measuring the artifacts before this one
                require_tensorrt(f"benchmarking '{path.name}' with TensorRT")
            if not chosen:
                raise OptionError(f"'{path}' is a TensorRT engine, which --backend {','.join(backends)} leaves out",
                                  "add trt to --backend")
            for b in chosen:
                run_path, label = path, path.name
                if natural == "torch" and b != "torch":  # export it, as `repconv export` would
                    run_path, label = Path(scratch) / f"{path.stem}.onnx", f"{path.name} -> onnx"
                    if not run_path.exists():
                        export(path, run_path, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
                if b == "trt" and natural != "trt":
                    run_path = build_engine(run_path, Path(scratch) / f"{path.stem}.engine").engine
                    label = f"{path.name} -> engine"
                targets.append(Target(label, run_path, b, _opener(run_path, b, device, arch, num_classes,
                                                                  trust_pickle, threads, options.channels_last)))
        return run_bench(targets, options, progress)


_DERIVED = {("torch", "ort"), ("torch", "trt"), ("ort", "trt")}  # (artifact's backend, backend it can run on)


def _opener(path: Path, backend: str, device, arch, num_classes, trust_pickle, threads, channels_last):
    return lambda: open_session(path, backend if backend != "torch" else None, device, arch=arch,
                                num_classes=num_classes, trust_pickle=trust_pickle, threads=threads,
                                channels_last=channels_last and backend == "torch")


# ---------------------------------------------------------------- see it (issue 5): demo, report


@dataclass
class ReportResult:
    path: Path
    run_dir: Path
    summary: dict

    def to_dict(self) -> dict:
        return {"report": str(self.path), "run_dir": str(self.run_dir), **self.summary}


def report(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> ReportResult:
    """Render ``RUN_DIR/run.json`` as one self-contained HTML page (default ``RUN_DIR/report.html``)."""
    from repconv.report import read_run, summarize_run, write_report

    summary = summarize_run(read_run(run_dir))
    return ReportResult(write_report(run_dir, output), Path(run_dir), summary)


def demo(out: str | os.PathLike = "repconv-demo", *, quick: bool = False, progress: bool = True,
         say=None) -> demo_module.DemoResult:
    """The whole pipeline offline on the bundled digits data; artifacts, run.json and report.html in ``out``."""
    from repconv.demo import run_demo

    return run_demo(out, quick=quick, progress=progress, say=say)
