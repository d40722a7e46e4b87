"""From-scratch training (the papers' setting): the output is an ordinary model that convert and --teacher take."""

from __future__ import annotations

import pytest
import torch

import repconv
from repconv.checkpoint import CheckpointMeta, build_from_meta, fit_state_dict
from repconv.convert.plan import Plan
from repconv.convert.replacement import replaced_units


def test_train_with_replacement_writes_a_folded_model(tmp_path):
    out = tmp_path / "scratch.repconv.safetensors"
    r = repconv.train("cifar_resnet20", data="digits", output=out, replace_every=2, epochs=1, batches_per_epoch=3,
                      batch_size=32, seed=3)
    assert r.kind == "model" and r.replaced_units == ["layer1.1"]
    assert r.trainable_params < r.params + 1  # the unit's own weights are gone while training
    assert r.val_acc is not None and 0 <= r.val_acc <= 1
    loaded = repconv.load_checkpoint(out)
    assert loaded.meta.kind == "model" and loaded.meta.plan is None and not replaced_units(loaded.model)

    # The folded file computes exactly what the trained converted model computed.
    state = torch.load(r.state_file, weights_only=True)
    plan = Plan.from_dict(loaded.meta.extra["replacement_learning"]["plan"])
    converted = build_from_meta(CheckpointMeta(arch=loaded.meta.arch, arch_kwargs=loaded.meta.arch_kwargs,
                                               kind="converted", plan=plan))
    fit_state_dict(converted, state["model"], loaded.meta.arch, None)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), converted.eval()(x), rtol=1e-5, atol=1e-5)

    conv = repconv.convert(out, output=tmp_path / "again.repconv.safetensors")  # convert accepts it
    assert conv.summary.replaced_units == ["layer1.1"]
    ft = repconv.finetune(tmp_path / "again.repconv.safetensors", teacher=out, data="digits", objective="distill",
                          epochs=1, batches_per_epoch=1, batch_size=16, output=tmp_path / "ft.repconv.safetensors")
    assert ft.history[0]["images"] == 16


def test_train_without_replacement(tmp_path):
    r = repconv.train("cifar_resnet8", data="digits", output=tmp_path / "plain.repconv.safetensors", replace=False,
                      epochs=1, batches_per_epoch=2, batch_size=16)
    assert r.replaced_units == [] and r.trainable_params == r.params
    with pytest.raises(repconv.errors.NothingToReplace):
        repconv.train("cifar_resnet8", data="digits", output=tmp_path / "x.repconv.safetensors", epochs=1)
