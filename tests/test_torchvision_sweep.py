"""Every torchvision classifier: convert, run forward, save and re-load bit-exactly."""

import pytest
import torch
import torchvision
from helpers import has_replaceable_unit

import repconv
from repconv.errors import NothingToReplace
from repconv.models import resolve_arch

CI_SUBSET = ["resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf",
             "vit_b_16"]
ALL = torchvision.models.list_models(module=torchvision.models)


def check_round_trip(name, tmp_path):
    spec = resolve_arch(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    try:
        result = repconv.convert(model, arch=name)
    except NothingToReplace as exc:
        assert "repeated unit" in str(exc)
        assert not has_replaceable_unit(model), f"{name} has interior units, yet nothing was replaced"
        return None
    assert result.summary.replaced_units
    assert result.summary.params_after < result.summary.params_before
    x = torch.randn(2, *spec.input_size)
    with torch.no_grad():
        y = result.model(x)
    assert y.shape == (2, 1000) and torch.isfinite(y).all()
    path = result.save(tmp_path / f"{name}.repconv.safetensors")
    with torch.no_grad():
        assert torch.equal(repconv.load(path)(x), y)
    return result.summary.replaced_units


@pytest.mark.parametrize("name", CI_SUBSET)
def test_ci_subset(name, tmp_path):
    replaced = check_round_trip(name, tmp_path)
    # resnet18's runs have two members and mobilenet_v3_small's blocks all differ: nothing interior
    assert (replaced is None) == (name in ("resnet18", "mobilenet_v3_small"))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL if n not in CI_SUBSET])
def test_every_classifier(name, tmp_path):
    check_round_trip(name, tmp_path)
