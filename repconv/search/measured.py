"""Selection under a latency budget, checked on the assembled model.

The candidate table measures each unit's change alone, and whole-model latency is not their sum: fixed per-node
costs (launches, layout changes, memory traffic between units) do not shrink when a conv becomes a pool, so the
table over-predicts the saving of large plans (resnet50 at 32px in ONNX Runtime: a plan predicted at 0.60 of the
original ran at 0.77). The loop here closes that gap with one fitted number:

1. solve with the table's savings scaled by ``s`` (``s = 1`` first);
2. measure the assembled plan against the original, interleaved;
3. stop when it meets the budget (within ``tolerance``); otherwise fit ``s`` by least squares through the
   origin on every plan measured so far (measured saving against the table's saving) and solve again.

Each plan's prediction uses only the plans measured before it, so predicted against measured stays an honest
check. A budget that no plan meets once corrected raises PlanError naming the fastest plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from repconv.errors import OptionError, PlanError
from repconv.search.select import Selection, fastest, select
from repconv.search.table import CandidateTable

# a fitted scale outside this range means the measurements are noise, not a correction
MIN_SCALE, MAX_SCALE = 0.05, 2.0


@dataclass
class Probe:
    """One assembled plan, predicted then measured (ratios of the original's latency)."""

    choice: dict[str, str]
    predicted_ratio: float
    measured_ratio: float
    savings_scale: float  # the scale its prediction used

    @property
    def table_saving(self) -> float:
        """The saving the table alone predicts (fraction of the original's latency)."""
        return (1 - self.predicted_ratio) / self.savings_scale

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MeasuredSelection:
    selection: Selection
    probes: list[Probe] = field(default_factory=list)

    @property
    def measured_ratio(self) -> float:
        return self.probes[-1].measured_ratio if self.probes else 1.0


def fit_scale(probes: list[Probe]) -> float:
    """Least squares through the origin: measured saving = s * table saving, over the probes that save anything."""
    pairs = [(p.table_saving, 1 - p.measured_ratio) for p in probes if p.table_saving > 0]
    if not pairs:
        return 1.0
    s = sum(t * m for t, m in pairs) / sum(t * t for t, _ in pairs)
    return min(max(s, MIN_SCALE), MAX_SCALE)


def select_measured(table: CandidateTable, latency_budget: float, measure: Callable[[dict[str, str]], float], *,
                    checks: int = 3, tolerance: float = 0.03,
                    progress: Callable[[str], None] | None = None) -> MeasuredSelection:
    """The selection for ``latency_budget`` whose assembled model, timed by ``measure(choice) -> ratio of the
    original's latency``, meets the budget within ``tolerance`` (a fraction of it), re-solving at most ``checks``
    times with the fitted savings scale. ``checks=0`` measures the table's plan once and keeps it."""
    if checks < 0:
        raise OptionError("latency_checks", checks, "is negative", "give 0 (trust the table) or more re-solves")
    if not 0 <= tolerance < 1:
        raise OptionError("latency_tolerance", tolerance, "is not a fraction in [0, 1)", "give e.g. 0.03")
    say = progress or (lambda _m: None)
    limit = latency_budget * (1 + tolerance)
    probes: list[Probe] = []
    scale = 1.0
    for _ in range(checks + 1):
        try:
            sel = select(table, latency_budget=latency_budget, savings_scale=scale)
        except PlanError:
            if not probes:  # the table alone cannot meet it: select's message names the fastest plan
                raise
            break  # the measured savings put the budget out of reach
        if any(p.choice == sel.choice for p in probes):  # the fitted scale led back to a plan already timed
            break
        ratio = measure(sel.choice) if sel.choice else 1.0  # no change: the original itself
        probes.append(Probe(dict(sel.choice), sel.predicted_ratio, ratio, scale))
        say(f"assembled plan of {len(sel.choice)} units: predicted {sel.predicted_ratio:.3f}, measured {ratio:.3f} "
            f"of the original's latency (budget {latency_budget})")
        if ratio <= limit or checks == 0:
            return MeasuredSelection(sel, probes)
        scale = fit_scale(probes)
    best = fastest(table, savings_scale=scale)
    quickest = min(probes, key=lambda p: p.measured_ratio)
    raise PlanError(f"no plan met {{option}} {latency_budget} when measured: {len(probes)} assembled plan(s) ran at "
                    f"{', '.join(f'{p.measured_ratio:.3f}' for p in probes)} of the original's latency, so the "
                    f"table's savings shrink to {scale:.2f}x in the whole model; the fastest plan is then predicted at "
                    f"{best.predicted_ratio:.3f} ({len(best.choice)} units converted, predicted drop "
                    f"{best.predicted_drop:.1f} points)",
                    f"give {{option}} {min(best.predicted_ratio, quickest.measured_ratio):.2f} or more, "
                    "or a maximum drop instead", option="latency_budget")
