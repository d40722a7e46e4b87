"""Selection by integer programming on synthetic candidate tables with a known optimum."""

from __future__ import annotations

import itertools

import pytest
from helpers import BASE, SPEC, make_table

from repconv.errors import OptionError, PlanError
from repconv.search.candidates import KEEP, assemble_plan
from repconv.search.select import fastest, select


def brute_force(spec, feasible, objective):
    best = None
    for combo in itertools.product(*[[KEEP, *c] for c in spec.values()]):
        delta = sum(spec[u][c][0] for u, c in zip(spec, combo, strict=True) if c != KEEP)
        damage = sum(spec[u][c][1] for u, c in zip(spec, combo, strict=True) if c != KEEP)
        slower = any(c != KEEP and spec[u][c][0] > 0 for u, c in zip(spec, combo, strict=True))
        if slower or not feasible(delta, damage):
            continue
        score = objective(delta, damage)
        if best is None or score < best[0] - 1e-12:
            best = (score, delta, damage)
    return best


@pytest.mark.parametrize("budget", [0.95, 0.8, 0.7, 0.6, 0.5])
def test_latency_budget_matches_brute_force(budget):
    sel = select(make_table(), latency_budget=budget)
    best = brute_force(SPEC, lambda d, _: BASE + d <= budget * BASE + 1e-9, lambda d, g: g)
    assert sel.predicted_drop == pytest.approx(best[2])
    assert sel.predicted_latency_ms <= budget * BASE + 1e-9
    assert "slow" not in sel.choice.values()


@pytest.mark.parametrize("drop", [0.0, 0.5, 1.7, 4.0, 100.0])
def test_max_drop_matches_brute_force(drop):
    sel = select(make_table(), max_drop=drop)
    best = brute_force(SPEC, lambda _, g: g <= drop + 1e-9, lambda d, g: d)
    assert sel.predicted_latency_ms - BASE == pytest.approx(best[1])
    assert sel.predicted_drop <= drop + 1e-9


def test_never_slower_than_keeping():
    sel = select(make_table(), max_drop=100.0)
    assert sel.choice.get("u2") == "pf-max"
    assert "u2:slow" in sel.excluded_slower
    assert select(make_table({"u": {"slow": (1.0, 0.0)}}), max_drop=5).choice == {}


def test_infeasible_budget_names_the_fastest_plan():
    best = fastest(make_table())
    assert best.predicted_latency_ms == pytest.approx(BASE - 3 - 4 - 2 - 1.5)
    with pytest.raises(PlanError, match=r"fastest plan .* 0\.475 .* drop of 12\.0 points"):
        select(make_table(), latency_budget=0.3)


def test_bad_budgets():
    with pytest.raises(OptionError):
        select(make_table())
    with pytest.raises(OptionError):
        select(make_table(), latency_budget=0.5, max_drop=1)
    with pytest.raises(OptionError):
        select(make_table(), max_drop=-1)


def test_replaced_unit_keeps_its_neighbours():
    spec = {"b0": {"pf-max": (-2.0, 0.1)}, "b1": {"replace": (0.0, 0.0), "pf-max": (-2.0, 0.1)},
            "b2": {"pf-max": (-2.0, 0.1)}}
    table = make_table(spec, neighbours={"b1": ("b0", "b2")})
    # a replaced unit buys no latency: with ties broken towards keeping, it is never chosen for nothing
    sel = select(table, latency_budget=0.7)
    assert sel.choice == {"b0": "pf-max", "b1": "pf-max", "b2": "pf-max"}
    table.figures["b1:replace"].latency_delta_ms = -5.0  # hypothetically fast: then b0 and b2 must be kept
    sel = select(table, max_drop=0.0)
    assert sel.choice == {"b1": "replace"}
    plan = assemble_plan(table.units, sel.choice)
    assert [s.kind for s in plan.steps] == ["replace"]
