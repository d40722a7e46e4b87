"""Shared fixtures: small traced models and a digits-trained checkpoint built once per session."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import (
    DIGITS_ARCH,
    SMALL_CLASSES,
    Chain,
    CliResult,
    export_onnx_for_tests,
    quick_search_options,
    randomize_bn,
    run_in_child,
    run_in_process,
    train_digits_model,
)
from torch import nn

import repconv
from repconv.checkpoint import CheckpointMeta, save
from repconv.models import resolve_arch

torch.set_num_threads(int(os.environ.get("REPCONV_TEST_THREADS", "2")))  # 1 is faster on a busy machine


@pytest.fixture
def chain() -> nn.Module:
    torch.manual_seed(0)
    return Chain().eval()


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory) -> str:
    """Path of a repconv file holding a cifar_resnet20 trained on digits (>= 95% val accuracy)."""
    path = tmp_path_factory.mktemp("digits") / "digits_resnet20.repconv.safetensors"
    result = train_digits_model(path)
    assert result.val_acc >= 0.95, f"digits fixture reached only {result.val_acc:.1%} validation accuracy"
    return str(path)


@pytest.fixture(scope="session")
def digits_model(digits_checkpoint) -> nn.Module:
    return repconv.load(digits_checkpoint)


@pytest.fixture(scope="session")
def digits_onnx(digits_checkpoint, tmp_path_factory) -> str:
    """Path of the digits checkpoint exported to ONNX (fp32, dynamic batch, repconv metadata)."""
    return export_onnx_for_tests(digits_checkpoint, tmp_path_factory.mktemp("onnx") / "digits_resnet20.onnx")


@pytest.fixture
def run_cli(capsys):
    """Run the `repconv` CLI: in this process (default), or in a child process with ``child=True`` (one
    thread, as a user's shell would run it). Returns a CliResult (``code, stdout, stderr``)."""
    def run(*args, child: bool = False, timeout: float = 600) -> CliResult:
        return run_in_child(*args, timeout=timeout) if child else run_in_process(capsys, *args)

    return run


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


@pytest.fixture(scope="session")
def searched(digits_checkpoint, tmp_path_factory):
    """(output folder, SearchResult) of one quick search of the digits model (``quick_search_options``) with an
    unbounded drop: its folder holds what a search writes (table, checkpoint, search.json, pareto.png)."""
    from repconv.search.run import search

    out = tmp_path_factory.mktemp("search")
    return out, search(digits_checkpoint, "digits", out, max_drop=100.0, options=quick_search_options())
