"""Where ONNX Runtime spends the time of resnet50 and its parameter-free conversions: kernel time per op type.

Uses ONNX Runtime's own profiler (``SessionOptions.enable_profiling``) on the same exports as
``parameter_free_latency.py`` (conv+BN fused, onnxslim, ORT_ENABLE_ALL). Reports, per model and batch, the
mean wall time of a run, the mean kernel time per op type, and the conv throughput in GMAC/s (the MACs of
the model over its conv time), so that the speed-up can be set against the MAC ratio op by op.

Then it splits each conversion's kernels against resnet50's, node by node (a node is matched by op and
input/output shapes): *shared* nodes run in both graphs (the stem, every 1x1 conv, the downsample convs,
the head), *removed* ones only in resnet50 (the spatial convs), *added* ones only in the conversion (the
pools). From that split it prints the speed-up the conversion would reach **if its added ops cost
nothing**: resnet50's kernel time over the conversion's shared kernel time. That is the ceiling no
rewriting of the pools can pass; only making the shared convs faster could, and the script measures how
far they are from the machine's own fp32 matrix-multiply rate (an ONNX Runtime MatMul of 2048^3).

    PYTHONPATH=. python benchmarks/ort_profile.py [--batches 1 8] [--runs 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def conv_macs(args: dict) -> int:
    """MACs of one profiled Conv node from its logical shapes: output elements x weights per output."""
    (w_shape,), (y_shape,) = args["input_type_shape"][1].values(), args["output_type_shape"][0].values()
    return int(np.prod(y_shape) * np.prod(w_shape[1:]))


def node_key(args: dict) -> str:
    """What matches a node across two graphs: its op and its input and output shapes."""
    return json.dumps([args["op_name"], args["input_type_shape"], args["output_type_shape"]])


def profile(path: Path, x: np.ndarray, threads: int, warmup: int, runs: int, prefix: Path) -> dict:
    """Mean wall ms per run; mean kernel ms and node count per op type and per node signature."""
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
    signatures: dict[str, dict] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= timed_from:
            op = e["args"]["op_name"]
            kernel_us[op] += e["dur"]
            nodes[op] += 1
            sig = signatures.setdefault(node_key(e["args"]), {
                "op": op, "us": 0.0, "count": 0, "macs": conv_macs(e["args"]) if op == "Conv" else 0})
            sig["us"] += e["dur"]
            sig["count"] += 1
    return {"wall_ms": wall, "ops": {op: {"kernel_ms": us / runs / 1e3, "nodes": nodes[op] // runs}
                                     for op, us in sorted(kernel_us.items(), key=lambda kv: -kv[1])},
            "signatures": {k: {"op": v["op"], "nodes": v["count"] // runs, "kernel_ms": v["us"] / runs / 1e3,
                               "macs_per_node": v["macs"]} for k, v in signatures.items()}}


def split_against(base: dict, other: dict) -> dict:
    """Kernel ms of ``other`` split into nodes shared with ``base`` and nodes only it has, and the bound.

    Nodes are matched by signature, as many times as both graphs hold one; a signature's time is spread
    evenly over its nodes.
    """
    out = {"shared_ms": 0.0, "added_ms": 0.0, "removed_ms": 0.0, "shared_conv_macs": 0, "shared_conv_ms": 0.0,
           "removed_conv_macs": 0, "removed_conv_ms": 0.0, "added_ops": defaultdict(float)}
    for key in base["signatures"].keys() | other["signatures"].keys():
        b, o = base["signatures"].get(key), other["signatures"].get(key)
        nb, no = (b["nodes"] if b else 0), (o["nodes"] if o else 0)
        shared = min(nb, no)
        if o:
            per_node = o["kernel_ms"] / no
            out["shared_ms"] += shared * per_node
            out["added_ms"] += (no - shared) * per_node
            if no > shared:
                out["added_ops"][o["op"]] += (no - shared) * per_node
            if o["op"] == "Conv":
                out["shared_conv_macs"] += shared * o["macs_per_node"]
                out["shared_conv_ms"] += shared * per_node
        if b and nb > shared:
            per_node = b["kernel_ms"] / nb
            out["removed_ms"] += (nb - shared) * per_node
            if b["op"] == "Conv":
                out["removed_conv_macs"] += (nb - shared) * b["macs_per_node"]
                out["removed_conv_ms"] += (nb - shared) * per_node
    base_ms = sum(v["kernel_ms"] for v in base["ops"].values())
    other_ms = out["shared_ms"] + out["added_ms"]
    out["added_ops"] = dict(out["added_ops"])
    out["kernel_speedup"] = base_ms / other_ms
    out["speedup_if_added_ops_were_free"] = base_ms / out["shared_ms"]
    out["shared_conv_gmacs_per_s"] = gmacs(out["shared_conv_macs"], out["shared_conv_ms"])
    out["removed_conv_gmacs_per_s"] = gmacs(out["removed_conv_macs"], out["removed_conv_ms"])
    return out


def gmacs(macs: float, ms: float) -> float | None:
    return macs / (ms * 1e-3) / 1e9 if ms else None


def matmul_peak(threads: int, n: int = 2048, runs: int = 10) -> float:
    """GMAC/s of an ONNX Runtime fp32 MatMul n x n x n: what this machine's MLAS reaches on plain GEMM."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [weight])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = {"x": rng.standard_normal((n, n), dtype=np.float32)}
    session.run(None, x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, x)
        times.append(time.perf_counter() - t0)
    return n**3 / statistics.median(times) / 1e9


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
                p["conv_gmacs_per_s"] = gmacs(counts["macs"] * b, conv_ms)
                entry[f"b{b}"] = p
    result["matmul_2048_gmacs_per_s"] = matmul_peak(args.threads)
    base = result["models"]["resnet50"]
    result["split"] = {name: {f"b{b}": split_against(base[f"b{b}"], entry[f"b{b}"]) for b in args.batches}
                       for name, entry in result["models"].items() if name != "resnet50"}
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
    console = Console(width=160)
    console.print(table)
    split = Table(title="Against resnet50, node by node: kernel ms per run, and the speed-up if the added ops were "
                  f"free (fp32 MatMul 2048^3 here: {result['matmul_2048_gmacs_per_s']:.0f} GMAC/s)",
                  title_justify="left")
    for col in ("model", "batch", "shared", "added (ops)", "removed", "speed-up", "if added were free",
                "shared conv GMAC/s", "removed conv GMAC/s"):
        split.add_column(col, justify="left" if col == "model" else "right")
    for name, per_batch in result["split"].items():
        for b in args.batches:
            s = per_batch[f"b{b}"]
            added = ", ".join(f"{op} {ms:.1f}" for op, ms in s["added_ops"].items())
            split.add_row(name, str(b), f"{s['shared_ms']:.1f}", f"{s['added_ms']:.1f} ({added})",
                          f"{s['removed_ms']:.1f}", f"{s['kernel_speedup']:.2f}x",
                          f"{s['speedup_if_added_ops_were_free']:.2f}x", f"{s['shared_conv_gmacs_per_s']:.0f}",
                          f"{s['removed_conv_gmacs_per_s']:.0f}")
    console.print(split)
    finish(result, args.out, started)


if __name__ == "__main__":
    main()
