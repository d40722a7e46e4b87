"""Shared fixtures: small traced models and a digits-trained checkpoint built once per session."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import repconv
from repconv.checkpoint import CheckpointMeta, save
from repconv.models import resolve_arch
from repconv.train.data import digits

torch.set_num_threads(int(os.environ.get("REPCONV_TEST_THREADS", "2")))  # 1 is faster on a busy machine


class Chain(nn.Module):
    """Five repeated Linear+LayerNorm units: interior members 1..3 are replaceable."""

    def __init__(self, width: int = 8, depth: int = 5, classes: int = 3):
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.GELU())
                                      for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


@pytest.fixture
def chain() -> nn.Module:
    torch.manual_seed(0)
    return Chain().eval()


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine, so parity checks cannot pass by accident."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


DIGITS_ARCH = "cifar_resnet20"
DIGITS_SIZE = 32


def _train_digits_model(output, epochs: int = 6, seed: int = 0):
    """Train the shared digits checkpoint with repconv's own from-scratch trainer (no replacement)."""
    return repconv.train(DIGITS_ARCH, data="digits", output=output, replace=False, epochs=epochs, batch_size=64,
                         lr=0.1, optimizer="sgd", weight_decay=5e-4, warmup_epochs=1, seed=seed)


def accuracy(model: nn.Module, split: str = "val") -> float:
    spec = resolve_arch(DIGITS_ARCH)
    ds = digits(split, DIGITS_SIZE, spec.mean, spec.std)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, in torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(ds.tensors[0]), batch_size=256)])
    return float((pred == ds.tensors[1]).float().mean())


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> str:
    """Path of a repconv file holding a cifar_resnet20 trained on digits (>= 95% val accuracy)."""
    path = tmp_path_factory.mktemp("digits") / "digits_resnet20.repconv.safetensors"
    result = _train_digits_model(path)
    assert result.val_acc >= 0.95, f"digits fixture reached only {result.val_acc:.1%} validation accuracy"
    return str(path)


@pytest.fixture(scope="session")
def digits_model(digits_checkpoint) -> nn.Module:
    return repconv.load(digits_checkpoint)


def export_onnx_for_tests(checkpoint: str, path) -> str:
    """ONNX of a checkpoint through repconv's own export (legacy exporter: fast; verified; BN kept unfused so
    that parameter counts match the checkpoint's)."""
    repconv.export(checkpoint, path, exporter="legacy", fuse_bn=False)
    return str(path)


@pytest.fixture(scope="session")
def digits_onnx(digits_checkpoint, tmp_path_factory) -> str:
    """Path of the digits checkpoint exported to ONNX (fp32, dynamic batch, repconv metadata)."""
    return export_onnx_for_tests(digits_checkpoint, tmp_path_factory.mktemp("onnx") / "digits_resnet20.onnx")


@pytest.fixture
def run_cli(capsys):
    """Run the `repconv` CLI in-process: returns (exit code, stdout, stderr)."""
    from repconv.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


SMALL_CLASSES = [f"class_{i}" for i in range(10)]


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> str:
    """A random cifar_resnet20 (10 classes named class_0.., non-trivial BN) as a repconv file: fast to make."""
    spec = resolve_arch(DIGITS_ARCH)
    torch.manual_seed(0)
    model = randomize_bn(spec.build(num_classes=10)).eval()
    meta = CheckpointMeta.for_arch(spec, {"num_classes": 10}, class_names=SMALL_CLASSES)
    path = tmp_path_factory.mktemp("small") / "small.repconv.safetensors"
    save(path, model, meta)
    return str(path)


@pytest.fixture(scope="session")
def small_onnx(small_checkpoint, tmp_path_factory) -> str:
    """``small_checkpoint`` as ONNX (dynamic batch, repconv metadata)."""
    return export_onnx_for_tests(small_checkpoint, tmp_path_factory.mktemp("small_onnx") / "small.onnx")
