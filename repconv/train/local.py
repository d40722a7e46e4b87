"""Block-wise (local) distillation: each converted unit learns to reproduce the teacher's unit output from the
teacher's unit input (LANA's layer-wise feature-map distillation, METHODS.md section 4).

One pass over unlabeled images trains every unit at once: forward hooks on the teacher (the original model)
capture each unit's input and output, with one teacher forward per batch; each *student unit* is run on the
teacher's input and its output is compared to the teacher's (MSE normalised by the teacher output's mean
square, so every unit counts alike). The student units are views that share their parameters and buffers with
the converted model, so training them trains the converted model in place. Each unit's loss is back-propagated
on its own (gradients accumulate; one optimizer step per batch), so at most one unit's graph is alive at a
time: peak memory is the teacher's no-grad forward plus the unit boundaries plus the largest unit, below what
global fine-tuning (the whole model's graph) needs.

What a unit is: a parameter-free step's target (a conv or an attention) belongs to its enclosing *block*, the
nearest ancestor that is not a container and whose parent is one (``layer1.0`` for ``layer1.0.conv2``,
``features.3`` for mobilenet_v2's ``features.3.conv.1.0``, a ViT encoder block for its attention); several steps
in one block make one unit. A replaced unit (Replacement Learning) is its own unit.

What trains (``LocalOptions``): for a parameter-free unit, its remaining parameters (convs, norms, token-mixer
linears: ``pf_train="all"``) or only its norms' affine parameters (``"norm"``); for a replaced unit, its two
scalars (``replaced="scalars"``) or nothing (``"skip"``, the default: per-unit output MSE on two scalars drives
them towards 0 and hurts accuracy, calibrate.py's docstring and ``benchmarks/blockwise_recovery.py`` measure it;
the global stage that follows fits them on the logits instead).

Batch-norm running statistics (``bn_stats``): ``freeze`` (default) runs every norm in eval mode with the
statistics it came with, so what is optimised is exactly the function that is deployed, and the stats cannot be
corrupted by the teacher-input / student-output mismatch of a unit still far from its target. Before training
(``init_stats``, on by default) the units' statistics are re-estimated once on the teacher's unit inputs: a norm
whose input the conversion changed (after a depthwise conv that became a pool) otherwise starts far off (unit
errors of 5-18x the teacher output's energy on mobilenet_v2 pf-hybrid), then they stay frozen. ``update``
trains on batch statistics and updates the running ones (momentum 0.1), as fine-tuning in train mode does;
``recalibrate`` trains like ``freeze`` and afterwards re-estimates the running statistics of the converted units'
norms on the student's own forward (cumulative average over ``recalibrate_batches`` batches).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from repconv.convert.graph import device_of, trace
from repconv.convert.plan import ParameterFreeStep, Plan, ReplaceStep
from repconv.convert.replacement import SCALARS_NAME, synthesize
from repconv.errors import DataError, NothingToReplace, PlanError
from repconv.options import BnStats

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_BN = nn.modules.batchnorm._BatchNorm

PfTrain = Literal["all", "norm"]
ReplacedTrain = Literal["skip", "scalars"]



@dataclass
class LocalOptions:
    """Settings of block-wise distillation (the defaults are the measured best on the digits bed)."""

    epochs: int = 3
    steps_per_epoch: int | None = None  # cap on batches per epoch (quick runs, tests)
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    pf_train: PfTrain = "all"
    replaced: ReplacedTrain = "skip"
    bn_stats: BnStats = "freeze"
    recalibrate_batches: int = 8
    init_stats: bool = True  # re-estimate the units' BN statistics on the teacher's unit inputs before training
    eval_batches: int = 2  # batches of ``eval_data`` (or of the training data) on which unit errors are measured
    seed: int = 0

    def check(self) -> None:
        for name, value, allowed in (("pf_train", self.pf_train, ("all", "norm")),
                                     ("replaced", self.replaced, ("skip", "scalars")),
                                     ("bn_stats", self.bn_stats, ("freeze", "update", "recalibrate"))):
            if value not in allowed:
                raise PlanError(f"unknown local-distillation {name} '{value}'", f"use one of {', '.join(allowed)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise PlanError(f"local distillation: {name} must be at least 1", "give a positive integer")
        if not self.lr > 0:
            raise PlanError(f"local distillation: lr {self.lr} is not positive", "give a learning rate such as 1e-3")


@dataclass
class UnitError:
    """One unit: its relative output error ``||y - t||^2 / ||t||^2`` on the evaluation batches."""

    unit: str
    form: str  # parameter_free | replace
    steps: list[str]
    trainable_params: int
    error_before: float
    error_after: float


@dataclass
class LocalResult:
    units: list[UnitError]
    epochs: int
    steps: int
    images: int
    seconds: float
    trainable_params: int
    options: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # per epoch: mean normalised loss

    @property
    def mean_error_before(self) -> float:
        return sum(u.error_before for u in self.units) / max(len(self.units), 1)

    @property
    def mean_error_after(self) -> float:
        return sum(u.error_after for u in self.units) / max(len(self.units), 1)

    def to_dict(self) -> dict:
        return asdict(self) | {"mean_error_before": self.mean_error_before, "mean_error_after": self.mean_error_after}


# ---------------------------------------------------------------- units of a plan


@dataclass
class LocalUnit:
    """A block of the teacher and the plan steps that change it."""

    path: str
    form: str  # parameter_free | replace
    steps: list = field(default_factory=list)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def block_of(model: nn.Module, path: str) -> str:
    """The unit a module belongs to: the nearest ancestor (or itself) that is not a container and whose
    parent is one; the module's parent when there is no such ancestor."""
    modules = dict(model.named_modules())
    current = _parent(path)
    while current:
        parent = _parent(current)
        if not isinstance(modules[current], _CONTAINERS) and isinstance(modules[parent] if parent else model,
                                                                        _CONTAINERS):
            return current
        current = parent
    return _parent(path) or path


def plan_units(teacher: nn.Module, plan: Plan) -> list[LocalUnit]:
    """Group a plan's steps into units of the teacher (see the module docstring), in plan order."""
    units: dict[str, LocalUnit] = {}
    for step in plan.steps:
        if isinstance(step, ReplaceStep):
            units[step.unit] = LocalUnit(step.unit, "replace", [step])
            continue
        path = block_of(teacher, step.target)
        unit = units.setdefault(path, LocalUnit(path, "parameter_free"))
        if unit.form != "parameter_free":
            raise PlanError(f"'{step.target}' is inside the replaced unit '{path}'", "a unit takes one form")
        unit.steps.append(step)
    paths = list(units)
    for a in paths:
        for b in paths:
            if a != b and b.startswith(a + "."):
                raise PlanError(f"units '{a}' and '{b}' are nested", "local distillation needs disjoint units")
    return list(units.values())


def _relative(step: ParameterFreeStep, prefix: str) -> ParameterFreeStep:
    def rel(p: str) -> str:
        if not p.startswith(prefix + "."):
            raise PlanError(f"parameter-free step for '{step.target}': '{p}' is outside its unit '{prefix}'",
                            "local distillation needs the absorbed modules inside the unit")
        return p[len(prefix) + 1:]

    return ParameterFreeStep(rel(step.target), step.form, step.op, step.kernel, step.stride, step.padding,
                             [rel(a) for a in step.absorbed], dict(step.options))


def _share(view: nn.Module, student: nn.Module, prefix: str) -> None:
    """Point every parameter and buffer of ``view`` at the student's tensor of the same (prefixed) name."""
    for kind, table in (("parameter", dict(view.named_parameters())), ("buffer", dict(view.named_buffers()))):
        for name, tensor in table.items():
            full = f"{prefix}.{name}"
            try:
                source = student.get_parameter(full) if kind == "parameter" else student.get_buffer(full)
            except AttributeError as exc:
                raise PlanError(f"the converted model has no {kind} '{full}' for its unit '{prefix}'",
                                "pass the teacher the model was converted from, and the plan it was converted "
                                "with") from exc
            if source.shape != tensor.shape:
                raise PlanError(f"'{full}' has shape {tuple(source.shape)} in the converted model but "
                                f"{tuple(tensor.shape)} in its unit rebuilt from the plan",
                                "pass the teacher the model was converted from")
            owner_path, _, attr = name.rpartition(".")
            owner = view.get_submodule(owner_path) if owner_path else view
            if kind == "parameter":
                owner._parameters[attr] = source
            else:
                owner._buffers[attr] = source


class ReplacedView(nn.Module):
    """A replaced unit run alone: the teacher unit's code on ``a * P[prev] + b * P[next]`` from the student."""

    def __init__(self, unit: nn.Module, student: nn.Module, step: ReplaceStep):
        super().__init__()
        self.unit = copy.deepcopy(unit)
        self.scalars = student.get_submodule(f"{step.unit}.{SCALARS_NAME}")
        self._prev = dict(student.get_submodule(step.prev).named_parameters())
        self._next = dict(student.get_submodule(step.next).named_parameters())
        self._names = [n for n, _ in unit.named_parameters()]
        self._buffers_of = dict(student.get_submodule(step.unit).named_buffers())
        self.neighbor_grad = step.neighbor_grad

    def forward(self, *args, **kwargs):
        s = self.scalars
        params = {n: synthesize(s.a, s.b, self._prev[n], self._next[n], self.neighbor_grad) for n in self._names}
        buffers = {n: b for n, b in self._buffers_of.items() if not n.startswith(SCALARS_NAME + ".")}
        return torch.func.functional_call(self.unit, params | buffers, args, kwargs)


def build_view(teacher: nn.Module, student: nn.Module, unit: LocalUnit) -> nn.Module:
    """The student's unit as a module that can run alone, sharing the student's tensors."""
    source = teacher.get_submodule(unit.path)
    if unit.form == "replace":
        return ReplacedView(source, student, unit.steps[0])
    from repconv.convert.parameter_free import apply_parameter_free

    gm = trace(copy.deepcopy(source))
    apply_parameter_free(gm, [_relative(s, unit.path) for s in unit.steps])
    _share(gm, student, unit.path)
    return gm


def trainable_of(view: nn.Module, unit: LocalUnit, options: LocalOptions) -> list[nn.Parameter]:
    if unit.form == "replace":
        return [view.scalars.a, view.scalars.b] if options.replaced == "scalars" else []
    if options.pf_train == "all":
        return list(view.parameters())
    return [p for m in view.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)]


# ---------------------------------------------------------------- data


def image_batches(data: Dataset | Sequence[torch.Tensor] | torch.Tensor, batch_size: int, *, shuffle: bool = False,
                  seed: int = 0) -> Iterator[torch.Tensor]:
    """Image batches from a dataset (of images or (image, label) pairs), a list of batches or one tensor."""
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
        return
    if isinstance(data, (list, tuple)):
        yield from data
        return
    loader = DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))
    for item in loader:
        yield item[0] if isinstance(item, (list, tuple)) else item


def _count(data) -> int:
    try:
        return len(data)
    except TypeError:
        return 0


# ---------------------------------------------------------------- capturing the teacher


class _Capture:
    """Forward hooks on the teacher's unit modules that keep each unit's input and output of the last batch."""

    def __init__(self, teacher: nn.Module, paths: Iterable[str]):
        self.inputs: dict[str, tuple] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for path in paths:
            self.handles.append(teacher.get_submodule(path).register_forward_hook(self._hook(path), with_kwargs=True))

    def _hook(self, path: str):
        def hook(module, args, kwargs, output):
            if path in self.outputs:
                raise PlanError(f"the teacher calls unit '{path}' more than once per forward",
                                "local distillation needs units called once")
            if not isinstance(output, torch.Tensor) or kwargs:
                raise PlanError(f"unit '{path}' does not map tensors to one tensor",
                                "local distillation needs units with tensor inputs and one tensor output")
            self.inputs[path] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            self.outputs[path] = output.detach()
        return hook

    def run(self, teacher: nn.Module, x: torch.Tensor) -> None:
        self.inputs.clear()
        self.outputs.clear()
        with torch.no_grad():
            teacher(x.to(device_of(teacher)))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def relative_error(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``mean((y - t)^2) / mean(t^2)``: 0 is exact, 1 is as far as predicting zeros."""
    t = t.float()
    return (y.float() - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)


def unit_errors(teacher: nn.Module, views: dict[str, nn.Module], batches: Sequence[torch.Tensor]) -> dict[str, float]:
    """Each view's relative error against the teacher's unit output, pooled over ``batches``."""
    capture = _Capture(teacher, views)
    num = dict.fromkeys(views, 0.0)
    den = dict.fromkeys(views, 0.0)
    try:
        for x in batches:
            capture.run(teacher, x)
            with torch.no_grad():
                for path, view in views.items():
                    if path not in capture.outputs:
                        raise PlanError(f"the teacher never ran unit '{path}'", "check the plan against the teacher")
                    t = capture.outputs[path].float()
                    num[path] += float((view(*capture.inputs[path]).float() - t).pow(2).sum())
                    den[path] += float(t.pow(2).sum())
    finally:
        capture.close()
    return {p: num[p] / max(den[p], 1e-12) for p in views}


# ---------------------------------------------------------------- the stage


def _set_norm_modes(views: Iterable[nn.Module], mode: BnStats) -> None:
    for view in views:
        view.eval()
        if mode == "update":
            for m in view.modules():
                if isinstance(m, _BN):
                    m.train()


def plan_of(student: nn.Module, plan: Plan | None) -> Plan:
    """``plan``, or the one ``student`` was converted with (``student.meta["repconv_plan"]``)."""
    plan = plan if plan is not None else getattr(student, "meta", {}).get("repconv_plan")
    if plan is None:
        raise PlanError("the student model carries no plan", "pass plan= (the plan it was converted with)")
    return plan


def local_distill(student: nn.Module, teacher: nn.Module, data: Dataset | Sequence[torch.Tensor] | torch.Tensor, *,
                  plan: Plan | None = None, options: LocalOptions | None = None,
                  eval_data: Dataset | Sequence[torch.Tensor] | torch.Tensor | None = None,
                  units: Sequence[str] | None = None, progress: bool = False) -> LocalResult:
    """Train ``student`` (a converted model) in place, unit by unit against ``teacher`` (its original).

    ``plan`` defaults to the one the student was converted with (``student.meta["repconv_plan"]``); ``units``
    restricts training to some unit paths (all by default). ``data`` is unlabeled images (labels, if any, are
    ignored). Returns each unit's relative output error before and after, measured on ``eval_data`` (default:
    the first batches of ``data``).
    """
    options = options or LocalOptions()
    options.check()
    plan = plan_of(student, plan)
    if _count(data) == 0 and not isinstance(data, torch.Tensor):
        raise DataError("local distillation got no images", "give a folder or dataset with images")
    found = plan_units(teacher, plan)
    if units is not None:
        found = [u for u in found if u.path in set(units)]
    if not found:
        raise NothingToReplace("the plan changes no unit, so there is nothing to distill", "convert first")
    torch.manual_seed(options.seed)
    teacher.eval()
    teacher_grad = [p.requires_grad for p in teacher.parameters()]
    teacher.requires_grad_(False)
    student_grad = {n: p.requires_grad for n, p in student.named_parameters()}
    student.requires_grad_(False)
    views = {u.path: build_view(teacher, student, u) for u in found}
    train_sets = {u.path: trainable_of(views[u.path], u, options) for u in found}
    params = list({id(p): p for ps in train_sets.values() for p in ps}.values())
    for p in params:
        p.requires_grad_(True)
    eval_batches = list(image_batches(eval_data if eval_data is not None else data, options.batch_size))
    eval_batches = eval_batches[:options.eval_batches]
    if not eval_batches:
        raise DataError("local distillation got no evaluation images", "give eval_data with images")
    started = time.perf_counter()
    history: list[dict] = []
    steps = images = 0
    try:
        _set_norm_modes(views.values(), "freeze")
        before = unit_errors(teacher, views, eval_batches)
        if options.init_stats:  # kept per unit only where it lowers the unit's error
            pf = {p: v for p, v in views.items() if not isinstance(v, ReplacedView)}
            saved = {p: {n: b.clone() for n, b in v.named_buffers()} for p, v in pf.items()}
            init_norm_stats(teacher, pf, data, options)
            renewed = unit_errors(teacher, pf, eval_batches)
            with torch.no_grad():
                for p, v in pf.items():
                    if renewed[p] > before[p]:
                        for n, b in v.named_buffers():
                            b.copy_(saved[p][n])
        trained = {p: v for p, v in views.items() if train_sets[p]}
        if params:
            steps, images = _train(teacher, trained, params, data, options, history, progress)
        if options.bn_stats == "recalibrate":
            recalibrate_norms(student, [u.path for u in found], data, options)
        _set_norm_modes(views.values(), "freeze")
        after = unit_errors(teacher, views, eval_batches)
    finally:
        for n, p in student.named_parameters():
            p.requires_grad_(student_grad.get(n, True))
        for p, r in zip(teacher.parameters(), teacher_grad, strict=True):
            p.requires_grad_(r)
        student.eval()
    rows = [UnitError(u.path, u.form, [getattr(s, "target", getattr(s, "unit", "")) for s in u.steps],
                      sum(p.numel() for p in train_sets[u.path]), before[u.path], after[u.path]) for u in found]
    return LocalResult(rows, options.epochs, steps, images, round(time.perf_counter() - started, 3),
                       sum(p.numel() for p in params), asdict(options), history)


def _train(teacher, views: dict[str, nn.Module], params, data, options: LocalOptions, history, progress):
    from repconv.train.loop import _progress

    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    n = _count(data)
    per_epoch = math.ceil(n / options.batch_size) if n and not isinstance(data, (list, tuple)) else max(n, 1)
    if options.steps_per_epoch:
        per_epoch = min(per_epoch, options.steps_per_epoch)
    total = options.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    capture = _Capture(teacher, views)
    steps = images = 0
    try:
        with _progress(progress) as bar:
            for epoch in range(options.epochs):
                task = bar.add_task(f"local distillation {epoch + 1}/{options.epochs}", total=per_epoch, stats="")
                _set_norm_modes(views.values(), options.bn_stats)
                loss_sum = seen = 0.0
                for i, x in enumerate(image_batches(data, options.batch_size, shuffle=True,
                                                    seed=options.seed + epoch)):
                    if i >= per_epoch:
                        break
                    capture.run(teacher, x)
                    opt.zero_grad(set_to_none=True)
                    batch_loss = 0.0
                    for path, view in views.items():
                        loss = relative_error(view(*capture.inputs[path]), capture.outputs[path])
                        loss.backward()  # one unit's graph at a time
                        batch_loss += float(loss.detach())
                    opt.step()
                    sched.step()
                    steps += 1
                    images += len(x)
                    loss_sum += batch_loss / len(views) * len(x)
                    seen += len(x)
                    bar.update(task, advance=1, stats=f"unit error {loss_sum / seen:.4f}")
                history.append({"epoch": epoch + 1, "mean_unit_loss": loss_sum / max(seen, 1), "images": int(seen)})
    finally:
        capture.close()
    return steps, images


def init_norm_stats(teacher: nn.Module, views: dict[str, nn.Module], data, options: LocalOptions) -> None:
    """Re-estimate every unit's batch-norm running statistics on the teacher's unit inputs (cumulative average over
    ``recalibrate_batches`` batches): a norm whose input the conversion changed (the norm after a depthwise conv that
    became a pool, the norm after the 1x1 conv that now reads a pool) starts from statistics of its new input
    instead of the original's, which is what makes the first local steps useful."""
    from repconv.convert.measure import batch_stats

    for view in views.values():
        for m in view.modules():
            if isinstance(m, _BN):
                m.reset_running_stats()
    capture = _Capture(teacher, views)
    try:
        with torch.no_grad(), batch_stats(list(views.values()), momentum=None):
            for i, x in enumerate(image_batches(data, options.batch_size, shuffle=True, seed=options.seed)):
                if i >= options.recalibrate_batches:
                    break
                capture.run(teacher, x)
                for path, view in views.items():
                    view(*capture.inputs[path])
    finally:
        capture.close()


def recalibrate_norms(student: nn.Module, units: Sequence[str], data, options: LocalOptions) -> None:
    """Re-estimate the running statistics of the batch norms inside ``units`` on the student's own forward."""
    from repconv.convert.measure import batch_stats

    modules = [student.get_submodule(u) for u in units]
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, _BN):
                m.reset_running_stats()
    student.eval()
    with torch.no_grad(), batch_stats(modules, momentum=None):
        for i, x in enumerate(image_batches(data, options.batch_size, shuffle=True, seed=options.seed)):
            if i >= options.recalibrate_batches:
                break
            student(x.to(device_of(student)))
    student.eval()


# ---------------------------------------------------------------- local, then global


@dataclass
class BlockwiseRecovery:
    """Local distillation followed by global (logits) distillation."""

    local: LocalResult
    global_history: list[dict]
    val_acc: float | None
    val_acc_converted: float | None
    val_acc_after_local: float | None

    def to_dict(self) -> dict:
        return {"local": self.local.to_dict(), "global_history": self.global_history, "val_acc": self.val_acc,
                "val_acc_converted": self.val_acc_converted, "val_acc_after_local": self.val_acc_after_local}


def blockwise_recovery(student: nn.Module, teacher: nn.Module, train_set: Dataset, *, plan: Plan | None = None,
                       local: LocalOptions | None = None, global_config=None, val_set: Dataset | None = None,
                       progress: bool = False) -> BlockwiseRecovery:
    """Recover a converted model: :func:`local_distill`, then ``repconv.train.loop.fit`` with ``global_config``
    (a ``TrainConfig``; default: distillation from the teacher, every parameter, AdamW lr 1e-3, 3 epochs).
    ``global_config.epochs == 0`` skips the global stage."""
    from repconv.train.loop import TrainConfig, evaluate, fit

    local = local or LocalOptions()
    global_config = global_config or TrainConfig(epochs=3, objective="distill", trainable="all", lr=1e-3,
                                                 batch_size=local.batch_size, seed=local.seed)
    acc0 = evaluate(student, val_set) if val_set is not None else None
    res = local_distill(student, teacher, train_set, plan=plan, options=local, progress=progress)
    acc1 = evaluate(student, val_set) if val_set is not None else None
    history: list[dict] = []
    acc = acc1
    if global_config.epochs > 0:
        fitted = fit(student, train_set, global_config, val_set=val_set, teacher=teacher, progress=progress)
        history, acc = fitted.history, fitted.val_acc
        student.requires_grad_(True)
    return BlockwiseRecovery(res, history, acc, acc0, acc1)
