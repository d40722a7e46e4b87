"""Function-space calibration of Replacement Learning scalars, and measured unit selection.

A replaced unit computes ``f(x; a*P_prev + b*P_next)``. Weight-space fits of pretrained neighbours are
poor (METHODS.md section 1), so ``a, b`` are fitted where it matters: on the unit's *output*. The
teacher (original model) is run on a few batches with forward hooks that record each unit's input and
output; the teacher's own unit module is then re-run with synthesized parameters
(``torch.func.functional_call``) and ``(a, b)`` minimize the relative squared output error with LBFGS.
The problem has two unknowns, so a handful of batches and iterations suffice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from repconv.convert.graph import Run
from repconv.convert.plan import ReplaceStep
from repconv.convert.replacement import replaced_units, synthesize
from repconv.errors import ArchError

# Starting points tried before LBFGS (the problem is not convex in (a, b)); the current value is added.
_STARTS = ((0.5, 0.5), (1.0, 0.0), (0.0, 1.0))


@dataclass
class UnitFit:
    """One unit's scalars and relative output error (||f - y|| / ||y||) before and after the fit."""

    unit: str
    a_before: float
    b_before: float
    a: float
    b: float
    error_before: float
    error_after: float


@dataclass
class UnitDamage:
    """A candidate unit and the KL(teacher || model) its replacement alone causes on calibration data."""

    unit: str
    prev: str
    next: str
    kl: float
    a: float
    b: float
    output_error: float


# ---------------------------------------------------------------- recording the teacher


@dataclass
class _Record:
    args: tuple
    kwargs: dict
    output: object


def record_units(teacher: nn.Module, units: Sequence[str], batches: Iterable[torch.Tensor]
                 ) -> tuple[dict[str, list[_Record]], list[torch.Tensor]]:
    """Each unit's inputs and outputs on every batch (forward hooks), and the teacher's logits."""
    records: dict[str, list[_Record]] = {u: [] for u in units}
    logits = []

    def hook(unit):
        def fn(_module, args, kwargs, output):
            detach = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
            records[unit].append(_Record(tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()},
                                         torch.utils._pytree.tree_map(detach, output)))
        return fn

    handles = []
    for u in units:
        try:
            module = teacher.get_submodule(u)
        except AttributeError as exc:
            raise ArchError(f"the teacher has no module '{u}' (a replaced unit of the converted model)",
                            "give with --teacher the original checkpoint the model was converted from") from exc
        handles.append(module.register_forward_hook(hook(u), with_kwargs=True))
    try:
        teacher.eval()
        with torch.no_grad():
            for x in batches:
                logits.append(teacher(x))
    finally:
        for h in handles:
            h.remove()
    return records, logits


# ---------------------------------------------------------------- fitting one unit


def _unit_fn(unit_module: nn.Module, names: Sequence[str], prev: dict[str, torch.Tensor],
             next: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> Callable:
    """``(a, b, record) -> output`` of the unit run with synthesized parameters."""

    def run(a: torch.Tensor, b: torch.Tensor, rec: _Record):
        params = {n: synthesize(a, b, prev[n], next[n]) for n in names}
        return torch.func.functional_call(unit_module, {**buffers, **params}, rec.args, rec.kwargs)

    return run


def _relative_error(run: Callable, a: torch.Tensor, b: torch.Tensor, records: Sequence[_Record]) -> torch.Tensor:
    num = den = 0.0
    for rec in records:
        for out, ref in zip(tree_leaves(run(a, b, rec)), tree_leaves(rec.output), strict=True):
            if isinstance(ref, torch.Tensor) and ref.is_floating_point():
                num = num + (out - ref).pow(2).sum()
                den = den + ref.pow(2).sum()
    return num / max(float(den), 1e-30)


def fit_scalars(run: Callable, records: Sequence[_Record], a0: float, b0: float,
                max_iter: int = 40) -> tuple[float, float, float, float]:
    """LBFGS on (a, b) from the best of a few starts; returns (a, b, error before, error after)."""
    def err(a, b):
        with torch.no_grad():
            return float(_relative_error(run, torch.tensor(a), torch.tensor(b), records)) ** 0.5

    before = err(a0, b0)
    start = min(((a0, b0), *_STARTS), key=lambda ab: err(*ab))
    a = torch.tensor(start[0], requires_grad=True)
    b = torch.tensor(start[1], requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _relative_error(run, a, b, records)
        loss.backward()
        return loss

    opt.step(closure)
    a1, b1 = float(a.detach()), float(b.detach())
    after = err(a1, b1)
    if not after <= min(before, err(*start)):  # LBFGS went astray (or NaN): keep the best point seen
        a1, b1 = min(((a0, b0), start), key=lambda ab: err(*ab))
        after = err(a1, b1)
    return a1, b1, before, after


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in module.named_parameters()}


def calibrate_units(model: nn.Module, teacher: nn.Module, batches: Sequence[torch.Tensor],
                    max_iter: int = 40) -> list[UnitFit]:
    """Fit every replaced unit of ``model`` in place; neighbours and buffers are the model's own."""
    units = replaced_units(model)
    records, _ = record_units(teacher, list(units), batches)
    fits = []
    for unit, s in units.items():
        run = _unit_fn(teacher.get_submodule(unit), s.param_names, _params(model.get_submodule(s.prev)),
                       _params(model.get_submodule(s.next)), dict(model.get_submodule(unit).named_buffers()))
        a0, b0 = float(s.a), float(s.b)
        a, b, before, after = fit_scalars(run, records[unit], a0, b0, max_iter)
        with torch.no_grad():
            s.a.fill_(a)
            s.b.fill_(b)
        fits.append(UnitFit(unit, a0, b0, a, b, before, after))
        records[unit] = []  # free the unit's activations early
    return fits


# ---------------------------------------------------------------- measured selection


def candidate_steps(runs: Sequence[Run]) -> list[ReplaceStep]:
    """Every interior member of every run, with its two neighbours."""
    return [ReplaceStep(m, r.members[i - 1], r.members[i + 1])
            for r in runs for i, m in enumerate(r.members[1:-1], start=1)]


def kl_to_teacher(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) of the softmax outputs, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits.float(), 1), F.log_softmax(teacher_logits.float(), 1),
                    reduction="batchmean", log_target=True)


def measure_damage(teacher: nn.Module, candidates: Sequence[ReplaceStep], batches: Sequence[torch.Tensor],
                   max_iter: int = 40) -> list[UnitDamage]:
    """Each candidate replaced alone (scalars fitted in function space): its KL to the teacher's logits.

    The replaced unit is simulated on the teacher itself with a forward hook that swaps in the synthesized
    unit's output, so no converted model is built per candidate.
    """
    records, teacher_logits = record_units(teacher, [c.unit for c in candidates], batches)
    out = []
    for c in candidates:
        unit_module = teacher.get_submodule(c.unit)
        names = [n for n, _ in unit_module.named_parameters()]
        run = _unit_fn(unit_module, names, _params(teacher.get_submodule(c.prev)),
                       _params(teacher.get_submodule(c.next)), {})
        a, b, _, err = fit_scalars(run, records[c.unit], 0.5, 0.5, max_iter)
        hook = unit_module.register_forward_hook(_swap_output(run, a, b), with_kwargs=True)
        try:
            with torch.no_grad():
                kl = sum(float(kl_to_teacher(teacher(x), t)) * len(x) for x, t in zip(batches, teacher_logits,
                                                                                     strict=True))
        finally:
            hook.remove()
        out.append(UnitDamage(c.unit, c.prev, c.next, kl / sum(len(x) for x in batches), a, b, err))
        records[c.unit] = []
    return out


def _swap_output(run: Callable, a: float, b: float) -> Callable:
    at, bt = torch.tensor(a), torch.tensor(b)
    return lambda _module, args, kwargs, _output: run(at, bt, _Record(args, kwargs, None))


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
