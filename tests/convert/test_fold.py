"""Folding replaced units into static tensors, conv+BN fusion, and `repconv fold`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Chain, randomize_bn
from safetensors.torch import load_file
from torch import nn

from repconv import api
from repconv.checkpoint import CheckpointMeta, Loaded
from repconv.cli import main
from repconv.convert.fold import compare, folded_state_dict, fuse_conv_bn
from repconv.errors import OutputError, VerificationError
from repconv.models import resolve_arch


def converted_resnet20(seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_bn(resolve_arch("cifar_resnet20").build(num_classes=10), seed).eval()
    return api.convert(model, arch="cifar_resnet20", init="lstsq"), model


@pytest.fixture(scope="module")
def conversion():
    return converted_resnet20()[0]


# ---------------------------------------------------------------- replacement folding


def test_folded_state_dict_loads_strictly_into_original_class(chain):
    conv = api.convert(Loaded(chain, CheckpointMeta(input_size=(4,))), units=["blocks.1", "blocks.3"])
    state = folded_state_dict(conv.model)
    assert not any(".replacement." in k for k in state)
    plain = Chain().eval()
    plain.load_state_dict(state, strict=True)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(plain(x), conv.model(x))
    # new tensors: folding shares no storage with the neighbours it was computed from
    assert plain.blocks[1][0].weight.data_ptr() != plain.blocks[0][0].weight.data_ptr()


def test_fold_gives_the_original_architecture(conversion, tmp_path):
    assert conversion.summary.replaced_units
    result = api.fold(conversion, output=tmp_path / "folded.safetensors")
    assert result.original_architecture and result.folded_units == conversion.summary.replaced_units
    assert result.parity.max_abs == 0.0  # the same arithmetic as the converted model: bit-exact
    plain = resolve_arch("cifar_resnet20").build(num_classes=10).eval()
    plain.load_state_dict(load_file(tmp_path / "folded.safetensors"), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), conversion.model(x))
    reloaded = api.load_checkpoint(tmp_path / "folded.safetensors")
    assert reloaded.meta.kind == "folded" and reloaded.meta.extra["plan_digest"] == conversion.plan.digest()


def test_fold_to_pt_and_fused_needs_container(conversion, tmp_path):
    result = api.fold(conversion, output=tmp_path / "folded.pt")
    assert set(torch.load(tmp_path / "folded.pt", weights_only=True)) == set(result.model.state_dict())
    fused = api.fold(conversion, fuse_bn=True)
    with pytest.raises(OutputError, match="safetensors"):
        fused.save(tmp_path / "fused.pt")
    assert not (tmp_path / "fused.pt").exists()


def test_fused_fold_round_trips_through_its_file(conversion, tmp_path):
    result = api.fold(conversion, fuse_bn=True, output=tmp_path / "fused.safetensors")
    assert result.fusion.fused and not result.fusion.unfused
    assert result.parity.max_rel < 1e-5 and result.parity.max_abs > 0  # BN statistics are non-trivial
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    reloaded = api.load(tmp_path / "fused.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))


def test_fold_parity_failure_raises_and_writes_nothing(conversion, tmp_path):
    with pytest.raises(VerificationError, match="differs from the converted"):
        api.fold(conversion, fuse_bn=True, tolerance=0.0, output=tmp_path / "f.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_trivial_bn_statistics_are_reported():
    torch.manual_seed(0)
    model = resolve_arch("cifar_resnet20").build(num_classes=10).eval()
    result = api.fold(api.convert(model, arch="cifar_resnet20"))
    assert any("initial statistics" in w for w in result.warnings)


# ---------------------------------------------------------------- conv + BN fusion


class SharedConv(nn.Module):
    """One conv module called from three places, two of them followed by different BNs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + 2 * self.conv(x) + self.bn2(self.conv(x))


def test_shared_conv_is_never_fused_in_place():
    model = randomize_bn(SharedConv()).eval()
    before = model.conv.weight.detach().clone()
    fused, report = fuse_conv_bn(model)
    assert len(report.fused) == 2 and not report.unfused
    assert {f["into"] for f in report.fused} == {"conv_fused1", "conv_fused2"}
    assert torch.equal(model.conv.weight, before)  # the input model is untouched
    assert torch.equal(fused.conv.weight, before)  # the unfused call site keeps the original weights
    parity = compare(model, fused, [torch.randn(2, 3, 8, 8)])
    assert parity.max_rel < 1e-5


class BNAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: its own forward with a functional batch norm, then an activation."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)
        return F.relu(x)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bnact = BNAct(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn_after_add = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn_branch = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bnact(self.conv1(x))
        z = self.conv3(y)
        return self.bn_after_add(self.conv2(y) + y) + self.bn_branch(z) + z


def test_functional_bn_fused_and_unfusable_ones_reported():
    model = randomize_bn(Mixed()).eval()
    fused, report = fuse_conv_bn(model)
    assert [(f["bn"], f["conv"], f["form"]) for f in report.fused] == [("bnact", "conv1", "functional")]
    reasons = {u["bn"]: u["reason"] for u in report.unfused}
    assert "not a convolution" in reasons["bn_after_add"]
    assert "also feeds 1 other node" in reasons["bn_branch"]
    assert not any(k.startswith("bnact.") for k in fused.state_dict())  # its tensors are gone
    assert compare(model, fused, [torch.randn(2, 3, 9, 9)]).max_rel < 1e-5


def test_timm_batchnormact_fuses_completely():
    timm = pytest.importorskip("timm")
    model = randomize_bn(timm.create_model("efficientnet_b0", num_classes=10)).eval()
    fused, report = fuse_conv_bn(model)
    assert len(report.fused) == 49 and not report.unfused
    assert compare(model, fused, [torch.randn(2, 3, 64, 64)]).max_rel < 1e-5


# ---------------------------------------------------------------- CLI


def test_cli_fold(tmp_path, capsys):
    conversion, _ = converted_resnet20(seed=1)
    src = conversion.save(tmp_path / "c.repconv.safetensors")
    main(["fold", str(src), "-o", str(tmp_path / "f.safetensors"), "--json"])
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["original_architecture"] and report["parity"]["max_abs"] == 0.0
    assert len(report["folded_units"]) == len(conversion.summary.replaced_units)


def test_cli_fold_not_a_model(tmp_path, capsys):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as exc:
        main(["fold", str(bad), "-o", str(tmp_path / "f.safetensors")])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "f.safetensors").exists()
