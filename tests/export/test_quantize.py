"""fp16 and int8 ONNX of the digits-trained ResNet, checked against fp32 on the real validation images."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import DIGITS_ARCH, DIGITS_SIZE

from repconv import api
from repconv.cli import main
from repconv.data import digits
from repconv.errors import RepconvError
from repconv.export.quantize import images
from repconv.models import resolve_arch
from repconv.onnx_graph import ort_session, run_onnx


@pytest.fixture(scope="module")
def fp32_onnx(digits_checkpoint, tmp_path_factory):
    return api.export(digits_checkpoint, tmp_path_factory.mktemp("q") / "fp32.onnx", exporter="legacy").path


def val_logits(path) -> tuple[np.ndarray, np.ndarray]:
    spec = resolve_arch(DIGITS_ARCH)
    x, y = digits("val", DIGITS_SIZE, spec.mean, spec.std).tensors
    return run_onnx(ort_session(path), x), y.numpy()


def test_int8_keeps_top1_agreement_on_digits_val(digits_checkpoint, fp32_onnx, tmp_path, capsys):
    out = tmp_path / "int8.onnx"
    main(["export", digits_checkpoint, "-o", str(out), "--dtype", "int8", "--calib", "digits", "--exporter",
          "legacy"])
    printed = capsys.readouterr().out
    assert "int8" in printed and "top-1" in printed.replace("\n", " ")
    graph = onnx.load(out)
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    conv_weight_scales = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"
                          and any(i.name == n.input[1] and len(i.dims) == 1 and i.dims[0] > 1
                                  for i in graph.graph.initializer)]
    assert conv_weight_scales  # per-channel weight scales
    int8, labels = val_logits(out)
    fp32, _ = val_logits(fp32_onnx)
    agreement = float((int8.argmax(1) == fp32.argmax(1)).mean())
    assert agreement >= 0.98, agreement
    assert float((int8.argmax(1) == labels).mean()) >= 0.95


def test_fp16_keeps_io_fp32_and_agrees(digits_checkpoint, fp32_onnx, tmp_path):
    result = api.export(digits_checkpoint, tmp_path / "fp16.onnx", dtype="fp16", check_images="digits",
                        exporter="legacy")
    check = result.checks[-1]
    assert check.stage == "fp16" and check.reference == "onnx-fp32" and check.passed
    assert "real images" in check.inputs and check.batch_sizes == (359,)
    graph = onnx.load(result.path)
    elem = onnx.TensorProto.FLOAT
    assert graph.graph.input[0].type.tensor_type.elem_type == elem
    assert graph.graph.output[0].type.tensor_type.elem_type == elem
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)
    fp16, _ = val_logits(result.path)
    fp32, _ = val_logits(fp32_onnx)
    assert float((fp16.argmax(1) == fp32.argmax(1)).mean()) >= 0.99
    assert np.abs(fp16 - fp32).max() <= 1e-2 * np.abs(fp32).max()


def test_fp16_without_images_says_so(digits_checkpoint, tmp_path):
    result = api.export(digits_checkpoint, tmp_path / "fp16.onnx", dtype="fp16", exporter="legacy")
    assert any("random inputs" in w for w in result.warnings)


def test_calibration_images_come_from_digits():
    spec = resolve_arch(DIGITS_ARCH)
    x = images("digits", "train", spec.input_size, spec.mean, spec.std, limit=100)
    assert x.shape == (100, 3, 32, 32) and torch.isfinite(x).all() and x.std() > 0.1


def test_missing_calibration_folder_is_a_one_line_error(tmp_path):
    spec = resolve_arch(DIGITS_ARCH)
    with pytest.raises(RepconvError) as exc:
        images(str(tmp_path / "nope"), "train", spec.input_size, spec.mean, spec.std, limit=10)
    assert "\n" not in str(exc.value)
