"""Candidates of real models, the cached table's round trip and its stale / foreign detection, the Pareto table."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from helpers import make_table

from repconv.errors import InputFileError, NothingToReplace
from repconv.search.candidates import assemble_plan, conflicts, enumerate_candidates
from repconv.search.pareto import Point, pareto_front, pareto_table, plot
from repconv.search.table import data_digest, load_table, model_digest, table_key


def test_resnet50_candidates():
    model = torchvision.models.resnet50().eval()
    table = enumerate_candidates(model)
    units = {u.unit: [c.name for c in u.candidates] for u in table}
    assert len(units) == 16
    assert units["layer1.0"] == ["keep", "pf-max", "pf-avg"]
    assert units["layer2.0"] == ["keep", "pf-max", "pf-avg", "hybrid"]  # stride 2
    assert units["layer3.3"] == ["keep", "pf-max", "pf-avg", "replace"]  # interior of layer3.1..5
    assert ("layer3.3", "replace", "layer3.2") in conflicts(table)
    plan = assemble_plan(table, {"layer2.0": "hybrid", "layer3.3": "replace"}, arch="resnet50")
    plan.validate(model)
    assert [s.kind for s in plan.steps] == ["replace", "parameter_free"]


def test_mobilenet_and_vit_candidates():
    mb = {u.unit: [c.name for c in u.candidates] for u in enumerate_candidates(torchvision.models.mobilenet_v2())}
    assert mb["features.2"][:4] == ["keep", "pf-max", "pf-avg", "hybrid"]
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=3)
    units = {u.unit: [c.name for c in u.candidates] for u in enumerate_candidates(vit)}
    assert units["encoder.layers.encoder_layer_0"][:2] == ["keep", "token-mixer"]


def test_model_with_no_candidates():
    with pytest.raises(NothingToReplace, match="no unit"):
        enumerate_candidates(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)))


def test_digests_and_keys():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert model_digest(a) == model_digest(a) != model_digest(b)
    x = [torch.ones(2, 3)]
    assert data_digest(x) != data_digest([torch.zeros(2, 3)])
    k = table_key("m", "d", "ort-cpu", {"steps": 1})
    assert k != table_key("m", "d", "torch-nchw", {"steps": 1}) != table_key("m", "d", "ort-cpu", {"steps": 2})


def test_table_round_trip_and_stale_cache(tmp_path):
    table = make_table()
    path = table.save(tmp_path / "t.json")
    again = load_table(path, expect_key="k", expect_units=["u0", "u1", "u2", "u3"])
    assert again.to_dict() == table.to_dict()
    with pytest.raises(InputFileError, match="another model, data, target or settings"):
        load_table(path, expect_key="other")
    with pytest.raises(InputFileError, match="other units"):
        load_table(path, expect_key="k", expect_units=["u0"])
    broken = json.loads(path.read_text())
    del broken["figures"]["u1:hybrid"]
    (tmp_path / "b.json").write_text(json.dumps(broken))
    with pytest.raises(InputFileError, match="no figures"):
        load_table(tmp_path / "b.json")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(InputFileError, match="not a repconv candidate table"):
        load_table(tmp_path / "c.json")


def test_pareto(tmp_path):
    pts = [Point("original", "original", 10, 0.9), Point("a", "searched", 8, 0.9), Point("b", "uniform", 8, 0.8),
           Point("c", "searched", 5, 0.7), Point("d", "uniform", 6, 0.6)]
    assert [p.name for p in pareto_front(pts)] == ["c", "a"]
    rows = pareto_table(pts, base_latency_ms=10)
    assert [r["name"] for r in rows if r["pareto"]] == ["c", "a"]
    assert plot(pts, tmp_path / "p.png").stat().st_size > 1000
