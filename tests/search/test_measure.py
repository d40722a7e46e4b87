"""The two figures of the candidate table on a small model: damage (local distillation of every candidate in one
pass) and per-unit latency deltas on a target."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyBottleneckNet, randomize_bn

from repconv.errors import DependencyError, OptionError
from repconv.search.candidates import enumerate_candidates
from repconv.search.damage import DamageOptions, build_views, measure_damage
from repconv.search.latency import check_target, measure_models, measure_unit_deltas


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return randomize_bn(TinyBottleneckNet()).eval()


def test_damage_all_candidates_in_one_pass(teacher):
    images = torch.randn(96, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    table = enumerate_candidates(teacher)
    keys = {c.key for u in table for c in u.candidates[1:]}
    untrained = measure_damage(teacher, table, list(images[:64].split(16)), list(images[64:].split(32)),
                               DamageOptions(steps=0))
    trained = measure_damage(teacher, table, list(images[:64].split(16)), list(images[64:].split(32)),
                             DamageOptions(steps=12, lr=1e-2))
    assert set(trained) - {"_info"} == keys and trained["_info"]["train_steps"] == 12
    for k in keys:
        assert 0 <= trained[k]["damage"] <= 100 and trained[k]["kl"] >= 0
        if k.endswith(("pf-avg", "hybrid")):  # pools with 1x1 convs and norms around them: local training helps
            before, after = untrained[k]["unit_error"], trained[k]["unit_error"]
            assert after < before or after < 0.01, (k, before, after)  # or already close after the BN re-estimate
    assert untrained["layer.3:replace"]["unit_error"] == pytest.approx(trained["layer.3:replace"]["unit_error"])


@pytest.mark.parametrize("target", ["ort-cpu", "torch-nchw", "torch-channels-last"])
def test_unit_latency_deltas(teacher, target):
    table = enumerate_candidates(teacher, units=["layer.1", "layer.3"])
    views = build_views(teacher, table)
    x = torch.randn(1, 3, 16, 16)
    deltas = measure_unit_deltas(teacher, views, x, target, rounds=1, block=3, warmup=1)
    assert set(deltas) == {"layer.1", "layer.3"}
    assert deltas["layer.3"]["replace"] == 0.0 and deltas["layer.1"]["keep_ms"] > 0
    assert set(deltas["layer.1"]) == {"pf-max", "pf-avg", "hybrid", "keep_ms"}
    whole = measure_models({"a": teacher}, x, target, rounds=1, block=2, warmup=1)
    assert whole["a"] > 0


def test_targets():
    with pytest.raises(OptionError, match="is not a known target"):
        check_target("tpu")
    with pytest.raises(DependencyError):
        check_target("tensorrt")
    check_target("ort-cpu")
