"""The small ViT: a torchvision VisionTransformer that repconv's two methods convert like vit_b_16."""

from __future__ import annotations

import torch

import repconv
from repconv.convert.graph import count_params
from repconv.models import resolve_arch


def test_cifar_vit_replacement_and_parameter_free():
    spec = resolve_arch("cifar_vit")
    assert spec.input_size == (3, 32, 32) and spec.num_classes == 10
    torch.manual_seed(0)
    model = spec.build().eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    rep = repconv.convert(model, arch="cifar_vit", every=2)
    # 6 encoder blocks: 4 interior ones, every other one replaced
    assert rep.summary.replaced_units == ["encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_3"]
    assert count_params(rep.model) < count_params(model) and rep.model(x).shape == (2, 10)
    pf = repconv.convert(model, arch="cifar_vit", method="parameter-free")
    assert len(pf.summary.steps) == 3  # attention replaced in every other block
    assert torch.isfinite(pf.model(x)).all()
