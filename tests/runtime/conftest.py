"""Small artifacts for runtime tests: a random cifar_resnet20 (non-trivial BN) as checkpoint and ONNX."""

from __future__ import annotations

import pytest
import torch

from repconv.checkpoint import CheckpointMeta, save
from repconv.models import resolve_arch
from tests.conftest import export_onnx_for_tests, randomize_bn

CLASSES = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> str:
    spec = resolve_arch("cifar_resnet20")
    torch.manual_seed(0)
    model = randomize_bn(spec.build(num_classes=10)).eval()
    meta = CheckpointMeta.for_arch(spec, {"num_classes": 10}, class_names=CLASSES)
    path = tmp_path_factory.mktemp("small") / "small.repconv.safetensors"
    save(path, model, meta)
    return str(path)


@pytest.fixture(scope="session")
def small_onnx(small_checkpoint, tmp_path_factory) -> str:
    return export_onnx_for_tests(small_checkpoint, tmp_path_factory.mktemp("small_onnx") / "small.onnx")
