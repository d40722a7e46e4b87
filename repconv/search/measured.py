"""Selection under a latency budget, checked on the assembled model.

The candidate table measures each unit's change alone, and whole-model latency is not their sum: fixed per-node
costs (launches, layout changes, memory traffic between units) do not shrink when a conv becomes a pool, so the
table over-predicts the saving of large plans (resnet50 at 32px in ONNX Runtime: a plan predicted at 0.60 of the
original ran at 0.77; on a converged resnet50 a 2-unit plan predicted at 0.90 ran at 1.00). The loop here
closes that gap with the assembled models themselves:

1. solve with the table's savings scaled by ``s`` (``s = 1`` first) and time the assembled plan against the
   original, interleaved;
2. after a miss, time the table's fastest plan once: the largest saving anchors ``s`` against timing noise, and if
   even the fastest plan misses the budget, no plan meets it;
3. fit ``s`` by least squares through the origin on every plan timed (measured saving against the table's) and
   solve again, until a plan lands within ``tolerance`` under the budget; the plan returned is the one with the
   least predicted drop among those that met it.

Each plan's prediction uses only the plans timed before it, so predicted against measured stays an honest check.
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
        """What the selected plan measured when it was chosen (1.0: nothing timed, the original)."""
        return next((p.measured_ratio for p in reversed(self.probes) if p.choice == self.selection.choice), 1.0)


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
    """The plan with the least predicted drop whose assembled model, timed by ``measure(choice) -> ratio of the
    original's latency``, met ``latency_budget`` within ``tolerance`` (a fraction of it). At most ``checks`` plans
    are timed after the first (``checks=0``: the table's plan, timed once and kept whatever it measured):

    * after a plan misses the budget, the table's fastest plan is timed once: its large saving anchors the fitted
      scale, and if even it misses, no plan can meet the budget (PlanError);
    * otherwise the scale is refitted on every plan timed and the budget solved again, until a plan lands within
      ``tolerance`` under the budget (one far under it converts more than it needs to)."""
    if checks < 0:
        raise OptionError("latency_checks", checks, "is negative", "give 0 (trust the table) or more re-solves")
    if not 0 <= tolerance < 1:
        raise OptionError("latency_tolerance", tolerance, "is not a fraction in [0, 1)", "give e.g. 0.03")
    say = progress or (lambda _m: None)
    limit, close = latency_budget * (1 + tolerance), latency_budget * (1 - tolerance)
    probes: list[Probe] = []
    kept: tuple[Selection, Probe] | None = None  # the least predicted drop among the plans that met the budget
    scale, anchored = 1.0, False

    def timed(sel: Selection) -> Probe:
        ratio = measure(sel.choice) if sel.choice else 1.0  # no change: the original itself
        probes.append(Probe(dict(sel.choice), sel.predicted_ratio, ratio, scale))
        say(f"assembled plan of {len(sel.choice)} units: predicted {sel.predicted_ratio:.3f}, measured {ratio:.3f} "
            f"of the original's latency (budget {latency_budget})")
        return probes[-1]

    def anchor() -> Selection:
        sel = fastest(table, savings_scale=scale)
        if timed(sel).measured_ratio > limit:
            raise PlanError(f"no plan meets {{option}} {latency_budget} when measured: the fastest plan the candidate "
                            f"table allows ({len(sel.choice)} units converted, predicted drop "
                            f"{sel.predicted_drop:.1f} points) ran at {probes[-1].measured_ratio:.3f} of the "
                            f"original's latency",
                            f"give {{option}} {probes[-1].measured_ratio:.2f} or more, or a maximum drop instead",
                            option="latency_budget")
        return sel

    for _ in range(checks + 1):
        if probes and probes[-1].measured_ratio > limit and not anchored and kept is None:
            sel, anchored = anchor(), True
        else:
            try:
                sel = select(table, latency_budget=latency_budget, savings_scale=scale)
            except PlanError:
                if not probes:  # the table alone cannot meet it: select's message names the fastest plan
                    raise
                sel = None  # the fitted scale puts the budget out of the table's reach
            if sel is None or any(p.choice == sel.choice for p in probes):  # nothing new to time
                if kept is not None or anchored:
                    break
                sel, anchored = anchor(), True
            else:
                timed(sel)
        probe = probes[-1]
        if probe.measured_ratio <= limit and (kept is None or sel.predicted_drop < kept[0].predicted_drop):
            kept = (sel, probe)
        if checks == 0:
            return MeasuredSelection(sel, probes)
        if close <= probe.measured_ratio <= limit:
            break
        scale = fit_scale(probes)
    if kept is None:
        raise PlanError(f"no plan met {{option}} {latency_budget} when measured: {len(probes)} assembled plan(s) ran "
                        f"at {', '.join(f'{p.measured_ratio:.3f}' for p in probes)} of the original's latency",
                        f"give {{option}} {min(p.measured_ratio for p in probes):.2f} or more, or a maximum drop "
                        "instead", option="latency_budget")
    return MeasuredSelection(kept[0], probes)
