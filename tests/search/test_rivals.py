"""The plans a searched plan races: uniform policies expressed as table choices (the very plans ``convert`` makes),
and which of them, and of the other timed plans, race under a latency budget."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torchvision

from repconv.conversion import ConvertOptions, plan_conversion
from repconv.errors import NothingToReplace
from repconv.search.candidates import assemble_plan, enumerate_candidates
from repconv.search.measured import MeasuredSelection, Probe, rescaled, select_measured
from repconv.search.rivals import POLICIES, SEARCHED, contenders, policy_choice
from repconv.search.select import score
from repconv.search.table import CandidateTable, Figures

PF_SAVING = {"pf-max": 0.02, "pf-avg": 0.015, "hybrid": 0.01, "replace": 0.0}  # of the original's latency, per unit


def keys(plan) -> set[str]:
    return {json.dumps({"kind": s.kind, **asdict(s)}, sort_keys=True) for s in plan.steps}


@pytest.fixture(scope="module")
def resnet50():
    return torchvision.models.resnet50(num_classes=10).eval()


@pytest.fixture(scope="module")
def table(resnet50) -> CandidateTable:
    """resnet50's real candidates with made-up figures: each pooled unit saves ``PF_SAVING`` of 20 ms; the drop
    grows towards the deep units."""
    units = enumerate_candidates(resnet50)
    figures = {c.key: Figures(damage=1.0 + i + (2.0 if c.name == "pf-max" else 0.0),
                              latency_delta_ms=-20 * PF_SAVING[c.name])
               for i, u in enumerate(units) for c in u.candidates[1:]}
    return CandidateTable("k", "ort-cpu", 20.0, units, figures)


def measure(choice: dict[str, str]) -> float:
    return 1 - sum(PF_SAVING[c] for c in choice.values())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_policy_choice_assembles_the_plan_convert_makes(arch, policy):
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    choice = policy_choice(model, enumerate_candidates(model), policy)
    try:
        expected, _ = plan_conversion(model, ConvertOptions(**POLICIES[policy]))
    except NothingToReplace:  # resnet18's runs are two blocks long: no interior unit to replace
        assert choice is None and (arch, policy) == ("resnet18", "replace-every-2")
        return
    assert keys(assemble_plan(enumerate_candidates(model), choice)) == keys(expected)


def test_a_policy_on_a_restricted_table_covers_its_units_or_nothing(resnet50):
    layer3 = enumerate_candidates(resnet50, units=("layer3.*",))
    rest = {f"layer3.{i}": "pf-max" for i in range(1, 6)}
    assert policy_choice(resnet50, layer3, "pf-hybrid") == {"layer3.0": "hybrid"} | rest
    assert policy_choice(resnet50, layer3, "replace-every-2") == {"layer3.2": "replace", "layer3.4": "replace"}
    pools_only = enumerate_candidates(resnet50, units=("layer3.*",), kinds=("pf-max", "pf-avg"))
    assert policy_choice(resnet50, pools_only, "pf-all") == {"layer3.0": "pf-max"} | rest
    assert policy_choice(resnet50, pools_only, "pf-hybrid") is None  # layer3.0's hybrid is no candidate there
    assert policy_choice(resnet50, pools_only, "replace-every-2") is None  # no replace candidate either


def test_uniform_policies_within_the_budget_race_the_tables_plan(table, resnet50):
    chosen = select_measured(table, 0.7, measure)
    said: list[str] = []
    field = contenders(table, chosen, 0.7, 0.03, measure, model=resnet50,
                       rivals=("pf-hybrid", "pf-all", "replace-every-2"), limit=4, say=said.append)
    assert [c.name for c in field] == [SEARCHED, "pf-hybrid", "pf-all"]
    assert field[0].selection == chosen.selection and field[0].probe == chosen.probe
    hybrid = field[1]
    assert hybrid.probe.measured_ratio == pytest.approx(0.71)  # 13 pools and 3 hybrids: within 3% of 0.7
    assert hybrid.selection == score(table, hybrid.selection.choice, latency_budget=0.7)
    assert hybrid.probe.predicted_ratio == pytest.approx(rescaled(hybrid.selection, chosen.probes[0]))
    assert field[2].probe.measured_ratio == pytest.approx(0.68)
    assert any("replace-every-2" in m and "misses the budget" in m for m in said)  # runs at the original's latency
    two = contenders(table, chosen, 0.7, 0.03, measure, model=resnet50, rivals=("pf-hybrid", "pf-all"), limit=2)
    assert [c.name for c in two] == [SEARCHED, "pf-hybrid"]
    assert [c.name for c in contenders(table, chosen, 0.7, 0.03, measure, model=resnet50, rivals=("pf-all",),
                                       limit=1)] == [SEARCHED]
    said.clear()
    tight = contenders(table, chosen, 0.65, 0.0, measure, model=resnet50, rivals=("pf-hybrid", "pf-all"), limit=3,
                       say=said.append)
    assert [c.name for c in tight] == [SEARCHED] and len(said) == 2  # neither policy meets 0.65
    assert all("misses the budget" in m for m in said)


def test_a_rival_that_is_the_tables_plan_is_not_raced_twice_and_other_timed_plans_follow(table, resnet50):
    everything = policy_choice(resnet50, table.units, "pf-all")
    same = MeasuredSelection(score(table, everything, latency_budget=0.7),
                             [Probe(everything, 0.7, 0.68, 0.68, measure(everything))])
    assert [c.name for c in contenders(table, same, 0.7, 0.03, measure, model=resnet50, rivals=("pf-all",),
                                       limit=3)] == [SEARCHED]
    mild = {"layer1.0": "pf-avg", "layer1.1": "pf-avg"}
    milder = {"layer1.0": "pf-avg"}
    slow = {"layer4.1": "pf-avg"}  # timed, but over the budget: never races
    probes = [Probe(everything, 0.7, 0.68, 0.68, 0.68)] + [Probe(c, 0.9, measure(c), measure(c), r) for c, r in
                                                           ((mild, 0.69), (slow, 0.8), (milder, 0.7))]
    chosen = MeasuredSelection(score(table, everything, latency_budget=0.7), probes)
    field = contenders(table, chosen, 0.7, 0.03, measure, model=resnet50, rivals=(), limit=3)
    assert [(c.name, c.selection.choice) for c in field] == [(SEARCHED, everything), ("searched-2", milder),
                                                             ("searched-3", mild)]  # least predicted drop first
    assert [c.probe for c in field[1:]] == [probes[3], probes[1]]
