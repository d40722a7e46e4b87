"""The plans a searched plan races: the uniform policies that meet the same latency budget, and the other plans the
budget check timed and found within it.

The candidate table scores each unit alone, and adds the scores. Damages compound: on a converged resnet50 at
32px, the plan solved for 0.7 of the original's latency pooled all three stride-2 units and ended 2.8 points
below pf-hybrid, which ran at 0.72 and keeps their convs (docs/results.md 2.7i). The table cannot see that; the
recovery's first epoch did: after it that plan stood at 17.1% on the hold-out, pf-hybrid at 55.1%. So ``search``
trains each contender, each with its own starts (refit or not), through the first epoch(s) of the global stage
(:mod:`repconv.train.race`), and the best goes on. That judge misses a plan that starts slowly and overtakes
(2.7j: pf-hybrid at 32% after one epoch against the table plan's 72% ended 1.4 points above it).

A uniform policy is a contender only when the table can express its plan (every step of ``convert``'s plan for
it is one of the table's candidates; steps outside the table's units are left out, as the search leaves those
units alone) and when its assembled model, timed like every probe, meets the budget.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from torch import nn

from repconv.errors import NothingToReplace
from repconv.options import Rival
from repconv.search.candidates import KEEP, UnitCandidates
from repconv.search.measured import MeasuredSelection, Probe, rescaled
from repconv.search.select import Selection, score
from repconv.search.table import CandidateTable

SEARCHED = "searched"
POLICIES: dict[str, dict] = {"pf-all": {"method": "parameter-free", "pf_policy": "all"},
                             "pf-hybrid": {"method": "parameter-free", "pf_policy": "hybrid"},
                             "replace-every-2": {"method": "replacement", "every": 2}}


@dataclass
class Contender:
    """One plan in the race: ``searched`` (the table's), ``searched-2``... (other plans that met the budget when
    timed) or a uniform policy's name."""

    name: str
    selection: Selection
    probe: Probe | None  # its timing (None: not timed, a maximum-drop search)

    def to_dict(self) -> dict:
        return {"name": self.name, "choice": dict(self.selection.choice), "predicted_drop":
                self.selection.predicted_drop, "table_ratio": self.selection.predicted_ratio,
                "predicted_ratio": self.probe.predicted_ratio if self.probe else self.selection.predicted_ratio,
                "measured_ratio": self.probe.measured_ratio if self.probe else None}


def _key(step) -> str:
    return json.dumps({"kind": step.kind, **asdict(step)}, sort_keys=True)


def _inside(target: str, unit: str) -> bool:
    return target == unit or target.startswith(unit + ".")


def policy_choice(model: nn.Module, units: Sequence[UnitCandidates], policy: str,
                  leaves: Sequence[str] = ()) -> dict[str, str] | None:
    """The table's choice (unit -> candidate) that makes ``policy``'s plan, as ``convert`` plans it, on the
    table's units; None when a step of that plan inside those units is none of their candidates, or the plan
    changes none of them."""
    from repconv.conversion import ConvertOptions, plan_conversion

    try:
        plan, _ = plan_conversion(model, ConvertOptions(**POLICIES[policy], leaves=list(leaves)))
    except NothingToReplace:
        return None
    wanted = {_key(s): getattr(s, "unit", None) or s.target for s in plan.steps}
    choice: dict[str, str] = {}
    for u in units:
        inside = {k for k, target in wanted.items() if _inside(target, u.unit)}
        if not inside:
            continue
        match = [c for c in u.candidates if c.name != KEEP and {_key(s) for s in c.steps} == inside]
        if not match:
            return None
        choice[u.unit] = match[0].name
    return choice or None


def contenders(table: CandidateTable, chosen: MeasuredSelection, latency_budget: float, tolerance: float,
               measure: Callable[[dict[str, str]], float], *, model: nn.Module, rivals: Sequence[Rival],
               limit: int, leaves: Sequence[str] = (),
               say: Callable[[str], None] = lambda _m: None) -> list[Contender]:
    """The plans that race for ``latency_budget``, at most ``limit``: the chosen plan first, then each of
    ``rivals`` whose assembled model, timed by ``measure(choice) -> ratio``, meets the budget within
    ``tolerance``, then the other timed plans that met it, least predicted drop first."""
    out = [Contender(SEARCHED, chosen.selection, chosen.probe)]
    seen = [chosen.selection.choice]
    first = chosen.probes[0] if chosen.probes else None
    limit_ratio = latency_budget * (1 + tolerance)
    for policy in rivals:
        if len(out) >= limit:
            return out
        choice = policy_choice(model, table.units, policy, leaves)
        if choice is None or choice in seen:
            continue
        sel = score(table, choice, latency_budget=latency_budget)
        predicted = rescaled(sel, first) if first else sel.predicted_ratio
        probe = Probe(choice, sel.predicted_ratio, sel.predicted_ratio, predicted, measure(choice))
        met = probe.measured_ratio <= limit_ratio
        say(f"uniform policy {policy} ({len(choice)} units): measured {probe.measured_ratio:.3f} of the original's "
            f"latency: {'races the searched plan' if met else 'misses the budget'}")
        if met:
            out.append(Contender(policy, sel, probe))
            seen.append(choice)
    others = [(score(table, p.choice, latency_budget=latency_budget), p) for p in chosen.probes
              if p.choice and p.measured_ratio <= limit_ratio and p.choice not in seen]
    n = 1
    for sel, probe in sorted(others, key=lambda sp: sp[0].predicted_drop):
        if len(out) >= limit:
            break
        if sel.choice not in seen:
            n += 1
            out.append(Contender(f"{SEARCHED}-{n}", sel, probe))
            seen.append(sel.choice)
    return out
