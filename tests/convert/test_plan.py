import json

import pytest

from repconv.convert.plan import ParameterFreeStep, Plan, ReplaceStep
from repconv.errors import PlanError


def test_json_round_trip(tmp_path):
    plan = Plan([ReplaceStep("blocks.2", "blocks.1", "blocks.3", init="lstsq", a=0.3, b=0.6, fit_error=0.1),
                 ParameterFreeStep("features.3.conv", absorbed=["features.3.bn"])], arch="repconv:x",
                leaves=["body"])
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    again = Plan.load(path)
    assert again == plan and again.digest() == plan.digest()
    assert again.without_replacement().steps == [plan.steps[1]]


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('{"steps": 3}', "'steps' list"),
    ('{"steps": [{"kind": "explode"}]}', "unknown kind 'explode'"),
    ('{"steps": [{"kind": "replace", "unit": "a"}]}', "incomplete"),
    ('{"steps": [{"kind": "replace", "unit": "a", "prev": "b", "next": "c", "colour": 1}]}', "unknown fields"),
    ('{"version": 99, "steps": []}', "newer"),
])
def test_bad_plans(text, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_json(text)


def test_validate_against_model(chain):
    ok = Plan([ReplaceStep("blocks.2", "blocks.1", "blocks.3")])
    ok.validate(chain)
    cases = [
        (Plan([ReplaceStep("blocks.9", "blocks.1", "blocks.3")]), "'blocks.9' is not a module"),
        (Plan([ReplaceStep("blocks.2", "stem", "blocks.3")]), "other parameter names or shapes"),
        (Plan([ReplaceStep("blocks.1", "blocks.0", "blocks.2"), ReplaceStep("blocks.2", "blocks.1", "blocks.3")]),
         "overlaps the replaced unit"),
        (Plan([ReplaceStep("blocks.2", "blocks.1", "blocks.3", init="magic")]), "unknown init"),
        (Plan([ReplaceStep("blocks.2.2", "blocks.1.2", "blocks.3.2")]), "no parameters"),
    ]
    for plan, match in cases:
        with pytest.raises(PlanError, match=match):
            plan.validate(chain)
    json.loads(ok.to_json())
