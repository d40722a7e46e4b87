"""Fixtures of the recover-and-train area: the digits model converted (and calibrated) once per session."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyBottleneckNet, randomize_bn
from torch import nn

import repconv


@pytest.fixture
def teacher() -> nn.Module:
    """A small bottleneck network with non-trivial BN statistics: the original of the block-wise tests."""
    torch.manual_seed(0)
    return randomize_bn(TinyBottleneckNet()).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def digits_converted(digits_checkpoint, tmp_path_factory) -> str:
    """The digits model in Replacement Learning form, scalars at their 'half' init (0.5, 0.5)."""
    path = tmp_path_factory.mktemp("converted") / "digits_rl.repconv.safetensors"
    repconv.convert(digits_checkpoint, init="half", output=path)
    return str(path)


@pytest.fixture(scope="session")
def digits_calibrated(digits_converted, digits_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("calibrated") / "digits_cal.repconv.safetensors"
    result = repconv.calibrate(digits_converted, teacher=digits_checkpoint, data="digits", output=path)
    return str(path), result
