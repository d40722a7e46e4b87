"""`repconv report` for a user's own artifacts: a run record measured now, then the same HTML report."""

from __future__ import annotations

import json

from repconv import api
from repconv.report import read_run


def test_record_run_of_a_checkpoint_and_its_onnx(digits_checkpoint, digits_onnx, tmp_path):
    out = api.record_run([digits_checkpoint, digits_onnx], tmp_path / "run", data="digits")
    run = read_run(out)
    first, onnx = run.stages
    assert first.kind == "model" and onnx.kind == "onnx" and first.parity == []
    assert onnx.parity[0].max_abs < 1e-3 and onnx.parity[0].top1_agreement == 1.0
    assert first.val_acc >= 0.9 and abs(first.val_acc - onnx.val_acc) <= 0.01
    assert first.params > 0 and onnx.params > 0 and first.file_size > 0 and run.data["images"] > 300
    html = api.report(out).path.read_text()
    assert "digits_resnet20" in html and "Parity" in html


def test_report_cli_takes_artifacts(run_cli, small_checkpoint, small_onnx, tmp_path):
    code, out, err = run_cli("report", small_checkpoint, small_onnx, "--out", tmp_path / "r", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert [s["name"] for s in summary["stages"]] == ["small.repconv", "small"]
    assert (tmp_path / "r" / "run.json").is_file() and (tmp_path / "r" / "report.html").is_file()
