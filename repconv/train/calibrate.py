"""Function-space calibration of Replacement Learning scalars (measured unit selection: convert/measure.py).

Weight-space fits of pretrained neighbours are poor (METHODS.md section 1), so the scalars are fitted
where it matters, on the model's function: all replaced units' ``(a, b)`` jointly minimize the KL
divergence between the teacher's (original model's) logits and the converted model's on a few
calibration batches (LBFGS; a handful of unknowns). Fitting each unit's own output instead (MSE) was
tried and rejected: on the digits ResNet-20 it shrinks (a, b) toward zero and *lowers* accuracy (57% ->
41%) because output MSE rewards shrinking a poorly correlated block towards its mean.

The running statistics of a replaced unit's batch norms belong to the original weights; during the fit
those norms use batch statistics, and afterwards their running statistics are re-estimated for the
synthesized weights (cumulative average over the calibration batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from repconv.convert.measure import STARTS, batch_stats, mean_kl, teacher_logits
from repconv.convert.replacement import replaced_units

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


def calibrate_units(model: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor],
                    max_iter: int = 20) -> Calibration:
    """Fit every replaced unit's scalars of ``model`` in place (see the module docstring)."""
    found = replaced_units(model)
    scalars = [p for s in found.values() for p in (s.a, s.b)]
    before = [float(p.detach()) for p in scalars]
    units = [model.get_submodule(u) for u in found]
    saved_stats = {k: v.clone() for k, v in model.state_dict().items()}
    t_logits = teacher_logits(teacher, batches)
    model.eval()
    with torch.no_grad():
        kl_before = float(mean_kl(model, batches, t_logits))
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    for p in scalars:
        p.requires_grad_(True)
    try:
        with batch_stats(units):
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
        _reestimate_stats(units, model, batches)
        with torch.no_grad():
            kl_after = float(mean_kl(model, batches, t_logits))
        if not kl_after <= kl_before:  # never leave the model worse on the data it was fitted to
            model.load_state_dict(saved_stats)
            kl_after = kl_before
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
        model.eval()
    fits = [UnitFit(u, before[2 * i], before[2 * i + 1], float(s.a.detach()), float(s.b.detach()))
            for i, (u, s) in enumerate(found.items())]
    return Calibration(fits, kl_before, kl_after)
