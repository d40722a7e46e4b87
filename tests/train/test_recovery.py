"""The issue's accuracy targets on real data (digits): converted models recover the original's accuracy."""

from __future__ import annotations

import repconv


def test_replacement_calibrate_then_distill_norm_within_one_point(digits_checkpoint, digits_calibrated, tmp_path):
    path, calibration = digits_calibrated
    teacher_acc = calibration.teacher_val_acc
    assert teacher_acc >= 0.95
    # on the teacher's own (in-distribution) training images, updating the statistics recovers within a point
    r = repconv.finetune(path, teacher=digits_checkpoint, data="digits", objective="distill", train="norm",
                         epochs=2, batches_per_epoch=12, batch_size=64, lr=1e-2, bn_stats="update",
                         output=tmp_path / "rl.repconv.safetensors")
    assert r.trainable_params < 0.02 * r.total_params  # scalars + norm affine + classifier only
    assert r.val_acc >= teacher_acc - 0.010, f"recovered {r.val_acc:.2%} vs original {teacher_acc:.2%}"
    # the defaults (statistics frozen, best weights kept) never end below what calibration left
    d = repconv.finetune(path, teacher=digits_checkpoint, data="digits", objective="distill", train="norm",
                         epochs=2, batches_per_epoch=12, batch_size=64, lr=1e-2,
                         output=tmp_path / "rl-default.repconv.safetensors")
    assert d.bn_stats == "freeze" and d.keep == "best"
    assert d.val_acc >= calibration.val_acc, f"default recovery {d.val_acc:.2%} < calibrated {calibration.val_acc:.2%}"


def test_parameter_free_hybrid_then_both_all_within_two_points(digits_checkpoint, digits_calibrated, tmp_path):
    teacher_acc = digits_calibrated[1].teacher_val_acc
    conv = repconv.convert(digits_checkpoint, method="parameter-free", pf_policy="hybrid",
                           output=tmp_path / "pf.repconv.safetensors")
    assert conv.summary.params_after < conv.summary.params_before
    r = repconv.finetune(tmp_path / "pf.repconv.safetensors", teacher=digits_checkpoint, data="digits",
                         objective="both", train="all", epochs=6, batch_size=64, lr=1e-2, warmup_epochs=0.5,
                         output=tmp_path / "pf_ft.repconv.safetensors")
    assert r.val_acc >= teacher_acc - 0.020, f"recovered {r.val_acc:.2%} vs original {teacher_acc:.2%}"


def test_the_default_trainable_set_follows_the_plan(digits_checkpoint, tmp_path):
    """``--train auto``: a parameter-free conversion has no scalars, so every weight trains; a replaced one trains
    its scalars (before, the default ``scalars`` refused a parameter-free checkpoint)."""
    quick = {"data": "digits", "epochs": 1, "batches_per_epoch": 1, "batch_size": 16}
    for method, expected in (("parameter-free", "all"), ("replacement", "scalars")):
        path = tmp_path / f"{method}.repconv.safetensors"
        repconv.convert(digits_checkpoint, method=method, output=path)
        r = repconv.finetune(path, output=tmp_path / f"{method}_ft.repconv.safetensors", **quick)
        assert r.train == expected
        assert (r.trainable_params == r.total_params) == (expected == "all")
