"""Function-space calibration of Replacement Learning scalars, and measured unit selection.

Weight-space fits of pretrained neighbours are poor (METHODS.md section 1), so the scalars are fitted
where it matters, on the model's function: all replaced units' ``(a, b)`` jointly minimize the KL
divergence between the teacher's (original model's) logits and the converted model's on a few
calibration batches (LBFGS; a handful of unknowns). Fitting each unit's own output instead (MSE) was
tried and rejected: on the digits ResNet-20 it shrinks (a, b) toward zero and *lowers* accuracy (57% ->
41%) because output MSE rewards shrinking a poorly correlated block towards its mean.

The running statistics of a replaced unit's batch norms belong to the original weights. With
``bn_stats="recalibrate"`` (the default, chosen by measurement: benchmarks/bn_stats_recovery.py) those norms
use batch statistics during the fit, and afterwards their running statistics are re-estimated for the
synthesized weights (cumulative average over the calibration batches); ``"update"`` is the same here (there
is no step-by-step stream of statistics to follow). With ``"freeze"`` the original unit's statistics are
kept and the fit runs in eval mode. Norms outside replaced units are never touched.

Agreement with the teacher (top-1) is measured on the calibration batches and, when given, on held-out
batches: with unlabeled data it is the only honest measure of what calibration did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from repconv.convert.graph import Run
from repconv.convert.plan import ReplaceStep
from repconv.convert.replacement import replaced_units, synthesize

# Joint starting points tried before LBFGS (the problem is not convex); the current scalars are added.
_STARTS = ((0.5, 0.5), (1.0, 0.0), (0.0, 1.0))
_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class UnitFit:
    unit: str
    a_before: float
    b_before: float
    a: float
    b: float


CALIBRATE_BN_STATS = ("freeze", "update", "recalibrate")


@dataclass
class Calibration:
    units: list[UnitFit]
    kl_before: float  # KL(teacher || model) on the calibration batches, model as it came in
    kl_after: float
    agreement_before: float | None = None  # top-1 agreement with the teacher on the calibration batches
    agreement_after: float | None = None
    heldout_agreement_before: float | None = None  # the same on held-out batches (None: none given)
    heldout_agreement_after: float | None = None
    heldout_images: int = 0
    bn_stats: str = "recalibrate"
    kept_input: bool = False  # the fit did not lower the KL, so the input was kept


@dataclass
class UnitDamage:
    """A candidate unit and the KL(teacher || model) its replacement alone causes on calibration data."""

    unit: str
    prev: str
    next: str
    kl: float
    a: float
    b: float


def kl_to_teacher(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) of the softmax outputs, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits.float(), 1), F.log_softmax(teacher_logits.float(), 1),
                    reduction="batchmean", log_target=True)


@contextlib.contextmanager
def batch_stats(modules: Sequence[nn.Module], momentum: float | None = 0.1) -> Iterator[None]:
    """Run the batch norms inside ``modules`` on batch statistics (train mode) with the given momentum."""
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, _BN)]
    saved = [(m.training, m.momentum) for m in norms]
    for m in norms:
        m.train()
        m.momentum = momentum
    try:
        yield
    finally:
        for m, (training, mom) in zip(norms, saved, strict=True):
            m.train(training)
            m.momentum = mom


def _mean_kl(model: nn.Module, batches: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor]):
    total = sum(kl_to_teacher(model(x), t) * len(x) for x, t in zip(batches, teacher_logits, strict=True))
    return total / sum(len(x) for x in batches)


def teacher_logits(teacher: nn.Module, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    teacher.eval()
    with torch.no_grad():
        return [teacher(x) for x in batches]


# ---------------------------------------------------------------- calibration


def _set(scalars: Sequence[nn.Parameter], values: Sequence[float]) -> None:
    with torch.no_grad():
        for p, v in zip(scalars, values, strict=True):
            p.fill_(v)


def _reestimate_stats(units: Sequence[nn.Module], model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    for unit in units:
        for m in unit.modules():
            if isinstance(m, _BN):
                m.reset_running_stats()
    with torch.no_grad(), batch_stats(units, momentum=None):
        for x in batches:
            model(x)


def _agreement(model: nn.Module, batches: Sequence[torch.Tensor], t_logits: Sequence[torch.Tensor]) -> float:
    with torch.no_grad():
        same = sum(int((model(x).argmax(1) == t.argmax(1)).sum()) for x, t in zip(batches, t_logits, strict=True))
    return same / max(sum(len(x) for x in batches), 1)


def calibrate_units(model: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor],
                    max_iter: int = 20, bn_stats: str = "recalibrate",
                    heldout: Sequence[torch.Tensor] | None = None) -> Calibration:
    """Fit every replaced unit's scalars of ``model`` in place (see the module docstring). ``heldout``:
    input batches not used by the fit, on which agreement with the teacher is reported before and after."""
    if bn_stats not in CALIBRATE_BN_STATS:
        from repconv.errors import PlanError

        raise PlanError(f"unknown --bn-stats '{bn_stats}'", f"use one of {', '.join(CALIBRATE_BN_STATS)}")
    found = replaced_units(model)
    scalars = [p for s in found.values() for p in (s.a, s.b)]
    before = [float(p.detach()) for p in scalars]
    units = [model.get_submodule(u) for u in found]
    saved_stats = {k: v.clone() for k, v in model.state_dict().items()}
    t_logits = teacher_logits(teacher, batches)
    h_logits = teacher_logits(teacher, heldout) if heldout else None
    model.eval()
    with torch.no_grad():
        kl_before = float(_mean_kl(model, batches, t_logits))
    agree_before = _agreement(model, batches, t_logits)
    h_before = _agreement(model, heldout, h_logits) if heldout else None
    kept_input = False
    fit_stats = batch_stats(units) if bn_stats != "freeze" else contextlib.nullcontext()
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    for p in scalars:
        p.requires_grad_(True)
    try:
        with fit_stats:
            def kl_at(values):
                _set(scalars, values)
                with torch.no_grad():
                    return float(_mean_kl(model, batches, t_logits))

            starts = [before] + [[v for _ in found for v in ab] for ab in _STARTS]
            _set(scalars, min(starts, key=kl_at))
            opt = torch.optim.LBFGS(scalars, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = _mean_kl(model, batches, t_logits)
                loss.backward()
                return loss

            opt.step(closure)
        if bn_stats != "freeze":
            _reestimate_stats(units, model, batches)
        model.eval()
        with torch.no_grad():
            kl_after = float(_mean_kl(model, batches, t_logits))
        if not kl_after <= kl_before:  # never leave the model worse on the data it was fitted to
            model.load_state_dict(saved_stats)
            kl_after, kept_input = kl_before, True
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
        model.eval()
    fits = [UnitFit(u, before[2 * i], before[2 * i + 1], float(s.a.detach()), float(s.b.detach()))
            for i, (u, s) in enumerate(found.items())]
    return Calibration(fits, kl_before, kl_after, agree_before, _agreement(model, batches, t_logits), h_before,
                       _agreement(model, heldout, h_logits) if heldout else None,
                       sum(len(x) for x in heldout) if heldout else 0, bn_stats, kept_input)


# ---------------------------------------------------------------- measured selection


def candidate_steps(runs: Sequence[Run]) -> list[ReplaceStep]:
    """Every interior member of every run, with its two neighbours."""
    return [ReplaceStep(m, r.members[i - 1], r.members[i + 1])
            for r in runs for i, m in enumerate(r.members[1:-1], start=1)]


def _swap_output(unit: nn.Module, prev: nn.Module, next: nn.Module, a: float, b: float) -> Callable:
    """A forward hook making ``unit`` compute with ``a*prev + b*next`` (batch norms on batch statistics)."""
    at, bt = torch.tensor(a), torch.tensor(b)
    pp, qq = dict(prev.named_parameters()), dict(next.named_parameters())
    busy = []

    def hook(module, args, kwargs, output):
        if busy:  # the re-run below calls the module again
            return output
        busy.append(1)
        try:
            params = {n: synthesize(at, bt, pp[n], qq[n]) for n, _ in module.named_parameters()}
            buffers = {n: t.clone() for n, t in module.named_buffers()}
            with batch_stats([module]):
                return torch.func.functional_call(module, buffers | params, args, kwargs)
        finally:
            busy.clear()

    return hook


def measure_damage(teacher: nn.Module, candidates: Sequence[ReplaceStep],
                   batches: Sequence[torch.Tensor]) -> list[UnitDamage]:
    """Each candidate replaced alone, at the best of a few (a, b): its KL to the teacher's logits.

    The replacement is simulated on the teacher with a forward hook, so no model is built per candidate.
    """
    t_logits = teacher_logits(teacher, batches)
    out = []
    for c in candidates:
        unit, prev, next = (teacher.get_submodule(p) for p in (c.unit, c.prev, c.next))
        best = None
        for a, b in _STARTS:
            handle = unit.register_forward_hook(_swap_output(unit, prev, next, a, b), with_kwargs=True)
            try:
                with torch.no_grad():
                    kl = float(_mean_kl(teacher, batches, t_logits))
            finally:
                handle.remove()
            if best is None or kl < best.kl:
                best = UnitDamage(c.unit, c.prev, c.next, kl, a, b)
        out.append(best)
    return out


def least_harmful(damages: Sequence[UnitDamage], budget: int | None) -> list[str]:
    """Units in increasing damage, skipping any that touch one already kept, up to ``budget``."""
    def near(x: str, y: str) -> bool:
        return x == y or x.startswith(y + ".") or y.startswith(x + ".")

    kept: list[UnitDamage] = []
    for d in sorted(damages, key=lambda d: d.kl):
        if budget is not None and len(kept) >= budget:
            break
        if any(near(d.unit, k.unit) or near(d.unit, k.prev) or near(d.unit, k.next)
               or near(k.unit, d.prev) or near(k.unit, d.next) for k in kept):
            continue
        kept.append(d)
    return [k.unit for k in kept]
