"""timm models go through the same path (timm's own no-trace leaves are used when timm is installed)."""

import pytest
import torch

import repconv
from repconv.models import resolve_arch

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'repconv[timm]')")


@pytest.mark.parametrize("name, expected", [
    ("timm:convnext_atto", ["stages.2.blocks.1", "stages.2.blocks.3"]),
    ("timm:vit_tiny_patch16_224", ["blocks.1", "blocks.3", "blocks.5", "blocks.7", "blocks.9"]),
])
def test_timm_convert_round_trip(name, expected, tmp_path):
    spec = resolve_arch(name)
    torch.manual_seed(0)
    result = repconv.convert(spec.build().eval(), arch=name)
    assert result.summary.replaced_units == expected
    x = torch.randn(2, *spec.input_size)
    path = result.save(tmp_path / "m.repconv.safetensors")
    with torch.no_grad():
        assert torch.equal(repconv.load(path)(x), result.model(x))


def test_timm_state_dict_with_prefix(tmp_path):
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=7)
    path = tmp_path / "atto.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = repconv.load(path, arch="timm:convnext_atto")
    assert loaded.head.fc.out_features == 7
