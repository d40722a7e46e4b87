"""The GPU check's CPU dry run (``benchmarks/gpu_check.py --device cpu --quick``): it runs every CPU-runnable
piece for real at toy scale, writes the same JSON schema as the GPU run, and marks the CUDA-only checks
skipped with the reason. About 60 s on 2 quiet cores (one thread)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"correctness_digits", "correctness_resnet50", "cli", "latency_parameter_free", "training_cost", "ddp",
         "search"}
CUDA_ONLY = {  # part -> checks that need CUDA
    "correctness_digits": {"pipeline_cuda_bf16", "pipeline_cuda_fp32", "cuda_bf16_vs_cpu", "cuda_fp32_vs_cpu"},
    "correctness_resnet50": {"pipeline_cuda_bf16", "pipeline_cuda_fp32", "cuda_bf16_vs_cpu", "cuda_fp32_vs_cpu"},
    "cli": {"predict_cuda", "bench_cuda", "bench_ort_cuda", "bench_tensorrt"},
    "latency_parameter_free": {"fp16_bf16", "cudagraph"},
    "training_cost": {"peak_memory_cuda", "bf16_autocast"},
    "ddp": {"nccl_world1_vs_plain"},
    "search": {"search_ort-cuda", "search_tensorrt"},
}
CPU_RUN = {  # part -> checks that must run (ok) on the CPU
    "correctness_digits": {"pipeline_cpu_fp32"},
    "correctness_resnet50": {"pipeline_cpu_fp32"},
    "cli": {"predict_cpu", "bench_cpu"},
    "latency_parameter_free": {"fp32_b1_eager", "fp32_b2_eager"},
    "training_cost": {f"{m}/{arm}" for m in ("cifar_resnet56", "vit_b_16")
                      for arm in ("end-to-end", "replace-every-2", "replace-every-2 (autograd synthesis)")},
    "ddp": {"gloo_world1_vs_plain"},
    "search": {"search_torch-nchw"},
}


def numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)
    elif isinstance(obj, float):
        yield obj


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # generous caps: the work is small, but CI machines can be busy
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--cap-s", "240", "--budget-s", "1500", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "summary.md").read_text()


def test_schema(dry_run):
    report, _ = dry_run
    assert report["schema"] == "repconv-gpu-check/1"
    assert set(report) >= {"schema", "command", "config", "machine", "parts", "wall_s"}
    assert report["config"]["device"] == "cpu" and report["config"]["quick"] is True
    assert {"torch", "cuda_runtime", "gpu", "loadavg_1m", "packages"} <= set(report["machine"])
    assert set(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert {"status", "reason", "seconds", "cap_s", "config", "checks", "results", "machine"} <= set(part), name
        assert part["status"] in ("ok", "failed", "skipped"), name
        assert part["config"], name
        assert {"torch", "cuda_runtime", "gpu", "machine_at_start", "machine_at_end"} <= set(part["machine"])
        for key, c in part["checks"].items():
            assert c["status"] in ("ok", "failed", "skipped"), (name, key)
            if c["status"] != "ok":
                assert c["reason"], (name, key)
    assert all(math.isfinite(x) for x in numbers(report)), "a number in the JSON is NaN or infinite"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA reports")
def test_cuda_only_checks_are_skipped_with_the_reason(dry_run):
    report, _ = dry_run
    for name, keys in CUDA_ONLY.items():
        checks = report["parts"][name]["checks"]
        for key in keys:
            assert checks[key]["status"] == "skipped", (name, key, checks[key])
            assert "CUDA" in checks[key]["reason"], (name, key)


def test_cpu_parts_ran(dry_run):
    report, _ = dry_run
    for name, keys in CPU_RUN.items():
        part = report["parts"][name]
        assert part["status"] == "ok", (name, part["reason"])
        for key in keys:
            assert part["checks"][key]["status"] == "ok", (name, key, part["checks"][key])
    parts = report["parts"]
    for model in ("digits", "resnet50"):
        run = parts[f"correctness_{model}"]["checks"]["pipeline_cpu_fp32"]
        assert run["replaced_units"] and run["steps"] > 0 and run["train_loss"] > 0
        assert run["fold_parity_max_rel"] <= 1e-5 and run["kl_after"] <= run["kl_before"] + 1e-9
    assert 0 <= parts["correctness_digits"]["checks"]["pipeline_cpu_fp32"]["val_acc"] <= 1
    table = parts["latency_parameter_free"]["results"]["table"]
    assert all(r[m]["median_ms"] > 0 and r[m]["speedup"] > 0 for r in table.values() for m in r)
    for rows in parts["training_cost"]["results"].values():
        e2e, rl = rows["end-to-end"], rows["replace-every-2"]
        assert rl["params"] < e2e["params"] and rl["step_s"] > 0
        assert rl["vs_end_to_end"]["params_grads_optimizer_bytes_saved"] > 0
        # the synthesized weights the convs / linears save for backward (fp32: no autocast copy)
        assert rl["vs_end_to_end"]["saved_for_backward_extra_bytes"] > 0
    searched = parts["search"]["checks"]["search_torch-nchw"]
    assert searched["choice"] and searched["fold_parity_max_rel"] <= 1e-5 and searched["onnx_verified"]
    assert searched["loaded_on"] == "cpu" and 0 <= searched["agreement"] <= 1
    assert searched["start"] is None or searched["start"]["chosen"] in ("converted", "refit")  # raced if kept
    ddp = parts["ddp"]["checks"]["gloo_world1_vs_plain"]
    assert ddp["ddp_wrapped"] and ddp["fit_ranks_in_sync"] and ddp["fit_params_max_abs_diff"] <= 1e-5


def test_summary_written(dry_run):
    report, summary = dry_run
    assert summary.startswith("# repconv GPU check")
    for name in PARTS:
        assert f"## {name}: {report['parts'][name]['status']}" in summary


def _module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def test_time_caps_nest():
    import signal
    import time

    g = _module()
    before = signal.getitimer(signal.ITIMER_REAL)[0]  # pytest-timeout's own alarm, if it set one
    with pytest.raises(g.PartTimeout), g.time_cap(0.3):
        with g.time_cap(5.0):  # the inner cap cannot outlive the outer one
            assert signal.getitimer(signal.ITIMER_REAL)[0] <= 0.3
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 0.3  # the outer cap runs on after the inner one
        time.sleep(2)
    after = signal.getitimer(signal.ITIMER_REAL)[0]  # and whatever ran before runs on
    assert (after == 0) if before == 0 else (0 < after <= before)


def test_part_status():
    g = _module()
    assert g.part_status({"a": g.check("ok"), "b": g.skipped("why")}) == ("ok", None)
    assert g.part_status({"a": g.check("failed", "boom"), "b": g.check("ok")}) == ("failed", "a: boom")
    assert g.part_status({"a": g.skipped("x"), "b": g.skipped("y")}) == ("skipped", "x; y")
