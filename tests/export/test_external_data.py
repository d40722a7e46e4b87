"""ONNX files with external weights (FILE.onnx.data): written, checked, run and measured like single files."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from repconv import api
from repconv.checkpoint import CheckpointMeta
from repconv.export.onnx import export_onnx
from repconv.onnx_graph import PROTOBUF_LIMIT, data_file, ort_session, run_onnx, save_onnx, too_large


def test_save_onnx_leaves_the_graph_whole(digits_onnx, tmp_path):
    graph = onnx.load(digits_onnx)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    path = save_onnx(graph, tmp_path / "m.onnx", external=True)
    assert data_file(path).stat().st_size > path.stat().st_size  # the weights moved out
    after = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}  # still usable in memory
    reloaded = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
    for name, value in before.items():
        assert np.array_equal(after[name], value) and np.array_equal(reloaded[name], value)


def test_cli_export_external_data_runs_everywhere(digits_checkpoint, run_cli, tmp_path):
    out = tmp_path / "ext.onnx"
    code, stdout, _ = run_cli("export", digits_checkpoint, "-o", out, "--exporter", "legacy", "--external-data",
                              "--json")
    assert code == 0
    report = json.loads(stdout)
    data = data_file(out)
    assert report["data_file"] == str(data) and report["file_size"] == out.stat().st_size + data.stat().st_size
    assert out.stat().st_size < 100_000 < data.stat().st_size  # graph alone; ~1 MB of weights beside it
    assert report["parity"]["max_abs"] <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]  # nothing staged left
    assert data.stat().st_mode & 0o777 == out.stat().st_mode & 0o777  # readable by whoever can read the graph
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = api.load(digits_checkpoint)(x).numpy()
    assert np.abs(run_onnx(ort_session(out), x) - ref).max() <= 1e-4
    code, stdout, _ = run_cli("bench", out, "--repeats", "2", "--warmup", "1", "--batch", "1", "--json")
    assert code == 0, stdout
    assert json.loads(stdout)["targets"][0]["file_bytes"] == report["file_size"]


def test_fp16_with_external_data(digits_checkpoint, tmp_path):
    result = api.export(digits_checkpoint, tmp_path / "h.onnx", exporter="legacy", dtype="fp16", external_data=True,
                        check_images="digits")
    assert result.data_file.is_file() and result.checks[-1].stage == "fp16" and result.checks[-1].passed


class Wide(nn.Module):
    """An image classifier with 2.15 GB of fp32 weights: over protobuf's limit, cheap to run (16x16 inputs)."""

    def __init__(self, hidden: int = 700_000):
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, hidden, bias=False)
        self.head = nn.Linear(hidden, 10, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x.flatten(1))))


@pytest.mark.slow
def test_graph_over_2gib_is_written_with_external_weights(tmp_path):
    torch.manual_seed(0)
    model = Wide().eval()
    nn.init.normal_(model.fc.weight, std=0.05)
    meta = CheckpointMeta(arch=None, input_size=(3, 16, 16))
    out = tmp_path / "wide.onnx"
    result = export_onnx(model, out, meta=meta, exporter="legacy")
    assert result.data_file == data_file(out) and data_file(out).stat().st_size > PROTOBUF_LIMIT
    assert [c.stage for c in result.checks] == ["export"] and result.checks[0].passed
    assert any("onnxslim was skipped" in w for w in result.warnings)  # onnxslim cannot size such a graph
    assert not too_large(onnx.load(out, load_external_data=False))
