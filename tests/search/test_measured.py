"""The latency loop on synthetic tables: a known whole-model latency that is not the sum of the units'."""

from __future__ import annotations

import pytest
from helpers import BASE, make_table

from repconv.errors import OptionError, PlanError
from repconv.search.measured import Probe, interpolate, select_measured
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
    measure, calls = whole_model(1.0, per_unit=0.013)  # the table's plan (0.775) runs at 0.801: within 3%
    got = select_measured(make_table(), 0.8, measure)
    assert len(calls) == 1 and got.selection.choice == select(make_table(), latency_budget=0.8).choice
    assert got.predicted_ratio == got.selection.predicted_ratio and got.measured_ratio == pytest.approx(0.801)


def test_savings_that_shrink_in_the_whole_model_are_bracketed_and_the_budget_met():
    measure, calls = whole_model(0.6)
    got = select_measured(make_table(), 0.8, measure)
    first, anchor, *rest = got.probes
    assert first.measured_ratio > 0.8 * 1.03  # the table's plan misses
    assert anchor.choice == fastest(make_table()).choice and anchor.measured_ratio <= 0.8  # then the fastest plan
    # predicted as the table's ratio scaled by the first plan's error (the table alone would be far off)
    assert anchor.predicted_ratio == pytest.approx(anchor.table_ratio * first.measured_ratio / first.table_ratio)
    assert abs(anchor.predicted_ratio / anchor.measured_ratio - 1) < abs(anchor.table_ratio / anchor.measured_ratio - 1)
    assert rest and 0.8 * 0.97 <= got.measured_ratio <= 0.8 * 1.03  # a plan between them lands at the budget
    for probe in rest:  # predicted before timing, from the plans timed before it: within 10% here
        assert probe.predicted_ratio != probe.table_ratio
        assert abs(probe.predicted_ratio / probe.measured_ratio - 1) <= 0.10
    # the least predicted drop among the plans that met the budget, not the fastest plan
    assert got.selection.predicted_drop < fastest(make_table()).predicted_drop and len(calls) == len(got.probes) <= 4
    assert got.selection.latency_budget == 0.8  # the budget asked for, not the bracket's (resume compares it)


def test_a_plan_far_under_the_budget_is_relaxed_towards_the_original():
    measure, calls = whole_model(1.6)  # savings larger than the table's: its plan runs far under the budget
    got = select_measured(make_table(), 0.85, measure)
    assert got.probes[0].measured_ratio < 0.85 * 0.97
    assert got.selection.predicted_drop <= select(make_table(), latency_budget=0.85).predicted_drop
    assert got.measured_ratio <= 0.85 * 1.03 and len(calls) <= 4


def test_a_budget_no_plan_meets_when_measured_names_the_fastest():
    measure, calls = whole_model(0.5)  # the fastest plan saves 0.525 in the table, 0.26 in the whole model
    expected = r"fastest plan .*4 units converted, predicted drop 12\.0 points\) ran at 0\.738 .*0\.74 or more"
    with pytest.raises(PlanError, match=expected):
        select_measured(make_table(), 0.6, measure)
    assert len(calls) == 2  # the table's plan, then the fastest: no more is needed to know
    with pytest.raises(PlanError, match=r"fastest plan .* ran at 0\.738 "):  # beyond the table: its fastest, timed
        select_measured(make_table(), 0.3, measure)
    assert len(calls) == 3
    with pytest.raises(PlanError, match=r"fastest plan .* 0\.475 "):  # trusting the table: nothing timed
        select_measured(make_table(), 0.3, measure, checks=0)
    assert len(calls) == 3


def test_a_budget_beyond_the_table_is_met_where_the_assembled_model_saves_more():
    measure, calls = whole_model(1.6)  # the fastest plan saves 0.525 in the table, 0.84 in the whole model
    got = select_measured(make_table(), 0.3, measure)
    assert calls[0] == fastest(make_table()).choice and got.probes[0].measured_ratio == pytest.approx(0.16)
    assert got.measured_ratio <= 0.3 * 1.03 and got.selection.latency_budget == 0.3
    assert got.selection.predicted_drop <= fastest(make_table()).predicted_drop and len(calls) <= 4


def test_a_table_that_puts_its_fastest_plan_below_zero():
    table = make_table({"u0": {"pf-max": (-15.0, 1.0)}, "u1": {"pf-max": (-10.0, 2.0)}})  # fastest: -0.25
    ratios = {("u0",): 0.95, ("u0", "u1"): 0.60, ("u1",): 0.90}
    got = select_measured(table, 0.62, lambda choice: ratios[tuple(sorted(choice))])
    assert fastest(table).predicted_ratio < 0 and got.selection.choice == {"u0": "pf-max", "u1": "pf-max"}
    assert got.measured_ratio == 0.60  # the bracket's next table budget would have been -0.16: solved at 1e-6


def test_no_checks_trusts_the_table_and_no_change_is_not_timed():
    measure, calls = whole_model(0.5)
    got = select_measured(make_table(), 0.8, measure, checks=0)
    assert len(calls) == 1 and got.measured_ratio > 0.8  # measured, reported, kept
    got = select_measured(make_table(), 1.0, measure)
    assert got.selection.choice == {} and len(calls) == 1 and got.measured_ratio == 1.0


def test_interpolation_and_bad_options():
    lo, hi = Probe({"a": "x"}, 0.5, 0.5, 0.5, 0.7), Probe({"b": "x"}, 0.9, 0.9, 0.9, 0.95)
    assert interpolate(lo, hi, 0.7) == pytest.approx(0.825) and interpolate(lo, hi, 2.0) == 0.95
    measure, _ = whole_model(1.0)
    with pytest.raises(OptionError):
        select_measured(make_table(), 0.8, measure, checks=-1)
    with pytest.raises(OptionError):
        select_measured(make_table(), 0.8, measure, tolerance=1.5)
