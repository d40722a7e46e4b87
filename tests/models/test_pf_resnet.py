"""The native R50-max / R50-hybrid definitions (their counts against the converter: tests/convert)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repconv.convert.graph import count_flops, count_params
from repconv.models import resolve_arch
from repconv.models.pf_resnet import PfBottleneck

PAPER = {"pf_resnet50_max": (14.2e6, 2.2e9, 16), "pf_resnet50_hybrid": (17.3e6, 2.6e9, 13)}


@pytest.mark.parametrize("name", list(PAPER))
def test_counts_and_structure_match_the_paper(name):
    model = resolve_arch(name).build().eval()
    params, macs, pools = PAPER[name]
    assert abs(count_params(model) - params) <= 0.05e6
    assert abs(count_flops(model, torch.randn(1, 3, 224, 224)) / 2 - macs) <= 0.05e9
    blocks = [m for m in model.modules() if isinstance(m, PfBottleneck)]
    assert len(blocks) == 16
    assert sum(isinstance(b.conv2, nn.MaxPool2d) for b in blocks) == pools
    kept = [b for b in blocks if isinstance(b.conv2, nn.Conv2d)]
    assert all(b.stride == 2 and b.conv2.stride == (1, 1) for b in kept)


@pytest.mark.parametrize("name", list(PAPER))
def test_trains_from_scratch(name):
    torch.manual_seed(0)
    model = resolve_arch(name).build(num_classes=10).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model(x).shape == (4, 10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert losses[-1] < losses[0]
