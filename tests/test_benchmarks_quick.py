"""The benchmarks' ``--quick`` modes run end to end and write the JSON docs/results.md is built from.

Each takes 15-50 s on 2 quiet cores (measured 2026-11-22: scratch 23 s, pretrained 16 s, parameter-free
40 s, deployment 51 s, parameter_free_latency 30 s; 2026-12-02, at load 2-4 from another job: blockwise_recovery
25 s with its four arms, 37 s with seven; search_pareto 21-37 s)."""

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


def run_quick(script: str, tmp_path: Path, *extra: str, machine: bool = True) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", *extra,
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    if machine:
        assert set(result["machine"]) >= MACHINE_KEYS, result["machine"]
    assert result["config"]["quick"] is True
    assert finite(result), "a number in the JSON is NaN or infinite"
    return result


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
    assert all(0.0 <= acc[f]["val_acc_scratch"] <= 1.0 for f in ("pf-all", "pf-hybrid"))


@pytest.mark.filterwarnings("ignore")
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


def test_parameter_free_latency_quick(tmp_path):
    r = run_quick("parameter_free_latency", tmp_path, "--size", "64", machine=False)
    models = r["models"]
    assert models["pf-all"]["params"] == 14_232_232 and models["pf-all"]["macs"] < models["resnet50"]["macs"]
    for name, row in models.items():
        assert row["fold_max_abs_diff"] < 1e-3 and row["onnx_max_abs_diff"] < 1e-2, name
        assert row["ort_b1_ms"] > 0 and row["torch_b8_ms"] > 0
    for policy in ("all", "hybrid"):
        row = models[f"pf-{policy}"]
        lo, hi = row["ort_b1_speedup_range"]
        assert lo <= row["ort_b1_speedup"] <= hi and isinstance(row["meets_target"], bool)


def test_paired_speedups(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # undone after the test, like every monkeypatch
    import latency

    rows = latency.summarize({"base": [10.0, 20.0, 12.0], "fast": [5.0, 8.0, 6.0]}, "base")
    assert rows["base"]["speedup"] == 1.0
    assert rows["fast"]["speedup"] == 2.0 and rows["fast"]["speedup_max"] == 2.5  # pairs 2.0, 2.5, 2.0
    assert rows["fast"]["median_ms"] == 6.0
    timed = latency.block_rounds({"a": lambda: None, "b": lambda: sum(range(10_000))}, rounds=3, block=2, warmup=1)
    assert [len(v) for v in timed.values()] == [3, 3] and all(t >= 0 for v in timed.values() for t in v)


def test_torch_memory_format_quick(tmp_path):
    r = run_quick("torch_memory_format", tmp_path)
    assert set(r["latency"]) == {"mobilenet_v2", "mobilenet_v2/pf-all", "mobilenet_v2/pf-hybrid"}
    for row in r["latency"].values():
        assert set(row) == {"nchw_b1", "channels_last_b1", "nchw_b2", "channels_last_b2"}
        assert all(v["median_ms"] > 0 and v["speedup"] > 0 for v in row.values())
    assert r["latency"]["mobilenet_v2"]["nchw_b1"]["speedup"] == 1.0  # the baseline against itself
    assert set(r["ops"]["median_ms"]) == {f"{op} {fmt}" for op in ("depthwise_conv3x3", "max_pool3x3")
                                          for fmt in ("nchw", "channels_last")}


def test_ort_profile_quick(tmp_path):
    r = run_quick("ort_profile", tmp_path)
    fc_macs = 2048 * 1000  # the head is a Gemm, not a Conv
    base_conv_macs = r["models"]["resnet50"]["macs"] - fc_macs
    for name, ops in (("pf-all", {"MaxPool"}), ("pf-hybrid", {"MaxPool", "AveragePool"})):
        split = r["split"][name]["b1"]
        # every conv of the conversion is matched to one of resnet50's; the rest of resnet50's are its spatial convs
        assert split["shared_conv_macs"] == r["models"][name]["macs"] - fc_macs
        assert split["shared_conv_macs"] + split["removed_conv_macs"] == base_conv_macs
        assert set(split["added_ops"]) == ops and split["added_ms"] > 0
        assert split["speedup_if_added_ops_were_free"] > split["kernel_speedup"] > 1
    assert r["matmul_2048_gmacs_per_s"] > 1


def test_blockwise_recovery_quick(tmp_path):
    r = run_quick("blockwise_recovery", tmp_path)
    (acc,) = r["accuracy"]
    assert acc["arch"] == "mobilenet_v2" and set(acc["forms"]) == {"pf-hybrid"}
    original = acc["original"]
    assert 0.0 <= original["val_acc"] <= 1.0 and original["controls"]
    assert original["val_acc_finetuned"] == max(c["val_acc"] for c in original["controls"])  # the best control
    form = acc["forms"]["pf-hybrid"]
    assert 0.0 <= form["val_acc_converted"] <= 1.0
    config = r["config"]
    assert set(form["arms"]) == set(config["arms"]) >= {"ce", "kd", "local+kd", "local+both", "refit+kd"}
    for arm, row in form["arms"].items():
        assert 0.0 <= row["val_acc"] <= 1.0 and row["seconds"] > 0 and row["lr"] == config["lr"], arm
        assert row["drop_vs_original_finetuned"] == pytest.approx(
            100 * (original["val_acc_finetuned"] - row["val_acc"]), abs=0.01)
        # local distillation counts its epochs against the budget, the least-squares refit one epoch
        spent = config["local_epochs"] * ("local" in arm) + arm.startswith("refit")
        assert row["global_epochs"] == max(config["budget"] - spent, 0) == len(row["history"]), arm
        assert ("local" in row) == ("local" in arm) and ("refit" in row) == arm.startswith("refit"), arm
    for arm in (a for a in form["arms"] if "local" in a):
        local = form["arms"][arm]["local"]
        assert local["units"] and local["trainable_params"] > 0 and local["seconds"] > 0
        assert all(u["before"] >= 0 and u["after"] >= 0 for u in local["units"])
        assert local["mean_error_before"] >= 0 and local["mean_error_after"] >= 0
        assert 0.0 <= form["arms"][arm]["val_acc_after_local"] <= 1.0
    for arm in (a for a in form["arms"] if a.startswith("refit")):
        refit = form["arms"][arm]["refit"]
        assert refit["sites"] and refit["images"] > 0 and refit["seconds"] > 0
        assert all(x["before"] >= 0 and x["after"] >= 0 for x in refit["sites"])
        assert 0.0 <= form["arms"][arm]["val_acc_after_refit"] <= 1.0
    memory = r["memory"]
    for mode in ("global", "local"):
        assert memory[mode]["mode"] == mode and 0 < memory[mode]["train_mem_kb"] <= memory[mode]["peak_kb"]
    assert memory["local_over_global"] == pytest.approx(
        memory["local"]["train_mem_kb"] / memory["global"]["train_mem_kb"], abs=1e-3)


def test_search_pareto_quick(tmp_path):
    r = run_quick("search_pareto", tmp_path)
    budgets = r["config"]["budgets"]
    refused = r.get("refused", {})  # measured on the assembled model, a budget can be out of reach: said why
    assert all("when measured" in why for why in refused.values())
    assert set(r["searched"]) | {f"searched-{b}" for b in map(float, refused)} == {f"searched-{b}" for b in budgets}
    assert f"searched-{budgets[0]}" in r["searched"]  # 0.97: one unit's saving is enough
    for name in ("pf-all", "pf-hybrid"):  # the search's recovery: the refit raced against none
        assert set(r["uniform"][name]["start"]["scores"]) == {"converted", "refit"}
    assert r["uniform"]["replace-every-2"]["start"] is None  # no pool, nothing to refit
    for b in budgets:
        if str(b) in refused:
            continue
        row = r["searched"][f"searched-{b}"]
        assert row["table_reused"] == (b != budgets[0])  # one candidate table, every later budget only a solve
        probes = row["latency_probes"]
        chosen = [p for p in probes if p["choice"] == row["choice"]]  # the plan kept was one of those timed
        assert probes[0]["predicted_ratio"] == probes[0]["table_ratio"] and chosen
        assert row["predicted_ratio"] == pytest.approx(chosen[-1]["predicted_ratio"])
        raced = {c["name"]: c["choice"] for c in row["contenders"]}  # the plan kept won the race, or none was run
        assert raced[row["kept"]] == row["choice"] if raced else row["kept"] == "searched"
        assert row["choice"] and all(u.startswith("layer3.") for u in row["choice"])  # --quick: layer3's units
        assert 0 < row["table_ratio"] <= 1 + 1e-6 and row["predicted_ratio"] > 0
        assert 0.0 <= row["val_acc"] <= 1.0 and 0.0 <= row["agreement"] <= 1.0
        assert row["latency_ms"] > 0
        assert row["speedup"] == pytest.approx(r["original"]["latency_ms"] / row["latency_ms"])
    assert set(r["uniform"]) == {"pf-all", "pf-hybrid", "replace-every-2"}
    assert all(0.0 <= u["val_acc"] <= 1.0 and 0.0 <= u["agreement"] <= 1.0 and u["latency_ms"] > 0
               for u in r["uniform"].values())
    assert set(r["checks"]) == set(r["searched"])
    for check in r["checks"].values():
        assert all(isinstance(check[k], bool) for k in ("not_slower_than_original", "prediction_within_10pct",
                                                        "beats_uniform_at_equal_or_higher_latency"))
        assert set(check["uniform_compared"]) <= set(r["uniform"])
    rows = {row["name"]: row for row in r["pareto"]}
    assert set(rows) == {"original"} | set(r["searched"]) | set(r["uniform"])
    assert rows["original"]["speedup"] == 1.0 and any(row["pareto"] for row in rows.values())
    assert Path(r["plot"]).read_bytes().startswith(b"\x89PNG")


def test_table_latency_stability_quick(tmp_path):
    r = run_quick("table_latency_stability", tmp_path)
    assert set(r["settings"]) == {"1", "2"} and r["base_ms"] > 0 and r["fastest_measured_ratio"] > 0
    for setting in r["settings"].values():
        assert len(setting["builds"]) == 2 and setting["mean_unit_saving_sd_ms"] >= 0
        for build in setting["builds"]:
            assert build["best_saving_ms"] and build["fastest_ratio"] <= 1 and build["seconds"] > 0


def test_race_curves_quick(tmp_path):
    r = run_quick("race_curves", tmp_path)
    arms = r["arms"]
    assert set(arms) >= {"pf-hybrid", "pf-all"}
    for a in arms.values():
        assert [run["seed"] for run in a["runs"]] == [0, 1] and all(len(run["holdout"]) == 2 for run in a["runs"])
        assert min(run["end"] for run in a["runs"]) <= a["end_mean"] <= max(run["end"] for run in a["runs"])
    assert set(r["races"]) == {"epoch 1", "epoch 2", "halving 1,2"}
    best = max(a["end_mean"] for a in arms.values())
    for race in r["races"].values():
        assert all(name in arms for name in race["kept"])
        assert race["regret_points"] == [round(100 * (best - arms[n]["end_mean"]), 2) for n in race["kept"]]


def test_race_replays_keep_what_the_race_keeps(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import race_curves

    # "slow" is last after epoch 1 and first from epoch 3: one epoch keeps "fast", halving over 1,3 keeps "slow"
    curves = {"fast": [0.7, 0.8, 0.85], "mid": [0.5, 0.6, 0.7], "slow": [0.3, 0.85, 0.9], "late": [0.2, 0.3, 0.95]}
    assert race_curves.kept_after(curves, 1) == "fast" and race_curves.kept_after(curves, 3) == "late"
    assert race_curves.kept_by_halving(curves, [1, 3]) == "fast"  # "slow" and "late" drop at rung 1 (half of 4)
    curves.pop("late")
    assert race_curves.kept_by_halving(curves, [1, 3]) == "fast"  # 3 -> 2 ("fast", "mid") -> "fast"
    curves["mid"] = [0.2, 0.3, 0.4]
    assert race_curves.kept_by_halving(curves, [1, 3]) == "slow"  # 3 -> 2 ("fast", "slow") -> "slow" at epoch 3


def test_every_committed_result_renders():
    """docs/results.md's tables come from render_results.py: every committed JSON it knows must render."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render_results.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("blockwise_recovery_mobilenet_v2.json", "search_pareto_resnet50.json", "bn_stats_recovery.json",
                 "table_latency_stability.json"):
        assert f"<!-- {name} -->" in done.stdout
    assert "| searched, budget 0.9 |" in done.stdout
