"""int8 (static QDQ) vs fp32 ONNX Runtime latency at batch 8, CPU.

Exports one torchvision model twice with repconv's verified export (fp32, and int8 calibrated on the
digits images), then times both in ONNX Runtime at the deployment optimization level. Target: int8 at
least 1.5x faster than fp32. Random weights with randomized BN statistics: latency does not depend on
the values, and the int8 agreement figure is printed for information only (a trained model is checked in
tests/export/test_quantize.py).

    python benchmarks/int8_latency.py [--quick] [--out int8_latency.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from repconv.checkpoint import CheckpointMeta
from repconv.export.onnx import export_onnx
from repconv.models import resolve_arch
from repconv.onnx_graph import ort_session

TARGET_SPEEDUP = 1.5


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def time_session(path: Path, x: torch.Tensor, repeats: int, warmup: int, threads: int) -> list[float]:
    session = ort_session(path, "all", threads=threads, spinning="on")
    feed = {"input": x.numpy()}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 at 112px, fewer repeats")
    parser.add_argument("--model", default=None, help="torchvision name (default resnet50; --quick resnet18)")
    parser.add_argument("--size", type=int, default=None, help="input size (default 224; --quick 112)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = args.model or ("resnet18" if args.quick else "resnet50")
    size = args.size or (112 if args.quick else 224)
    repeats = args.repeats or (10 if args.quick else 30)
    spec = resolve_arch(name)
    torch.manual_seed(0)
    model = randomize_bn(spec.build()).eval()
    meta = CheckpointMeta.for_arch(spec)
    meta.input_size = (3, size, size)
    err = Console(stderr=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("fp32", "int8"):
            with err.status(f"exporting {name} {dtype}"):
                exported = export_onnx(model, Path(tmp) / f"{dtype}.onnx", meta=meta, dtype=dtype, exporter="legacy",
                                       calib="digits" if dtype == "int8" else None, calib_size=64,
                                       check_size=64, min_agreement=0.0)
            x = torch.randn(args.batch, 3, size, size)
            with err.status(f"timing {dtype}"):
                times = time_session(exported.path, x, repeats, warmup=3, threads=args.threads)
            check = exported.checks[-1]
            results[dtype] = {"p50_ms": statistics.median(times), "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))],
                              "mean_ms": statistics.fmean(times), "file_mb": exported.file_size / 2**20,
                              "top1_agreement_vs_fp32": check.top1_agreement, "max_abs_vs_reference": check.max_abs}
    speedup = results["fp32"]["p50_ms"] / results["int8"]["p50_ms"]
    report = {"model": name, "input_size": size, "batch": args.batch, "threads": args.threads, "repeats": repeats,
              "results": results, "speedup_p50": speedup, "target_speedup": TARGET_SPEEDUP,
              "meets_target": speedup >= TARGET_SPEEDUP, "torch": torch.__version__,
              "onnxruntime": __import__("onnxruntime").__version__}
    table = Table(title=f"{name} @ {size}px, batch {args.batch}, onnxruntime CPU, {args.threads} threads")
    for col in ("dtype", "p50 ms", "p90 ms", "file MB", "top-1 vs fp32"):
        table.add_column(col, justify="right")
    for dtype, r in results.items():
        agree = "-" if dtype == "fp32" else f"{r['top1_agreement_vs_fp32']:.1%}"
        table.add_row(dtype, f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['file_mb']:.1f}", agree)
    console = Console()
    console.print(table)
    console.print(f"int8 speed-up (p50): {speedup:.2f}x (target {TARGET_SPEEDUP}x: "
                  f"{'met' if report['meets_target'] else 'NOT met'})")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
