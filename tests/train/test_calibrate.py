"""Calibration (function-space fit of the scalars) and measured unit selection, on the digits model."""

from __future__ import annotations

import pytest
import torch

import repconv
from repconv.convert.measure import candidate_steps, least_harmful, measure_damage
from repconv.convert.replacement import replaced_units
from repconv.data import make_dataset
from repconv.models import resolve_arch
from repconv.train.loop import evaluate


def test_calibration_beats_half_init(digits_converted, digits_calibrated, digits_checkpoint):
    path, result = digits_calibrated
    spec = resolve_arch("cifar_resnet20")
    val = make_dataset("digits", "val", 32, spec.mean, spec.std)
    half = evaluate(repconv.load(digits_converted), val)
    calibrated = repconv.load(path)
    assert result.val_acc_before == pytest.approx(half)
    assert evaluate(calibrated, val) == pytest.approx(result.val_acc)
    assert result.val_acc > half + 0.05, f"calibrated {result.val_acc:.1%} vs half {half:.1%}"
    assert result.kl_after < result.kl_before
    scal = replaced_units(calibrated)["layer1.1"]
    assert (scal.a.item(), scal.b.item()) == pytest.approx((result.units[0]["a"], result.units[0]["b"]))
    assert (result.units[0]["a"], result.units[0]["b"]) != (0.5, 0.5)


def test_measured_selection_keeps_least_harmful(digits_checkpoint):
    """On a deeper random-weight ResNet: the chosen units are the lowest-KL non-touching candidates."""
    torch.manual_seed(0)
    model = resolve_arch("cifar_resnet32").build(num_classes=10).eval()
    from repconv.convert.graph import find_runs

    batches = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    damages = measure_damage(model, candidate_steps(find_runs(model)), batches)
    assert len(damages) == 7 and all(d.kl >= 0 for d in damages)
    chosen = least_harmful(damages, budget=2)
    ranked = sorted(damages, key=lambda d: d.kl)
    assert chosen[0] == ranked[0].unit and len(chosen) == 2
    by_unit = {d.unit: d for d in damages}
    assert by_unit[chosen[1]].unit not in (by_unit[chosen[0]].prev, by_unit[chosen[0]].next)

    conv = repconv.convert(model, arch="cifar_resnet32", select="measured", budget=1, data="digits",
                           calib_batches=1)
    assert len(conv.summary.replaced_units) == 1
    ranked = sorted(conv.meta.extra["measured_damage"], key=lambda d: d["kl"])
    assert conv.summary.replaced_units == [ranked[0]["unit"]]


def test_calibrate_measured_budget_restores_the_rest(digits_checkpoint, tmp_path):
    conv = repconv.convert(digits_checkpoint, units=["layer1.1"], output=tmp_path / "c.repconv.safetensors")
    assert conv.summary.replaced_units == ["layer1.1"]
    r = repconv.calibrate(tmp_path / "c.repconv.safetensors", teacher=digits_checkpoint, data="digits",
                          select="measured", budget=1, batches=1, output=tmp_path / "m.repconv.safetensors")
    assert r.selected == ["layer1.1"] and len(r.damage) == 1
    assert list(replaced_units(repconv.load(tmp_path / "m.repconv.safetensors"))) == ["layer1.1"]
