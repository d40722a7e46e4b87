"""Least-squares refit of the layers that read parameter-free pools: exact folds, exact solves, errors going down."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from helpers import randomize_bn
from torch import nn

import repconv
from repconv.errors import NothingToReplace
from repconv.train.refit import _fold_affine, _Normal, fit_sites, least_squares_refit


def _kl(student, teacher, x) -> float:
    with torch.no_grad():
        return float(nn.functional.kl_div(student(x).log_softmax(1), teacher(x).log_softmax(1), log_target=True,
                                          reduction="batchmean"))


def test_normal_equations_recover_a_known_grouped_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 500, 4, generator=g)  # 3 groups, 500 positions, 4 inputs each
    w = torch.randn(3, 4, 2, generator=g)
    c = torch.randn(3, 1, 2, generator=g)
    normal = _Normal()
    normal.add(x[:, :250], x[:, :250] @ w + c)
    normal.add(x[:, 250:], x[:, 250:] @ w + c)
    solved = normal.solve(ridge=0.0, with_constant=True)
    assert torch.allclose(solved[:, :4].float(), w, atol=1e-5) and torch.allclose(solved[:, 4:].float(), c, atol=1e-5)
    assert normal.error(solved) < 1e-10
    pinned = normal.solve(ridge=0.0, with_constant=False)
    assert torch.all(pinned[:, 4] == 0) and normal.error(pinned) > 0.01  # the constant cannot be fitted then


def test_affine_fold_into_batch_norm_is_exact():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    old = nn.BatchNorm2d(6).eval()
    old.load_state_dict(bn.state_dict())
    a, b = torch.tensor([2.0, -1.5, 0.01, 1, -3, 0.5]).double(), torch.randn(6).double()
    p = torch.randn(8, 6, 5, 5) * 3 + 1
    with torch.no_grad():
        _fold_affine(bn, a, b, p.mean((0, 2, 3)).double(), p.var((0, 2, 3), unbiased=False).double())
        want = old(a.float().view(1, 6, 1, 1) * p + b.float().view(1, 6, 1, 1))
        assert torch.allclose(bn(p), want, atol=1e-4)
        assert torch.allclose(bn.running_mean, p.mean((0, 2, 3)), atol=1e-5)  # statistics are the new input's


@pytest.mark.parametrize("policy", ["hybrid", "all"])
def test_refit_lowers_every_layer_error_and_the_kl(teacher, images, policy):
    conv = repconv.convert(teacher, method="parameter-free", pf_policy=policy)
    student = conv.model
    kl0 = _kl(student, teacher, images)
    res = least_squares_refit(student, teacher, images, plan=conv.plan, batches=4, batch_size=16)
    kinds = {s.kind for s in res.sites}
    assert "conv" in kinds and len(res.sites) + len(res.skipped) == len(conv.plan.steps)
    for site in res.sites:
        assert site.error_after < site.error_before * 0.9, site
    assert _kl(student, teacher, images) < kl0


def test_depthwise_pools_fit_the_norm_after_them():
    torch.manual_seed(0)
    teacher = randomize_bn(torchvision.models.mobilenet_v2(num_classes=5)).eval()
    conv = repconv.convert(teacher, arch="mobilenet_v2", method="parameter-free", pf_policy="hybrid")
    sites, skipped = fit_sites(conv.model, conv.plan.parameter_free_steps)
    assert not skipped
    assert {s.kind for s in sites} == {"norm_affine", "conv"}  # stride-1 pools -> norms, stride-2 kept convs
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    kl0 = _kl(conv.model, teacher, x)
    res = least_squares_refit(conv.model, teacher, x, plan=conv.plan, batches=2, batch_size=8)
    assert res.mean_error_after < 0.7 * res.mean_error_before
    assert _kl(conv.model, teacher, x) < kl0


def test_a_plan_without_pools_has_nothing_to_refit(teacher, images):
    conv = repconv.convert(teacher, method="replacement", every=2)
    with pytest.raises(NothingToReplace):
        least_squares_refit(conv.model, teacher, images, plan=conv.plan)


def test_calibrate_refits_a_parameter_free_checkpoint(run_cli, tmp_path):
    torch.manual_seed(0)
    original = tmp_path / "model.pt"
    torch.save(randomize_bn(torchvision.models.mobilenet_v2(num_classes=10)).state_dict(), original)
    converted = tmp_path / "pf.repconv.safetensors"
    repconv.convert(str(original), arch="mobilenet_v2", method="parameter-free", pf_policy="hybrid",
                    output=converted)
    out = tmp_path / "calibrated.repconv.safetensors"
    r = run_cli("calibrate", str(converted), "--teacher", str(original), "--data", "digits", "--input-size", "32",
                "--batches", "2", "--batch-size", "16", "--heldout-batches", "1", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["units"] == [] and len(res["refit"]["sites"]) == 17
    assert res["kl_after"] < res["kl_before"] and not res["kept_input"]
    reloaded = repconv.load(out)  # a plain converted checkpoint: folds and runs like any other
    assert reloaded(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    human = run_cli("calibrate", str(converted), "--teacher", str(original), "--data", "digits", "--input-size",
                    "32", "--batches", "1", "--batch-size", "8", "--heldout-batches", "0", "-o",
                    str(tmp_path / "again.repconv.safetensors"))
    assert human.returncode == 0 and "Least-squares refit" in human.stdout
