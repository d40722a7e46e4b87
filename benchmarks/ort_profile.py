"""Where ONNX Runtime spends the time of resnet50 and its parameter-free conversions: kernel time per op type.

Uses ONNX Runtime's own profiler (``SessionOptions.enable_profiling``) on the same exports as
``parameter_free_latency.py`` (conv+BN fused, onnxslim, ORT_ENABLE_ALL). Reports, per model and batch, the
mean wall time of a run, the mean kernel time per op type, and the conv throughput in GMAC/s (the MACs of
the model over its conv time), so that the speed-up can be set against the MAC ratio op by op.

    PYTHONPATH=. python benchmarks/ort_profile.py [--batches 1 8] [--runs 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
from paper_common import err, finish, machine
from parameter_free_latency import build_models, export_for_bench
from rich.console import Console
from rich.table import Table


def profile(path: Path, x: np.ndarray, threads: int, warmup: int, runs: int, prefix: Path) -> dict:
    """Mean wall ms per run, and mean kernel ms and node count per op type over ``runs`` profiled runs."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.enable_profiling, so.profile_file_prefix = threads, True, str(prefix)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        session.run(None, {"input": x})
    t0 = time.perf_counter()
    for _ in range(runs):
        session.run(None, {"input": x})
    wall = (time.perf_counter() - t0) * 1e3 / runs
    events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    timed_from = model_runs[warmup][0]  # the profiler records the warm-up runs too
    kernel_us: dict[str, float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= timed_from:
            kernel_us[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    return {"wall_ms": wall, "ops": {op: {"kernel_ms": us / runs / 1e3, "nodes": nodes[op] // runs}
                                     for op, us in sorted(kernel_us.items(), key=lambda kv: -kv[1])}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="batch 1, 2 runs")
    ap.add_argument("--out", type=Path, default=Path("ort_profile.json"))
    args = ap.parse_args()
    if args.quick:
        args.batches, args.runs, args.warmup = [1], 2, 1
    started = time.perf_counter()
    result: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(args.threads),
                    "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, counts) in build_models().items():
            err.print(f"exporting and profiling {name}")
            path = export_for_bench(model, Path(tmp) / f"{name}.onnx", True)
            entry = result["models"][name] = {"macs": counts["macs"]}
            for b in args.batches:
                x = np.random.default_rng(0).standard_normal((b, 3, 224, 224), dtype=np.float32)
                p = profile(path, x, args.threads, args.warmup, args.runs, Path(tmp) / f"{name}_b{b}")
                conv_ms = p["ops"].get("Conv", {}).get("kernel_ms", 0.0)
                p["conv_gmacs_per_s"] = counts["macs"] * b / (conv_ms * 1e-3) / 1e9 if conv_ms else None
                entry[f"b{b}"] = p
    table = Table(title="ONNX Runtime profile: mean ms per run", title_justify="left")
    for col in ("model", "batch", "wall", "Conv", "MaxPool", "other kernels", "conv GMAC/s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, entry in result["models"].items():
        for b in args.batches:
            p = entry[f"b{b}"]
            ops = {op: v["kernel_ms"] for op, v in p["ops"].items()}
            rest = sum(v for op, v in ops.items() if op not in ("Conv", "MaxPool"))
            table.add_row(name, str(b), f"{p['wall_ms']:.1f}", f"{ops.get('Conv', 0):.1f}",
                          f"{ops.get('MaxPool', 0):.2f}", f"{rest:.2f}", f"{p['conv_gmacs_per_s']:.0f}")
    Console(width=140).print(table)
    finish(result, args.out, started)


if __name__ == "__main__":
    main()
