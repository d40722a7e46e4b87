"""Selection under a latency budget, checked on the assembled model.

The candidate table measures each unit's change alone, and whole-model latency is not their sum: fixed per-node
costs do not shrink when a conv becomes a pool, and a small unit's change is within timing noise. The table's
errors are not one factor either (resnet50 at 32px in ONNX Runtime: a 2-unit plan the table put at 0.89 of the
original's latency ran at 0.96, the 15-unit fastest plan, put at 0.51, ran at 0.70). What does hold is order:
the lower the budget the table is solved for, the faster the assembled plan runs. So the budget is met by
bracketing the table's budget ``t`` between plans that were timed:

1. solve for ``t = budget`` and time the assembled plan against the original, interleaved (a budget the table
   cannot meet starts from its fastest plan, timed: the table only ranks, and its savings can be smaller than
   the assembled model's as well as larger);
2. after a miss, time the table's fastest plan once (predicted: its table ratio scaled by how far off the table
   was for the first plan, measured over table ratio): if even it misses, no plan meets the budget; otherwise it
   and the missed plan bracket the answer;
3. interpolate, between the bracket's two timed plans, the ``t`` whose plan should run at the budget; solve,
   time, narrow the bracket; until a plan lands within ``tolerance`` under the budget, at most ``checks`` times.

A plan's predicted latency comes only from plans timed before it (the table's own figure for the first), so
predicted against measured stays an honest check. The plan returned is the one with the least
predicted drop among those that met the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from repconv.errors import OptionError, PlanError
from repconv.search.select import Selection, fastest, select
from repconv.search.table import CandidateTable


@dataclass
class Probe:
    """One assembled plan, timed (ratios of the original's latency)."""

    choice: dict[str, str]
    table_budget: float  # the budget the table was solved for (the fastest plan: its own ratio)
    table_ratio: float  # what the table alone predicts for this plan
    predicted_ratio: float  # the prediction before timing it: the table's, or interpolated between timed plans
    measured_ratio: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MeasuredSelection:
    selection: Selection
    probes: list[Probe] = field(default_factory=list)

    @property
    def probe(self) -> Probe | None:
        """The timing of the selected plan (None: nothing was timed)."""
        return next((p for p in reversed(self.probes) if p.choice == self.selection.choice), None)

    @property
    def predicted_ratio(self) -> float:
        return self.probe.predicted_ratio if self.probe else self.selection.predicted_ratio

    @property
    def measured_ratio(self) -> float:
        return self.probe.measured_ratio if self.probe else 1.0


def interpolate(lo: Probe, hi: Probe, table_budget: float) -> float:
    """The measured ratio linearly interpolated between two timed plans at ``table_budget`` (clamped to them)."""
    if hi.table_budget == lo.table_budget:
        return lo.measured_ratio
    w = min(max((table_budget - lo.table_budget) / (hi.table_budget - lo.table_budget), 0.0), 1.0)
    return lo.measured_ratio + w * (hi.measured_ratio - lo.measured_ratio)


def rescaled(sel: Selection, timed: Probe) -> float:
    """The table's ratio for ``sel`` scaled by how far off it was for a timed plan (measured over table ratio):
    the prediction for a plan that no bracket holds yet (the table's own figure when it gives no scale)."""
    if timed.table_ratio <= 0 or not timed.choice:
        return sel.predicted_ratio
    return sel.predicted_ratio * timed.measured_ratio / timed.table_ratio


def check_latency_options(checks: int, tolerance: float) -> None:
    """Raise OptionError unless ``checks`` (plans timed after the first) and ``tolerance`` (a fraction) make sense."""
    if checks < 0:
        raise OptionError("latency_checks", checks, "is negative",
                          "give 0 (keep the candidate table's plan) or the number of plans to time, e.g. 3")
    if not 0 <= tolerance < 1:
        raise OptionError("latency_tolerance", tolerance, "is not a fraction in [0, 1)",
                          "give e.g. 0.03 (3% over the budget still meets it)")


def select_measured(table: CandidateTable, latency_budget: float, measure: Callable[[dict[str, str]], float], *,
                    checks: int = 3, tolerance: float = 0.03,
                    progress: Callable[[str], None] | None = None) -> MeasuredSelection:
    """The plan with the least predicted drop whose assembled model, timed by ``measure(choice) -> ratio of the
    original's latency``, met ``latency_budget`` within ``tolerance`` (a fraction of it); at most ``checks`` plans
    are timed after the first (``checks=0``: the table's plan, timed once and kept whatever it measured). Raises
    PlanError when the table's fastest plan, timed, misses the budget (with ``checks=0``: when the table alone
    cannot meet it)."""
    check_latency_options(checks, tolerance)
    say = progress or (lambda _m: None)
    limit, close = latency_budget * (1 + tolerance), latency_budget * (1 - tolerance)
    probes: list[Probe] = []
    met: list[tuple[Selection, Probe]] = []

    def timed(sel: Selection, t: float, predicted: float) -> Probe:
        ratio = measure(sel.choice) if sel.choice else 1.0  # no change: the original itself
        probes.append(Probe(dict(sel.choice), t, sel.predicted_ratio, predicted, ratio))
        say(f"assembled plan of {len(sel.choice)} units: predicted {predicted:.3f}, measured {ratio:.3f} of the "
            f"original's latency (budget {latency_budget})")
        if ratio <= limit:
            met.append((sel, probes[-1]))
        return probes[-1]

    quickest = fastest(table)

    def refuse(anchor: Probe) -> PlanError:
        return PlanError(f"no plan meets {{option}} {latency_budget} when measured: the fastest plan the candidate "
                         f"table allows ({len(quickest.choice)} units converted, predicted drop "
                         f"{quickest.predicted_drop:.1f} points) ran at {anchor.measured_ratio:.3f} of the "
                         f"original's latency", f"give {{option}} {anchor.measured_ratio:.2f} or more, or a maximum "
                         "drop instead", option="latency_budget")

    original = Probe({}, 1.0, 1.0, 1.0, 1.0)
    try:
        sel = select(table, latency_budget=latency_budget)
    except PlanError:  # the table cannot meet it; it only ranks, so its fastest plan is timed before refusing
        if checks == 0:
            raise
        first = timed(quickest, quickest.predicted_ratio, quickest.predicted_ratio)
        if first.measured_ratio > limit:
            raise refuse(first) from None
        if first.measured_ratio >= close:
            return MeasuredSelection(replace(quickest, latency_budget=latency_budget), probes)
        lo, hi = first, original
    else:
        first = timed(sel, latency_budget, sel.predicted_ratio)
        if checks == 0 or close <= first.measured_ratio <= limit:
            return MeasuredSelection(sel, probes)
        if first.measured_ratio <= limit:  # met with room to spare: bracket towards the original
            lo, hi = first, original
        else:
            anchor = timed(quickest, quickest.predicted_ratio, rescaled(quickest, first))
            if anchor.measured_ratio > limit:
                raise refuse(anchor)
            lo, hi = anchor, first
    for _ in range(checks - len(probes) + 1):
        if hi.measured_ratio == lo.measured_ratio:
            break
        # the table budget whose plan should run at the budget, kept off the bracket's ends
        w = (latency_budget - lo.measured_ratio) / (hi.measured_ratio - lo.measured_ratio)
        t = lo.table_budget + min(max(w, 0.1), 0.9) * (hi.table_budget - lo.table_budget)
        t = max(t, 1e-6)  # the table can put its fastest plan below 0 (noisy deltas of a tiny model add up past it)
        try:
            sel = select(table, latency_budget=t)
        except PlanError:
            break
        if any(p.choice == sel.choice for p in probes):
            break
        probe = timed(sel, t, interpolate(lo, hi, t))
        if close <= probe.measured_ratio <= limit:
            break
        lo, hi = (probe, hi) if probe.measured_ratio <= latency_budget else (lo, probe)
    if not met:
        raise PlanError(f"no plan met {{option}} {latency_budget} when measured: {len(probes)} assembled plan(s) ran "
                        f"at {', '.join(f'{p.measured_ratio:.3f}' for p in probes)} of the original's latency",
                        f"give {{option}} {min(p.measured_ratio for p in probes):.2f} or more, or a maximum drop "
                        "instead", option="latency_budget")
    sel, _ = min(met, key=lambda m: m[0].predicted_drop)
    return MeasuredSelection(replace(sel, latency_budget=latency_budget), probes)  # the user's, not the bracket's
