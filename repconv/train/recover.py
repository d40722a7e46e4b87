"""The calibrate, finetune and train stages: recovering a converted model, and the papers' from-scratch setting.

The work lives beside this module: :mod:`repconv.train.calibrate` fits the scalars, :mod:`repconv.train.loop`
is the one training loop (``TrainConfig`` is passed through as is), :mod:`repconv.train.data` reads the data.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from repconv.checkpoint import CheckpointMeta, Loaded, ModelLike, load_checkpoint, save
from repconv.conversion import ConvertOptions, convert, fold
from repconv.convert.graph import count_params
from repconv.convert.measure import least_harmful, measure_damage
from repconv.convert.plan import Plan
from repconv.convert.replacement import replaced_units
from repconv.data import calibration_batches
from repconv.errors import (
    ArchError,
    DataError,
    InputFileError,
    NothingToReplace,
    OptionError,
    OutputError,
    PlanError,
)
from repconv.models import resolve_arch
from repconv.options import BnStats, CalibrateSelect, check_choices, with_overrides
from repconv.train.calibrate import Calibration, calibrate_units, refit_layers
from repconv.train.data import check_classes, data_spec, datasets, num_outputs
from repconv.train.local import LocalOptions, local_distill
from repconv.train.loop import (
    TrainConfig,
    dist_env,
    evaluate,
    fit,
    metrics_path_for,
    resolve_trainable,
    state_path_for,
)
from repconv.train.refit import has_pools

__all__ = [
    "FINETUNE_DEFAULTS",
    "TRAIN_DEFAULTS",
    "CalibrateOptions",
    "CalibrationResult",
    "FinetuneResult",
    "FitOutcome",
    "TrainConfig",
    "TrainResult",
    "calibrate",
    "finetune",
    "train",
]

# What `finetune` and `train` start from (keyword arguments override single fields)
# BatchNorm statistics and which weights are written, chosen by measurement (benchmarks/bn_stats_recovery.py,
# docs/results.md 2.6): recovering a pretrained model freezes the statistics and never writes a model worse
# than its input; training from scratch updates them and writes the last epoch (the papers' protocol).
FINETUNE_DEFAULTS = TrainConfig(epochs=3, batch_size=64, lr=1e-3, optimizer="adamw", weight_decay=1e-4,
                                warmup_epochs=0.0, objective="ce", trainable="auto", bn_stats="auto",
                                keep="best")
TRAIN_DEFAULTS = TrainConfig(epochs=30, batch_size=64, lr=0.1, optimizer="sgd", weight_decay=5e-4,
                             warmup_epochs=1.0, objective="ce", trainable="all", bn_stats="update", keep="last")


def _load_teacher(teacher: ModelLike | None, why: str, trust_pickle: bool, arch: str | None,
                  student: CheckpointMeta) -> Loaded:
    """The original model. A file holding only weights is built as ``arch`` or, without one, as the
    architecture the student was converted from (its metadata names it)."""
    if teacher is None:
        raise OptionError("teacher", None, f"is needed: {why} compares with the original model",
                          "give the original checkpoint")
    loaded = load_checkpoint(teacher, arch=arch or student.arch, trust_pickle=trust_pickle)
    if loaded.meta.kind == "converted":
        raise InputFileError("the teacher is a converted model", "give the original checkpoint it was converted from")
    return loaded


def timed(progress: Callable[[str], None] | None) -> Callable[[str], None]:
    """``progress`` with the seconds since the stage began in front of each message (a no-op without one)."""
    start = time.monotonic()
    return (lambda text: progress(f"[{time.monotonic() - start:6.1f}s] {text}")) if progress else (lambda _: None)


def _labels_fit(val_set, model: nn.Module, spec, notes: list[str]):
    """``val_set`` when its classes are the model's; else None, and a note (accuracy cannot be measured)."""
    try:
        check_classes([val_set], model, spec[0])
    except DataError as exc:
        notes.append(f"validation accuracy not measured: {exc.message}")
        return None
    return val_set


def _val_accuracy(model: nn.Module, val_set) -> float | None:
    return None if val_set is None else evaluate(model, val_set)


# ---------------------------------------------------------------- calibrate


@dataclass
class CalibrateOptions:
    """How ``calibrate`` fits the scalars (shared by the API and ``repconv calibrate``)."""

    batches: int = 4  # calibration batches
    batch_size: int = 32
    select: CalibrateSelect = "all"  # all: fit every replaced unit | measured: keep the budget least harmful
    budget: int | None = None
    max_iter: int = 20  # L-BFGS iterations
    seed: int = 0
    bn_stats: BnStats = "recalibrate"  # the replaced units' BatchNorm statistics (measured best; freeze keeps them)
    heldout_batches: int = 4  # batches (not fitted on) to measure agreement with the teacher on; 0: none

    def __post_init__(self) -> None:
        check_choices(self)
        if self.heldout_batches < 0:
            raise OptionError("heldout_batches", self.heldout_batches, "must not be negative", "give 0 or more")
        for name in ("batches", "batch_size", "max_iter"):
            if getattr(self, name) < 1:
                raise OptionError(name, getattr(self, name), "must be at least 1", "give a positive integer")
        if self.budget is not None and self.budget < 1:
            raise OptionError("budget", self.budget, "keeps no unit", "give at least 1")


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
    selected: list[str] | None = None  # select="measured": the units kept
    damage: list[dict] | None = None
    notes: list[str] = field(default_factory=list)
    bn_stats: str = "recalibrate"
    agreement_before: float | None = None  # top-1 agreement with the teacher on the calibration batches
    agreement_after: float | None = None
    heldout_agreement_before: float | None = None  # ... on held-out batches (or the validation images)
    heldout_agreement_after: float | None = None
    heldout_images: int = 0
    kept_input: bool = False  # the fit did not lower the KL: the model was left as it came
    refit: dict | None = None  # parameter-free steps: the least-squares refit of the layers after each pool
    output: Path | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(model: ModelLike, *, teacher: ModelLike | None, data: str | os.PathLike,
              output: str | os.PathLike | None = None, val_data: str | os.PathLike | None = None,
              teacher_arch: str | None = None,
              input_size=None, mean=None, std=None, trust_pickle: bool = False,
              progress: Callable[[str], None] | None = None, options: CalibrateOptions | None = None,
              **overrides) -> CalibrationResult:
    """Fit each replaced unit's (a, b) to the teacher unit's outputs on a few batches (function space), and
    refit by least squares the layer that reads each parameter-free pool (:mod:`repconv.train.refit`).

    ``options`` (or keyword overrides: ``batches``, ``batch_size``, ``select``, ``budget``, ``max_iter``,
    ``seed``). ``select="measured"`` keeps only the ``budget`` least harmful of the model's replaced units
    (ranked by KL to the teacher's logits); the others get their original weights back. ``progress(text)``
    hears of each phase.
    """
    o = with_overrides(CalibrateOptions, options, overrides)
    say = timed(progress)
    loaded = load_checkpoint(model, trust_pickle=trust_pickle)
    replaced = bool(replaced_units(loaded.model))
    pools = has_pools(loaded.meta.plan)
    if not replaced and not pools:
        raise NothingToReplace(f"'{loaded.path or 'the model'}' has no replaced unit and no parameter-free pool, so "
                               "there is nothing to calibrate", "convert it first")
    if o.select == "measured" and not replaced:
        raise OptionError("select", o.select, "chooses among replaced units, and this model has none",
                          "leave select at all")
    t = _load_teacher(teacher, "calibrate", trust_pickle, teacher_arch, loaded.meta)
    spec = data_spec(loaded.meta, input_size, mean, std)
    notes: list[str] = []
    _, val_set = datasets(data, val_data, spec, labeled=False)
    val_set = _labels_fit(val_set, loaded.model, spec, notes)  # labels are only for reporting here
    say(f"reading {o.batches} calibration batches of {o.batch_size} from {data}")
    batches = calibration_batches(data, spec, o.batches + o.heldout_batches, o.batch_size, o.seed)
    calib, heldout = batches[:o.batches], batches[o.batches:]
    if val_data is not None and val_set is not None:  # the user's validation images are the held-out set
        heldout = [x for x, _ in torch.utils.data.DataLoader(val_set, batch_size=o.batch_size)]
    if o.heldout_batches and not heldout:
        notes.append(f"no images left for held-out agreement after {len(calib)} calibration batches")
    selected = damage = None
    if o.select == "measured":
        say(f"measuring the damage of each of {len(loaded.meta.plan.replace_steps)} replaced units")
        damages = measure_damage(t.model, loaded.meta.plan.replace_steps, calib)
        selected = least_harmful(damages, o.budget)
        plan = Plan([s for s in loaded.meta.plan.steps if getattr(s, "unit", None) in (None, *selected)],
                    loaded.meta.plan.arch, list(loaded.meta.plan.leaves))
        loaded = Loaded(convert(t, options=ConvertOptions(plan=plan)).model, copy.deepcopy(loaded.meta), loaded.path)
        loaded.meta.plan = plan
        damage = [asdict(d) for d in damages]
    student = loaded.model.eval()
    if val_set is not None:
        say(f"validating the model as it came in ({len(val_set)} images)")
    before = _val_accuracy(student, val_set)
    stages: list[Calibration] = []
    if pools:
        say(f"refitting the layers after {len(loaded.meta.plan.parameter_free_steps)} parameter-free steps "
            "(least squares)")
        stages.append(refit_layers(student, t.model, calib, heldout=heldout or None))
    if replaced:
        say(f"fitting {2 * len(replaced_units(student))} scalars (L-BFGS, up to {o.max_iter} iterations)")
        stages.append(calibrate_units(student, t.model, calib, o.max_iter, bn_stats=o.bn_stats,
                                      heldout=heldout or None))
    first, cal = stages[0], stages[-1]
    if val_set is not None:
        say("validating the calibrated model and the teacher")
    for s in loaded.meta.plan.replace_steps:  # the plan records the calibrated scalars too
        fit_ = next((f for f in cal.units if f.unit == s.unit), None)
        if fit_:
            s.a, s.b, s.init = fit_.a, fit_.b, "fixed"
    result = CalibrationResult([asdict(f) for f in cal.units], first.kl_before, cal.kl_after,
                               _val_accuracy(student, val_set), before, _val_accuracy(t.model, val_set),
                               len(calib), sum(len(x) for x in calib), selected, damage, notes, cal.bn_stats,
                               first.agreement_before, cal.agreement_after, first.heldout_agreement_before,
                               cal.heldout_agreement_after, cal.heldout_images, all(c.kept_input for c in stages),
                               first.refit)
    if output is not None:
        loaded.meta.extra["calibration"] = {k: getattr(result, k) for k in (
            "batches", "images", "bn_stats", "agreement_before", "agreement_after", "heldout_agreement_before",
            "heldout_agreement_after", "heldout_images", "kept_input")} | (
            {"refit": {k: result.refit[k] for k in ("mean_error_before", "mean_error_after", "skipped")}}
            if result.refit else {})
        result.output = save(output, student, loaded.meta)
    return result


# ---------------------------------------------------------------- finetune and train


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
    bn_stats: str
    keep: str
    select_metric: str | None  # what chose the weights written: val_acc (labels) or agreement (with the teacher)
    written: str  # "input" | "best epoch N" | "last"
    best_epoch: int | None
    warning: str | None  # set when recovery ended worse than its input (the input was written)
    agreement: float | None  # of the weights written, with the teacher
    input_metrics: dict | None
    val_source: str | None  # "val" | "holdout" | None
    holdout_images: int
    recalibrated_images: int
    notes: list[str] = field(default_factory=list)
    ranks_in_sync: bool | None
    rank: int = 0
    output: Path | None = None
    state_file: Path | None = None
    metrics_file: Path | None = None

    @staticmethod
    def fields_of(res, output: Path) -> dict:
        """The shared fields from the loop's FitResult and the files it wrote."""
        shared = ("epochs", "trainable_params", "val_acc", "train_loss", "history", "resumed_from_epoch", "world_size",
                  "ranks_in_sync", "bn_stats", "keep", "select_metric", "written", "best_epoch", "warning",
                  "agreement", "input_metrics", "val_source", "holdout_images", "recalibrated_images")
        return {**{k: getattr(res, k) for k in shared}, "rank": dist_env()[0], "output": Path(output),
                "state_file": state_path_for(output), "metrics_file": metrics_path_for(output)}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class FinetuneResult(FitOutcome):
    objective: str
    train: str
    total_params: int
    amp: str
    device: str
    local: dict | None = None  # train.local.LocalResult of the block-wise stage (None: not run)


@dataclass(kw_only=True)
class TrainResult(FitOutcome):
    arch: str
    kind: str  # what the output file holds: "model" (replaced units folded back) or "converted"
    replaced_units: list[str]
    params: int


def _config(defaults: TrainConfig, config: TrainConfig | None, overrides: dict) -> TrainConfig:
    if "train" in overrides:  # the API's and CLI's name for TrainConfig.trainable
        overrides["trainable"] = overrides.pop("train")
    return with_overrides(TrainConfig, config or defaults, overrides)


def _fit(model: nn.Module, meta: CheckpointMeta, cfg: TrainConfig, *, train_set, val_set, teacher, output, resume,
         progress, to_save=None):
    """Run the loop; after each epoch (rank 0) save ``to_save(model)`` (default: the model) with ``meta``."""
    folder = Path(output).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OutputError(f"cannot write '{output}': folder '{folder}' does not exist or is not writable",
                          "create it or choose another output path")

    def save_model(m: nn.Module, metrics: dict) -> None:
        meta.extra["training"] = {k: metrics.get(k) for k in ("epoch", "train_loss", "val_acc", "agreement",
                                                              "written")}
        meta.extra["recovery"] = metrics.get("recovery")  # bn_stats, keep, what was written and why
        save(output, to_save(m) if to_save else m, meta)

    return fit(model, train_set, cfg, val_set=val_set, teacher=teacher, save_model=save_model, output=output,
               resume=resume, progress=progress)


def _resolve_bn_stats(cfg: TrainConfig, meta: CheckpointMeta) -> TrainConfig:
    """``auto``: keep the pretrained statistics (freeze), except where a parameter-free step changed what the
    norms after it see (pools in place of convs): those statistics must be learned again (update). Measured:
    docs/results.md 2.6 (freeze on replacement models) and tests/train/test_recovery.py (a pf-hybrid model
    fine-tuned with frozen statistics ends at 43%, with updated ones at 96%)."""
    if cfg.bn_stats != "auto":
        return cfg
    parameter_free = meta.plan is not None and bool(meta.plan.parameter_free_steps)
    return dataclasses.replace(cfg, bn_stats="update" if parameter_free else "freeze")


def finetune(model: ModelLike, *, data: str | os.PathLike, output: str | os.PathLike,
             teacher: ModelLike | None = None, teacher_arch: str | None = None,
             val_data: str | os.PathLike | None = None,
             input_size=None, mean=None, std=None, resume: bool = False, progress: bool = False,
             trust_pickle: bool = False, config: TrainConfig | None = None, local: LocalOptions | None = None,
             **overrides) -> FinetuneResult:
    """Recover a converted (or any) model: labels (ce), distillation from ``teacher`` (distill) or both.

    ``config`` (default :data:`FINETUNE_DEFAULTS`) or keyword overrides of its fields (``objective``,
    ``train``, ``epochs``, ``lr``, ...; see :class:`~repconv.train.loop.TrainConfig`). ``local`` with
    ``epochs`` > 0 runs block-wise distillation from ``teacher`` first (:func:`repconv.train.local.local_distill`:
    each converted unit learns the original unit's output; measured to lose to the same epochs of logits
    distillation, docs/results.md 2.7f, so it is off by default). Writes ``output`` after every epoch, plus
    ``OUTPUT.state.pt`` (resume: a run resumed past the local stage does not repeat it) and
    ``OUTPUT.metrics.jsonl``. Under ``torchrun`` every process calls this; only rank 0 writes.
    """
    cfg = _config(FINETUNE_DEFAULTS, config, overrides)
    local = local or LocalOptions(epochs=0)
    loaded = load_checkpoint(model, trust_pickle=trust_pickle)
    if local.epochs:  # 0: no local stage; checked before any data is read
        local.check()
        if not (loaded.meta.plan and loaded.meta.plan.steps):
            raise PlanError("local distillation trains the converted units, and this model has none",
                            "convert it first, or leave the local epochs at 0")
    cfg = dataclasses.replace(_resolve_bn_stats(cfg, loaded.meta),
                              trainable=resolve_trainable(cfg.trainable, loaded.model))  # reported as resolved
    needs = f"the {cfg.objective} objective" if cfg.objective != "ce" else "local distillation"
    t = _load_teacher(teacher, needs, trust_pickle, teacher_arch, loaded.meta) \
        if cfg.objective != "ce" or local.epochs else None
    spec = data_spec(loaded.meta, input_size, mean, std)
    labeled = cfg.objective != "distill" or str(data) == "digits"
    train_set, val_set = datasets(data, val_data, spec, labeled=labeled)
    notes: list[str] = []
    if labeled:  # the loss needs the labels: they must be the model's classes
        check_classes([train_set, val_set], loaded.model, spec[0])
    else:
        val_set = _labels_fit(val_set, loaded.model, spec, notes)
    student = loaded.model
    if t is not None and num_outputs(t.model, spec[0]) != num_outputs(student, spec[0]):
        raise ArchError("the teacher's classifier and the model's have different output counts",
                        "give the original checkpoint the model was converted from")
    local_res = None
    if local.epochs and not (resume and state_path_for(output).exists()):  # resumed past it: the state holds it
        local_res = local_distill(student, t.model, train_set, plan=loaded.meta.plan,
                                  options=local, progress=progress).to_dict()
    res = _fit(student, copy.deepcopy(loaded.meta), cfg, train_set=train_set, val_set=val_set,
               teacher=t.model if cfg.objective != "ce" else None, output=output, resume=resume, progress=progress)
    return FinetuneResult(objective=cfg.objective, train=cfg.trainable, total_params=count_params(student),
                          amp=res.amp, device=res.device, **FitOutcome.fields_of(res, output), notes=notes,
                          local=local_res)


def train(arch: str, *, data: str | os.PathLike, output: str | os.PathLike, replace: bool = True,
          replace_every: int = 2, val_data: str | os.PathLike | None = None, input_size=None, mean=None, std=None,
          resume: bool = False, progress: bool = False, config: TrainConfig | None = None,
          **overrides) -> TrainResult:
    """Train ``arch`` from scratch with labels; with ``replace``, every ``replace_every``-th interior unit of
    each run is a replaced unit (scalars initialised 0.5/0.5, neighbour gradients detached: the papers'
    setting). ``config`` (default :data:`TRAIN_DEFAULTS`) or keyword overrides of its fields. The output is an
    ordinary model file (replaced units folded), which ``convert`` and ``teacher=`` accept."""
    cfg = _config(TRAIN_DEFAULTS, config, overrides)
    arch_spec = resolve_arch(arch)
    spec = data_spec(CheckpointMeta(input_size=arch_spec.input_size, mean=arch_spec.mean, std=arch_spec.std),
                     input_size, mean, std)
    train_set, val_set = datasets(data, val_data, spec, labeled=True)
    classes = list(train_set.classes)
    if len(classes) < 2:
        raise DataError(f"'{data}' has {len(classes)} class", "training a classifier needs at least 2 classes")
    torch.manual_seed(cfg.seed)
    meta = CheckpointMeta.for_arch(arch_spec, {"num_classes": len(classes)})
    meta.input_size, meta.mean, meta.std, meta.class_names = *spec, classes
    model = arch_spec.build(num_classes=len(classes))
    check_classes([val_set], model, spec[0])
    to_save, units = None, []
    if replace:
        conv = convert(Loaded(model, meta), every=replace_every, init="half")
        model, units = conv.model, conv.summary.replaced_units
        meta.extra["replacement_learning"] = {"plan": conv.plan.to_dict()}
        to_save = lambda m: fold(Loaded(m, meta)).model  # noqa: E731
    res = _fit(model, meta, cfg, train_set=train_set, val_set=val_set, teacher=None, output=output, resume=resume,
               progress=progress, to_save=to_save)
    return TrainResult(arch=arch_spec.name, kind="model", replaced_units=units, params=count_params(model),
                       **FitOutcome.fields_of(res, output))
