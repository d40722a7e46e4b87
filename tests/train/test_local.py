"""Block-wise (local) distillation: units, views sharing the converted model's tensors, errors going down."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repconv
from repconv.errors import DataError, PlanError
from repconv.train.local import LocalOptions, block_of, local_distill, plan_units


def _convert(teacher, **kw):
    return repconv.convert(teacher, **kw).model


def test_units_are_blocks(teacher):
    assert block_of(teacher, "layer.1.conv2") == "layer.1"
    conv = repconv.convert(teacher, method="parameter-free", pf_policy="hybrid")
    units = plan_units(teacher, conv.plan)
    assert [u.path for u in units] == [f"layer.{i}" for i in range(5)]
    assert units[1].steps[0].form == "avgpool_conv"


def test_local_distillation_lowers_every_unit_error(teacher, images):
    student = _convert(teacher, method="parameter-free", pf_policy="hybrid")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    res = local_distill(student, teacher, images, options=LocalOptions(epochs=15, batch_size=16, lr=1e-2))
    assert len(res.units) == 5 and res.steps == 15 * 4
    for u in res.units:
        assert u.trainable_params > 0
        assert u.error_after < u.error_before * 0.8, u
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("layer.0.conv1") for k in changed)  # the views share the student's tensors
    # frozen batch norms: running statistics untouched
    assert not any(k.endswith(("running_mean", "running_var")) for k in changed)
    assert not any(k.startswith(("stem", "head")) for k in changed)  # only units train
    assert all(p.requires_grad for p in student.parameters())  # trainability restored


def test_norm_only_and_recalibrate(teacher, images):
    student = _convert(teacher, method="parameter-free", pf_policy="all")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    opts = LocalOptions(epochs=2, batch_size=32, pf_train="norm", bn_stats="recalibrate")
    res = local_distill(student, teacher, images, options=opts)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert not any(k.endswith("conv1.weight") for k in changed)
    assert any(k.endswith("bn3.weight") for k in changed)
    assert any(k.endswith("running_mean") for k in changed)
    assert res.trainable_params == sum(u.trainable_params for u in res.units)


def test_replaced_units_skip_or_scalars(teacher, images):
    student = _convert(teacher, method="replacement")
    res = local_distill(student, teacher, images, options=LocalOptions(epochs=1, batch_size=32))
    assert [u.form for u in res.units] == ["replace"] and res.trainable_params == 0
    assert res.units[0].error_after == pytest.approx(res.units[0].error_before)
    res = local_distill(student, teacher, images, options=LocalOptions(epochs=5, batch_size=32, lr=5e-2,
                                                                       replaced="scalars"))
    assert res.trainable_params == 2
    assert res.units[0].error_after < res.units[0].error_before


def test_view_matches_converted_model(teacher, images):
    """A unit's view computes what the converted model computes inside that unit."""
    conv = repconv.convert(teacher, method="parameter-free", pf_policy="hybrid", pf_units=["layer.1.*"])
    from repconv.train.local import build_view

    unit = plan_units(teacher, conv.plan)[0]
    view = build_view(teacher, conv.model, unit).eval()
    x = images[:4]
    with torch.no_grad():
        mid = teacher.layer[0](teacher.stem(x))
        whole = conv.model(x)
        rest = teacher.head(teacher.layer[2:](view(mid)))
    torch.testing.assert_close(rest, whole, rtol=1e-4, atol=1e-5)


def test_bad_input(teacher, images):
    student = _convert(teacher, method="parameter-free")
    with pytest.raises(PlanError, match="bn_stats"):
        local_distill(student, teacher, images, options=LocalOptions(bn_stats="sometimes"))
    with pytest.raises(DataError):
        local_distill(student, teacher, [], options=LocalOptions())
    with pytest.raises(PlanError, match="no plan"):
        local_distill(nn.Linear(2, 2), teacher, images)


def test_finetune_runs_the_local_stage_first(digits_checkpoint, tmp_path, run_cli):
    """``finetune --local-epochs N``: block-wise distillation from the teacher, then the fine-tuning; it needs a
    teacher and converted units, and says so in one line."""
    from repconv.errors import OptionError

    conv = tmp_path / "pf.repconv.safetensors"
    repconv.convert(digits_checkpoint, method="parameter-free", pf_policy="hybrid", output=conv)
    quick = {"data": "digits", "epochs": 1, "batches_per_epoch": 2, "batch_size": 32}
    r = repconv.finetune(conv, teacher=digits_checkpoint, objective="distill",
                         output=tmp_path / "ft.repconv.safetensors",
                         local=LocalOptions(epochs=1, steps_per_epoch=2, batch_size=32), **quick)
    assert r.local["units"] and r.local["mean_error_after"] < r.local["mean_error_before"] and len(r.history) == 1
    plain = repconv.finetune(conv, teacher=digits_checkpoint, objective="distill",
                             output=tmp_path / "plain.repconv.safetensors", **quick)
    assert plain.local is None
    with pytest.raises(OptionError, match="local distillation compares with the original"):
        repconv.finetune(conv, output=tmp_path / "x.repconv.safetensors", local=LocalOptions(epochs=1), **quick)
    with pytest.raises(PlanError, match="has none"):
        repconv.finetune(digits_checkpoint, teacher=digits_checkpoint, output=tmp_path / "y.repconv.safetensors",
                         local=LocalOptions(epochs=1), **quick)
    code, out, err = run_cli("finetune", conv, "--teacher", digits_checkpoint, "--data", "digits", "--objective",
                           "distill", "--epochs", "1", "--batches-per-epoch", "1", "--local-epochs", "1",
                           "-o", tmp_path / "cli.repconv.safetensors")
    assert code == 0 and "local distillation of" in out + err
