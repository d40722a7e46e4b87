"""How much a change hurts a model's function: KL divergence of its logits to the original's (the teacher's),
and measured unit selection for Replacement Learning (each candidate unit replaced alone, simulated on the
teacher with a forward hook, ranked by the damage it does).
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
from repconv.convert.replacement import synthesize

# Joint starting points tried for the scalars (the problem is not convex)
STARTS = ((0.5, 0.5), (1.0, 0.0), (0.0, 1.0))
_BN = nn.modules.batchnorm._BatchNorm


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


def mean_kl(model: nn.Module, batches: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor]):
    total = sum(kl_to_teacher(model(x), t) * len(x) for x, t in zip(batches, teacher_logits, strict=True))
    return total / sum(len(x) for x in batches)


def teacher_logits(teacher: nn.Module, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    teacher.eval()
    with torch.no_grad():
        return [teacher(x) for x in batches]


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
        for a, b in STARTS:
            handle = unit.register_forward_hook(_swap_output(unit, prev, next, a, b), with_kwargs=True)
            try:
                with torch.no_grad():
                    kl = float(mean_kl(teacher, batches, t_logits))
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
