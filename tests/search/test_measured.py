"""The latency loop on synthetic tables: a known whole-model latency that is not the sum of the units'."""

from __future__ import annotations

import pytest
from helpers import BASE, make_table

from repconv.errors import OptionError, PlanError
from repconv.search.measured import Probe, fit_scale, select_measured
from repconv.search.select import fastest, select


def whole_model(scale: float, per_unit: float = 0.0):
    """A measured ratio: the table's saving times ``scale``, less ``per_unit`` of it per converted unit; records
    every plan it was asked to time."""
    table = make_table()
    calls: list[dict] = []

    def measure(choice: dict[str, str]) -> float:
        calls.append(dict(choice))
        saving = -sum(table.figure(next(c for c in u.candidates if c.name == choice[u.unit])).latency_delta_ms
                      for u in table.units if u.unit in choice) / BASE
        return 1 - scale * saving + per_unit * len(choice)

    return measure, calls


def test_a_plan_within_budget_is_measured_once_and_kept():
    measure, calls = whole_model(1.0)  # the table is exact: refitting changes nothing
    got = select_measured(make_table(), 0.8, measure)
    assert len(calls) == 1 and got.selection.choice == select(make_table(), latency_budget=0.8).choice
    assert got.measured_ratio == pytest.approx(got.selection.predicted_ratio)


def test_savings_that_shrink_in_the_whole_model_are_anchored_fitted_and_the_budget_met():
    measure, calls = whole_model(0.6)
    got = select_measured(make_table(), 0.8, measure)
    first, anchor, third = got.probes
    assert first.measured_ratio > 0.8 * 1.03  # the table's plan misses
    assert anchor.choice == fastest(make_table()).choice and anchor.measured_ratio <= 0.8  # then the fastest plan
    assert third.savings_scale == pytest.approx(0.6)  # fitted on the first two only: an honest prediction
    assert third.predicted_ratio == pytest.approx(third.measured_ratio) and third.measured_ratio <= 0.8
    # the least predicted drop among the plans that met the budget: the re-solved one, not the fastest
    assert got.selection.choice == select(make_table(), latency_budget=0.8, savings_scale=0.6).choice == third.choice
    assert got.selection.predicted_drop < fastest(make_table()).predicted_drop and len(calls) == 3


def test_a_budget_no_plan_meets_when_measured_names_the_fastest():
    measure, calls = whole_model(0.5)  # the fastest plan saves 0.525 in the table, 0.26 in the whole model
    expected = r"fastest plan .*4 units converted, predicted drop 12\.0 points\) ran at 0\.738 .*0\.74 or more"
    with pytest.raises(PlanError, match=expected):
        select_measured(make_table(), 0.6, measure)
    assert len(calls) == 2  # the table's plan, then the fastest: no more is needed to know


def test_fixed_costs_per_unit_are_absorbed_by_the_fitted_scale():
    measure, calls = whole_model(0.7, per_unit=0.01)  # not a pure scale: each converted unit costs 1% back
    got = select_measured(make_table(), 0.8, measure, checks=3)
    assert got.measured_ratio <= 0.8 * 1.03 and len(got.probes) == len(calls) <= 4
    for i, probe in enumerate(got.probes):  # each prediction used only the plans timed before it
        assert probe.savings_scale == pytest.approx(fit_scale(got.probes[:i]))


def test_no_checks_trusts_the_table_and_no_change_is_not_timed():
    measure, calls = whole_model(0.5)
    got = select_measured(make_table(), 0.8, measure, checks=0)
    assert len(calls) == 1 and got.measured_ratio > 0.8  # measured, reported, kept
    got = select_measured(make_table(), 1.0, measure)
    assert got.selection.choice == {} and len(calls) == 1 and got.measured_ratio == 1.0


def test_fit_scale_and_bad_options():
    probes = [Probe({"a": "pf-max"}, 0.8, 0.9, 1.0), Probe({"b": "pf-max"}, 0.7, 0.85, 0.5)]
    # table savings 0.2 and 0.6; measured 0.1 and 0.15: least squares through the origin
    assert fit_scale(probes) == pytest.approx((0.2 * 0.1 + 0.6 * 0.15) / (0.2**2 + 0.6**2))
    assert fit_scale([]) == 1.0
    measure, _ = whole_model(1.0)
    with pytest.raises(OptionError):
        select_measured(make_table(), 0.8, measure, checks=-1)
    with pytest.raises(OptionError):
        select_measured(make_table(), 0.8, measure, tolerance=1.5)
    with pytest.raises(OptionError):
        select(make_table(), latency_budget=0.8, savings_scale=0.0)
