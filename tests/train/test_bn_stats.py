"""Recovery never makes a model worse (issue 17): bn_stats modes, agreement with the teacher, best-so-far.

A small BatchNorm CNN trained for a moment on 8x8 digits stands in for a pretrained model (seconds, no fixture).
"""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from helpers import randomize_bn
from torch import nn
from torch.utils.data import TensorDataset

import repconv
from repconv.checkpoint import CheckpointMeta, Loaded
from repconv.data import digits
from repconv.models import resolve_arch
from repconv.train.calibrate import calibrate_units
from repconv.train.loop import TrainConfig, fit
from repconv.train.recovery import agreement, batch_agreement, holdout_split, predictions


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.body(x))


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


@pytest.fixture(scope="module")
def data():
    return digits("train", 8), digits("val", 8)


@pytest.fixture(scope="module")
def pretrained(data):
    torch.manual_seed(0)
    model = SmallNet()
    fit(model, data[0], TrainConfig(epochs=2, batch_size=64, lr=1e-2, seed=0))
    return model.eval()


# what finetune's default (bn_stats auto, keep best) is for a model without parameter-free steps
PRETRAINED = {"bn_stats": "freeze", "keep": "best"}


def _unlabeled(ds, n=None):
    x = ds.tensors[0][:n]
    return TensorDataset(x, torch.full((len(x),), -1))


def _finetune_cfg(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 32, "objective": "distill", "trainable": "all",
                          **PRETRAINED, **kw})


def test_zero_lr_finetune_under_the_default_changes_nothing(pretrained, data):
    """The default for recovering a pretrained model (freeze): zero learning rate leaves every output unchanged;
    today's behaviour (update) does not."""
    x = data[1].tensors[0][:64]
    with torch.no_grad():
        ref = pretrained(x)
    for mode, same in (("freeze", True), ("update", False)):
        student, teacher = copy.deepcopy(pretrained), copy.deepcopy(pretrained)
        r = fit(student, _unlabeled(data[0], 256), _finetune_cfg(lr=0.0, bn_stats=mode, keep="last"), teacher=teacher)
        with torch.no_grad():
            out = student.eval()(x)
        assert torch.allclose(out, ref, atol=1e-6, rtol=0) is same, mode
        assert r.bn_stats == mode and r.val_source == "holdout" and r.holdout_images == round(0.15 * 256)
        if same:
            assert r.agreement == 1.0 and all(h["agreement"] == 1.0 for h in r.history)


def test_each_mode_does_what_it_says(pretrained, data):
    """Running statistics: freeze = unchanged; recalibrate = changed once, before the first step, then fixed;
    update = changed by every step."""
    train = _unlabeled(data[0], 128)
    before = _bn_buffers(pretrained)
    for mode in ("freeze", "recalibrate", "update"):
        model = copy.deepcopy(pretrained)
        snaps = []
        hook = model.head.register_forward_hook(lambda m, i, o, snaps=snaps, model=model:
                                                snaps.append(_bn_buffers(model)) if model.training else None)
        r = fit(model, train, _finetune_cfg(lr=0.0, epochs=2, bn_stats=mode, keep="last", holdout=0),
                teacher=copy.deepcopy(pretrained))
        hook.remove()
        after = _bn_buffers(model)
        differs = [not torch.equal(a[k], b[k]) for a, b in itertools.pairwise(snaps) for k in a]
        if mode == "freeze":
            assert all(torch.equal(after[k], before[k]) for k in before) and not any(differs)
        elif mode == "recalibrate":
            assert any(not torch.equal(after[k], before[k]) for k in before) and not any(differs)
            assert r.recalibrated_images == 128
            # the statistics are those of one cumulative pass over the training data
            ref = copy.deepcopy(pretrained)
            for m in ref.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
                    m.momentum = None
            ref.train()
            with torch.no_grad():
                for i in range(0, 128, 32):
                    ref(train.tensors[0][i:i + 32])
            ref_buffers = _bn_buffers(ref)
            # the first norm's mean is the data's in any batch order (equal-size batches; later norms and
            # variances depend on how the batches were drawn)
            assert torch.allclose(after["body.1.running_mean"], ref_buffers["body.1.running_mean"], atol=1e-5)
            assert all(int(v) == 4 for k, v in model.state_dict().items() if k.endswith("num_batches_tracked"))
        else:
            steps = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in itertools.pairwise(snaps)]
            assert all(steps) and len(steps) == 2 * 4 - 1


def test_a_recovery_that_would_end_worse_writes_the_input_and_says_so(pretrained, data, tmp_path):
    """A destructive learning rate: every epoch is worse than the input, so the input is written (the file
    after every epoch too), and the result says so."""
    model, written = copy.deepcopy(pretrained), []
    x = data[1].tensors[0][:64]
    with torch.no_grad():
        ref = pretrained(x)

    def save_model(m, metrics):
        written.append((metrics, {k: v.clone() for k, v in m.state_dict().items()}))

    cfg = TrainConfig(epochs=2, batch_size=32, lr=30.0, optimizer="sgd", objective="ce", trainable="all",
                      batches_per_epoch=4, **PRETRAINED)
    r = fit(model, data[0], cfg, val_set=data[1], save_model=save_model, output=tmp_path / "o")
    assert r.select_metric == "val_acc" and r.written == "input" and r.best_epoch == 0
    assert r.warning and "worse" in r.warning and "input model was written" in r.warning
    assert r.val_acc == r.input_metrics["val_acc"] > max(h["val_acc"] for h in r.history)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref)
    assert [m["written"] for m, _ in written] == ["input", "input"] and written[0][0]["epoch"] == 0
    assert written[-1][0]["recovery"] == {"bn_stats": "freeze", "keep": "best", "select_metric": "val_acc",
                                          "written": "input", "best_epoch": 0, "input": r.input_metrics,
                                          "val_source": "val", "holdout_images": 0, "recalibrated_images": 0}
    assert all(torch.equal(s[k], pretrained.state_dict()[k]) for _, s in written for k in s)
    lines = [json.loads(ln) for ln in (tmp_path / "o.metrics.jsonl").read_text().splitlines()]
    assert [ln["written"] for ln in lines] == ["input", "input"]

    # the state file keeps the last epoch (exact resume) and the judge: a resumed, finished run decides the same
    again = copy.deepcopy(pretrained)
    r2 = fit(again, data[0], cfg, val_set=data[1], output=tmp_path / "o", resume=True)
    assert r2.resumed_from_epoch == 2 and r2.written == "input"
    assert all(torch.equal(again.state_dict()[k], pretrained.state_dict()[k]) for k in again.state_dict())


def test_best_epoch_is_kept_not_the_last(pretrained, data):
    """keep=best_epoch writes the best trained epoch even when a later one is worse."""
    model = copy.deepcopy(pretrained)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e-2, objective="ce", trainable="all", keep="best_epoch",
                      bn_stats="update", batches_per_epoch=4)
    r = fit(model, data[0], cfg, val_set=data[1])
    best = max(range(3), key=lambda i: (r.history[i]["val_acc"], -i))
    assert r.best_epoch == best + 1 and r.val_acc == r.history[best]["val_acc"]
    assert r.written == ("last" if best == 2 else f"best epoch {best + 1}")


def test_agreement_and_holdout():
    assert agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == 0.5
    ds = TensorDataset(torch.randn(200, 3, 8, 8), torch.full((200,), -1))
    a, b = holdout_split(ds, 0.15, 1000, seed=3)
    _, b2 = holdout_split(ds, 0.15, 1000, seed=3)
    assert len(b) == 30 and len(a) == 170 and b.indices == b2.indices and not set(a.indices) & set(b.indices)
    assert len(holdout_split(ds, 0.15, 20, seed=3)[1]) == 20 and holdout_split(ds, 0.05, 1000)[1] is None
    torch.manual_seed(0)
    m = SmallNet().eval()
    pred, labels = predictions(m, ds)
    assert agreement(pred, pred) == 1.0 and (labels == -1).all()
    assert batch_agreement(m, m, [ds.tensors[0][:10]]) == 1.0


def test_calibrate_bn_stats_and_agreement():
    """calibrate: freeze keeps the replaced units' statistics, recalibrate re-estimates them; agreement with the
    teacher is reported on the calibration batches and on held-out batches."""
    spec = resolve_arch("cifar_resnet20")
    torch.manual_seed(0)
    teacher = randomize_bn(spec.build(num_classes=10)).eval()
    conv = repconv.convert(Loaded(teacher, CheckpointMeta.for_arch(spec, {"num_classes": 10})), every=2)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 3, 8, 8, generator=g) for _ in range(2)]
    heldout = [torch.randn(16, 3, 8, 8, generator=g)]
    for mode in ("freeze", "recalibrate"):
        model = copy.deepcopy(conv.model)
        before = _bn_buffers(model.get_submodule("layer1.1"))
        cal = calibrate_units(model, teacher, calib, max_iter=5, bn_stats=mode, heldout=heldout)
        after = _bn_buffers(model.get_submodule("layer1.1"))
        unchanged = all(torch.equal(before[k], after[k]) for k in before)
        assert unchanged is (mode == "freeze" or cal.kept_input), mode
        assert cal.bn_stats == mode and cal.heldout_images == 16
        assert cal.agreement_after == batch_agreement(model, teacher, calib)
        assert cal.heldout_agreement_after == batch_agreement(model, teacher, heldout)
        assert 0 <= cal.heldout_agreement_before <= 1 and cal.kl_after <= cal.kl_before
