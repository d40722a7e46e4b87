"""Function-space calibration of Replacement Learning scalars (measured unit selection: convert/measure.py).

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

A parameter-free plan has no scalars; :func:`refit_layers` instead solves, in closed form, the layer that reads
each new pool (:mod:`repconv.train.refit`), and keeps the result only where it lowers the same KL.

Agreement with the teacher (top-1) is measured on the calibration batches and, when given, on held-out
batches: with unlabeled data it is the only honest measure of what calibration did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from repconv.convert.measure import STARTS, batch_stats, mean_kl, teacher_logits
from repconv.convert.replacement import replaced_units
from repconv.options import BnStats, check_choice
from repconv.train.refit import least_squares_refit

_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class UnitFit:
    unit: str
    a_before: float
    b_before: float
    a: float
    b: float


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
    refit: dict | None = None  # parameter-free plans: the least-squares refit (repconv.train.refit.RefitResult)


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


def _judged(model: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor],
            heldout: Sequence[torch.Tensor] | None, fit: Callable[[list[torch.Tensor]], None]) -> Calibration:
    """Run ``fit(teacher_logits)`` on ``model`` in place and keep it only if it lowers KL(teacher || model) on
    ``batches`` (else the input is restored); KL and top-1 agreement with the teacher before and after, on
    ``batches`` and on ``heldout``."""
    t_logits = teacher_logits(teacher, batches)
    h_logits = teacher_logits(teacher, heldout) if heldout else None
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        kl_before = float(mean_kl(model, batches, t_logits))
    agree_before = _agreement(model, batches, t_logits)
    h_before = _agreement(model, heldout, h_logits) if heldout else None
    try:
        fit(t_logits)
    finally:
        model.eval()
    with torch.no_grad():
        kl_after = float(mean_kl(model, batches, t_logits))
    kept_input = not kl_after <= kl_before
    if kept_input:  # never leave the model worse on the data it was fitted to
        model.load_state_dict(saved)
        kl_after = kl_before
    return Calibration([], kl_before, kl_after, agree_before, _agreement(model, batches, t_logits), h_before,
                       _agreement(model, heldout, h_logits) if heldout else None,
                       sum(len(x) for x in heldout) if heldout else 0, kept_input=kept_input)


def calibrate_units(model: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor],
                    max_iter: int = 20, bn_stats: BnStats = "recalibrate",
                    heldout: Sequence[torch.Tensor] | None = None) -> Calibration:
    """Fit every replaced unit's scalars of ``model`` in place (see the module docstring). ``heldout``:
    input batches not used by the fit, on which agreement with the teacher is reported before and after."""
    check_choice("bn_stats", bn_stats, BnStats)
    found = replaced_units(model)
    scalars = [p for s in found.values() for p in (s.a, s.b)]
    before = [float(p.detach()) for p in scalars]
    units = [model.get_submodule(u) for u in found]

    def fit(t_logits: list[torch.Tensor]) -> None:
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
                        return float(mean_kl(model, batches, t_logits))

                starts = [before] + [[v for _ in found for v in ab] for ab in STARTS]
                _set(scalars, min(starts, key=kl_at))
                opt = torch.optim.LBFGS(scalars, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

                def closure():
                    opt.zero_grad()
                    loss = mean_kl(model, batches, t_logits)
                    loss.backward()
                    return loss

                opt.step(closure)
            if bn_stats != "freeze":
                _reestimate_stats(units, model, batches)
        finally:
            for p, r in zip(model.parameters(), requires, strict=True):
                p.requires_grad_(r)

    cal = _judged(model, teacher, batches, heldout, fit)
    cal.units = [UnitFit(u, before[2 * i], before[2 * i + 1], float(s.a.detach()), float(s.b.detach()))
                 for i, (u, s) in enumerate(found.items())]
    cal.bn_stats = bn_stats
    return cal


def refit_layers(model: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor],
                 heldout: Sequence[torch.Tensor] | None = None) -> Calibration:
    """Least-squares refit of the layers that read each parameter-free op of ``model`` (in place), kept only if it
    lowers KL(teacher || model) on ``batches``; agreement with the teacher is reported as for the scalars."""
    found: list = []
    cal = _judged(model, teacher, batches, heldout,
                  lambda _: found.append(least_squares_refit(model, teacher, list(batches), batches=len(batches))))
    cal.bn_stats, cal.refit = "refit", found[0].to_dict()
    return cal
