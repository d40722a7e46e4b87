"""The paper benchmarks' ``--quick`` modes run end to end and write the JSON docs/results.md is built from."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MACHINE_KEYS = {"cpu", "threads", "python", "torch", "torchvision", "onnxruntime", "loadavg_1m_at_start"}


def finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


def run_quick(script: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["machine"]) >= MACHINE_KEYS, result["machine"]
    assert result["config"]["quick"] is True
    assert finite(result), "a number in the JSON is NaN or infinite"
    return result


@pytest.mark.slow  # trains or exports resnet50s: minutes even in --quick mode
def test_replacement_scratch_quick(tmp_path):
    r = run_quick("paper_replacement_scratch", tmp_path)
    modes = r["models"]["cifar_resnet32"]
    e2e, rl = modes["end-to-end"], modes["replace-every-2"]
    assert e2e["trainable_params"] == e2e["params"] == 466_906  # CIFAR ResNet-32, 10 classes
    assert e2e["replaced_units"] == [] and len(rl["replaced_units"]) == 4
    assert rl["trainable_params"] < e2e["trainable_params"]  # the replaced units keep only their two scalars
    for s in (e2e, rl):
        assert 0.0 <= s["val_acc"]["mean"] <= 1.0
        assert s["train_mem_mb"]["mean"] > 0 and s["epoch_s"]["mean"] > 0


@pytest.mark.slow  # trains or exports resnet50s: minutes even in --quick mode
def test_replacement_pretrained_quick(tmp_path):
    r = run_quick("paper_replacement_pretrained", tmp_path)
    assert set(r["sweeps"]) == {"position", "measured"}
    for points in r["sweeps"].values():
        (p,) = points
        assert p["k"] == 1 and p["params_after"] < p["params_before"]
        assert 0 < p["fraction_replaced"] < 0.05
        for key in ("acc_converted", "acc_calibrated", "acc_finetuned"):
            assert 0.0 <= p[key] <= 1.0
        assert p["kl_after"] <= p["kl_before"] + 1e-6  # calibration never makes the fit worse


@pytest.mark.slow  # trains or exports resnet50s: minutes even in --quick mode
def test_parameter_free_quick(tmp_path):
    r = run_quick("paper_parameter_free", tmp_path)
    paper = {"resnet50": (25.6, 4.1), "resnet50/pf-all": (14.2, 2.2), "resnet50/pf-hybrid": (17.3, 2.6)}
    for name, (params_m, macs_g) in paper.items():
        row = r["counts"][name]
        assert round(row["params"] / 1e6, 1) == params_m and round(row["macs"] / 1e9, 1) == macs_g, (name, row)
        assert row["matches_paper"]
    assert r["counts"]["mobilenet_v2/pf-all"]["params"] < r["counts"]["mobilenet_v2"]["params"]
    for name, row in r["latency"].items():
        assert row["onnx_max_abs_diff"] < 1e-2, name
        assert all(row[k] > 0 for k in row if k.endswith("_ms"))
    (acc,) = r["accuracy"]
    assert acc["pf-all"]["params"] < acc["original"]["params"]
    assert all(0.0 <= acc[f]["val_acc_finetuned"] <= 1.0 for f in ("original", "pf-all", "pf-hybrid"))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.slow  # trains or exports resnet50s: minutes even in --quick mode
def test_deployment_quick(tmp_path):
    r = run_quick("paper_deployment", tmp_path)
    forms = r["forms"]
    assert set(forms) == {"original", "replacement-folded", "pf-all"}
    assert forms["replacement-folded"]["params"] == forms["original"]["params"]  # folding restores the architecture
    assert forms["pf-all"]["params"] < forms["original"]["params"]
    for row in forms.values():
        for rt in ("torch", "onnx-fp32", "onnx-int8"):
            assert row[rt]["b1_ms"] > 0 and row[rt]["b2_ms"] > 0
        assert row["onnx-fp32"]["max_abs_vs_reference"] < 1e-2
        assert row["onnx-int8"]["file_mb"] < row["onnx-fp32"]["file_mb"]
