"""Choose one candidate per unit under a budget, as an integer linear program (scipy.optimize.milp / HiGHS).

Variables ``x[u, c]`` in {0, 1}, one per candidate (``keep`` included); each unit takes exactly one. Predicted
latency is additive: ``base + sum(delta[u, c] * x[u, c])``; predicted accuracy drop is ``sum(damage * x)``.

* ``latency_budget=F``: minimise the predicted drop subject to latency <= F * base;
* ``max_drop=P``: minimise latency subject to drop <= P points.

A candidate slower than keeping its unit (delta > 0) is never chosen (its upper bound is 0); ties are broken
towards keeping (a tiny weight on the other objective). A replaced unit's neighbours must be kept, and nested
units take one form (``candidates.conflicts``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from repconv.errors import OptionError, PlanError
from repconv.search.candidates import KEEP, chosen_candidates, conflicts
from repconv.search.table import CandidateTable


@dataclass
class Selection:
    choice: dict[str, str]  # unit -> candidate, units that change only
    base_latency_ms: float
    predicted_latency_ms: float
    predicted_drop: float  # points
    latency_budget: float | None = None
    max_drop: float | None = None
    solve_s: float = 0.0
    excluded_slower: list[str] = field(default_factory=list)  # candidates never chosen: slower than keeping

    @property
    def predicted_ratio(self) -> float:
        return self.predicted_latency_ms / self.base_latency_ms if self.base_latency_ms else 1.0

    def to_dict(self) -> dict:
        return asdict(self) | {"predicted_ratio": self.predicted_ratio}


def _index(table: CandidateTable):
    cols = [(u, c) for u in table.units for c in u.candidates]
    delta = np.array([table.figure(c).latency_delta_ms for _, c in cols], dtype=float)
    damage = np.array([max(table.figure(c).damage, 0.0) for _, c in cols], dtype=float)
    return cols, delta, damage


def _constraints(table: CandidateTable, cols):
    from scipy.optimize import LinearConstraint

    n = len(cols)
    where = {(u.unit, c.name): i for i, (u, c) in enumerate(cols)}
    rows, lo, hi = [], [], []
    for unit in table.units:
        r = np.zeros(n)
        for c in unit.candidates:
            r[where[(unit.unit, c.name)]] = 1
        rows.append(r), lo.append(1), hi.append(1)
    for unit, name, other in conflicts(table.units):
        r = np.zeros(n)
        r[where[(unit, name)]] = 1
        r[where[(other, KEEP)]] -= 1
        rows.append(r), lo.append(-np.inf), hi.append(0)
    return [LinearConstraint(np.array(rows), np.array(lo), np.array(hi))]


def _solve(objective, constraints, upper):
    from scipy.optimize import Bounds, milp

    res = milp(objective, constraints=constraints, integrality=np.ones_like(objective),
               bounds=Bounds(np.zeros_like(objective), upper))
    return res if res.status == 0 and res.x is not None else None


def _selection(table, cols, delta, damage, x, **kw) -> Selection:
    chosen = x > 0.5
    choice = {u.unit: c.name for (u, c), on in zip(cols, chosen, strict=True) if on and c.name != KEEP}
    return Selection(choice, table.base_latency_ms, float(table.base_latency_ms + delta[chosen].sum()),
                     float(damage[chosen].sum()), **kw)


def score(table: CandidateTable, choice: dict[str, str], **kw) -> Selection:
    """What the table predicts for ``choice`` (unit -> candidate; units not named are kept), as a Selection
    (``kw``: its budget fields). Raises PlanError for a unit or candidate the table does not hold."""
    chosen_candidates(table.units, choice)
    cols, delta, damage = _index(table)
    x = np.array([float(choice.get(u.unit, KEEP) == c.name) for u, c in cols])
    return _selection(table, cols, delta, damage, x, **kw)


def fastest(table: CandidateTable) -> Selection:
    """The fastest plan the table allows, whatever its drop (ties: the smaller drop)."""
    cols, delta, damage = _index(table)
    upper = np.where(delta > 0, 0.0, 1.0)
    scale = max(float(np.abs(delta).sum()), 1e-9)
    res = _solve(delta / scale + 1e-6 * damage / max(damage.sum(), 1e-9), _constraints(table, cols), upper)
    if res is None:
        raise PlanError("the candidate table has no consistent plan", "rebuild the table")
    return _selection(table, cols, delta, damage, res.x)


def check_budget(latency_budget: float | None, max_drop: float | None) -> None:
    """Raise OptionError unless exactly one sensible budget is given."""
    if (latency_budget is None) == (max_drop is None):
        raise OptionError("latency_budget", None, "and the maximum drop: give exactly one of the two",
                          "for example a latency budget of 0.8")
    if latency_budget is not None and not latency_budget > 0:
        raise OptionError("latency_budget", latency_budget, "is not a positive fraction",
                          "give the target latency as a fraction of the original's, such as 0.8")
    if max_drop is not None and max_drop < 0:
        raise OptionError("max_drop", max_drop, "is negative", "give the accuracy points you accept to lose, e.g. 1")


def select(table: CandidateTable, *, latency_budget: float | None = None, max_drop: float | None = None) -> Selection:
    """One candidate per unit under ``latency_budget`` (fraction of the original's latency) or ``max_drop``
    (accuracy points); exactly one of them. Raises PlanError when no plan meets the budget."""
    check_budget(latency_budget, max_drop)
    started = time.perf_counter()
    cols, delta, damage = _index(table)
    upper = np.where(delta > 0, 0.0, 1.0)
    slower = [f"{u.unit}:{c.name}" for (u, c), d in zip(cols, delta, strict=True) if d > 0 and c.name != KEEP]
    constraints = _constraints(table, cols)
    lat_scale = max(float(np.abs(delta).sum()), 1e-9)
    dmg_scale = max(float(damage.sum()), 1e-9)
    from scipy.optimize import LinearConstraint

    if latency_budget is not None:
        constraints.append(LinearConstraint(delta[None, :], -np.inf, (latency_budget - 1) * table.base_latency_ms))
        # ties: prefer the faster plan, then keeping (a unit converted for nothing costs accuracy we did not see)
        objective = damage / dmg_scale + 1e-6 * delta / lat_scale + 1e-9 * np.array([c.name != KEEP for _, c in cols])
    else:
        constraints.append(LinearConstraint(damage[None, :], -np.inf, max_drop))
        objective = delta / lat_scale + 1e-6 * damage / dmg_scale + 1e-9 * np.array([c.name != KEEP for _, c in cols])
    res = _solve(objective, constraints, upper)
    if res is None:
        best = fastest(table)
        raise PlanError(f"no plan meets {{option}} {latency_budget}: the fastest plan the candidate table "
                        f"allows is predicted at {best.predicted_ratio:.3f} of the original's latency "
                        f"({best.predicted_latency_ms:.2f} of {best.base_latency_ms:.2f} ms) with a predicted drop "
                        f"of {best.predicted_drop:.1f} points ({len(best.choice)} units converted)",
                        f"give {{option}} {best.predicted_ratio:.3f} or more, or a maximum drop instead",
                        option="latency_budget")
    return _selection(table, cols, delta, damage, res.x, latency_budget=latency_budget, max_drop=max_drop,
                      solve_s=round(time.perf_counter() - started, 4), excluded_slower=slower)
