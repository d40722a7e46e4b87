"""Verified ONNX export: fp32 parity with PyTorch, dynamic batch, metadata, op counts, bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torchvision
from helpers import has_replaceable_unit, randomize_bn

from repconv import api
from repconv.checkpoint import CheckpointMeta, Loaded
from repconv.cli import main
from repconv.errors import NothingToReplace, RepconvError, VerificationError
from repconv.export import onnx as onnx_export
from repconv.export.onnx import export_onnx
from repconv.models import resolve_arch
from repconv.onnx_graph import ort_session, read_metadata, run_onnx


def test_digits_export_dynamo_default(digits_checkpoint, tmp_path):
    out = tmp_path / "digits.onnx"
    result = api.export(digits_checkpoint, out)
    assert result.exporter == "dynamo" and result.opset == onnx_export.resolve_opset(None, "dynamo")
    assert [c.stage for c in result.checks] == ["export", "simplify"]
    assert all(c.passed and c.max_abs <= 1e-4 and c.batch_sizes == (1, 3) for c in result.checks)
    graph = onnx.load(out)
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # symbolic batch survived the export
    meta = read_metadata(out)
    assert meta["arch"] == "repconv:cifar_resnet20" and meta["dtype"] == "fp32"
    assert json.loads(meta["input_size"]) == [3, 32, 32] and json.loads(meta["class_names"])[3] == "3"
    assert len(json.loads(meta["mean"])) == 3 and meta["repconv_version"]
    # runs at a batch size the export never saw, and matches PyTorch there
    model = api.load(digits_checkpoint)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(run_onnx(ort_session(out), x) - ref).max() <= 1e-4


def test_static_batch(digits_checkpoint, tmp_path):
    result = api.export(digits_checkpoint, tmp_path / "s.onnx", dynamic_batch=False, batch_size=4,
                        exporter="legacy")
    dim = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 4 and result.checks[0].batch_sizes == (4, 4)
    assert read_metadata(result.path)["batch_size"] == "4"


def test_folded_replacement_onnx_has_the_original_ops(tmp_path):
    torch.manual_seed(0)
    spec = resolve_arch("cifar_resnet20")
    original = randomize_bn(spec.build(num_classes=10)).eval()
    conversion = api.convert(original, arch="cifar_resnet20")
    folded = api.export(conversion, tmp_path / "folded.onnx", exporter="legacy")
    plain = export_onnx(original, tmp_path / "plain.onnx", meta=CheckpointMeta.for_arch(spec), exporter="legacy")
    assert folded.ops_before == plain.ops_before and folded.ops_after == plain.ops_after
    assert folded.ops_after["Conv"] == 19 + 2  # 19 convs + 2 shortcut convs, BN fused away
    assert "BatchNormalization" not in folded.ops_after and "Mul" not in folded.ops_after  # no synthesis


CI_SUBSET = ["resnet34", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf",
             "vit_b_16"]


def convert_fold_export(name: str, tmp_path, size: int, exporter: str = "legacy", simplify: bool = True):
    """Replacement convert -> fold -> ONNX; the folded weights also load strictly into the torchvision class."""
    spec = resolve_arch(name)
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    torch.manual_seed(0)
    model = randomize_bn(spec.build(**kwargs)).eval()
    with torch.no_grad():  # zero-initialized heads (ViT) would make every logit 0 and parity vacuous
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(std=0.02)
    meta = CheckpointMeta.for_arch(spec, kwargs)
    meta.input_size = (3, size, size)
    try:
        source = api.convert(Loaded(model, meta))
    except NothingToReplace:
        assert not has_replaceable_unit(model), f"{name} has interior units, yet nothing was replaced"
        source = Loaded(model, meta)
    else:
        folded = api.fold(source)
        assert folded.folded_units == source.summary.replaced_units and folded.folded_units
        plain = getattr(torchvision.models, name)(**kwargs).eval()
        plain.load_state_dict(folded.model.state_dict(), strict=True)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(plain(x), source.model(x))
        del folded, plain, model  # vit_h_14 and regnet_y_128gf hold 2.5 GB per copy
    result = api.export(source, tmp_path / f"{name}.onnx", exporter=exporter, simplify=simplify)
    assert result.checks and all(c.passed for c in result.checks)
    assert result.parity["max_abs"] <= 1e-4 or result.parity["max_rel"] <= 1e-4
    return result


@pytest.mark.parametrize("name", CI_SUBSET)
def test_torchvision_ci_subset(name, tmp_path):
    # onnxslim is exercised by the digits tests; skipping it here saves a third of the time
    convert_fold_export(name, tmp_path, size=64 if not name.startswith("vit_") else 32, simplify=False)


ALL = torchvision.models.list_models(module=torchvision.models)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_torchvision_sweep(name, tmp_path):
    size = resolve_arch(name).input_size[1]
    try:
        convert_fold_export(name, tmp_path, size, exporter="dynamo")
    except RepconvError as exc:  # the documented escape hatch: --exporter legacy
        if "cannot export" not in str(exc) and "fixed batch" not in str(exc):
            raise
        convert_fold_export(name, tmp_path, size, exporter="legacy")


# ---------------------------------------------------------------- bad input


def cli(*args) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


def test_cli_export_json(digits_checkpoint, tmp_path, capsys):
    main(["export", digits_checkpoint, "-o", str(tmp_path / "d.onnx"), "--exporter", "legacy", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["parity"]["max_abs"] <= 1e-4 and report["ops_after"]["Conv"] == 21
    assert report["metadata"]["repconv.dtype"] == "fp32"


@pytest.mark.parametrize("case", ["not-a-model", "opset", "parity", "int8-no-calib", "suffix"])
def test_cli_export_bad_input(case, digits_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.onnx"
    args = ["export", digits_checkpoint, "-o", out, "--exporter", "legacy"]
    expect = {"not-a-model": "not a PyTorch checkpoint", "opset": "newer than onnxruntime",
              "parity": "ONNX export check failed", "int8-no-calib": "calibration images",
              "suffix": "does not end in .onnx"}[case]
    if case == "not-a-model":
        bad = tmp_path / "notes.pt"
        bad.write_text("hello")
        args[1] = bad
    elif case == "opset":
        args += ["--opset", "99"]
    elif case == "parity":
        monkeypatch.setattr(onnx_export, "FP32_ABS_TOLERANCE", 0.0)
    elif case == "int8-no-calib":
        args += ["--dtype", "int8"]
    else:
        out = tmp_path / "out.bin"
        args[3] = out
    assert cli(*args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    if case == "parity":  # it fails after work began: on a slow machine, timed progress lines come first
        lines = [ln for ln in lines if not ln.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
    assert list(tmp_path.glob("out*")) == [] and not list(tmp_path.glob(".out*"))


def test_converted_module_is_refused_by_export_onnx(tmp_path):
    torch.manual_seed(0)
    conversion = api.convert(resolve_arch("cifar_resnet20").build(num_classes=10), arch="cifar_resnet20")
    with pytest.raises(RepconvError, match="fold it first"):
        export_onnx(conversion.model, tmp_path / "c.onnx", meta=conversion.meta)


def test_parity_failure_in_python_api(digits_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "FP32_ABS_TOLERANCE", 0.0)
    with pytest.raises(VerificationError, match="nothing was written"):
        api.export(digits_checkpoint, tmp_path / "x.onnx", exporter="legacy")
    assert list(tmp_path.iterdir()) == []


def test_mean_and_std_overrides_reach_the_onnx_metadata(small_checkpoint, tmp_path):
    out = tmp_path / "m.onnx"
    api.export(small_checkpoint, out, exporter="legacy", simplify=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    meta = read_metadata(out)
    assert json.loads(meta["mean"]) == [0.5, 0.5, 0.5] and json.loads(meta["std"]) == [0.5, 0.5, 0.5]


def test_verification_sessions_do_not_spin(small_onnx):
    """A session kept alive after a check must not burn CPU that torch needs (issue 15)."""
    session = ort_session(small_onnx)
    options = session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
