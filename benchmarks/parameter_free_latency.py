"""CPU latency of torchvision resnet50 against its parameter-free conversions (``all`` = R50-max, ``hybrid``).

All models are measured in ONE run, so the speed-up ratios compare numbers taken under the same load.
Runtimes: torch eager (BN folded into the convs) and ONNX Runtime (the project's verified export with conv+BN
fused and onnxslim; session at ORT_ENABLE_ALL: NCHWc layout, conv+activation fusion). The FLOP ratios
bound the speed-ups: 4.09 / 2.24 = 1.83x (all) and 4.09 / 2.59 = 1.58x (hybrid).

    PYTHONPATH=. python benchmarks/parameter_free_latency.py [--quick] [--out FILE.json]

"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

from repconv import api
from repconv.checkpoint import CheckpointMeta, write_text_atomic
from repconv.convert.fold import fuse_conv_bn
from repconv.export.onnx import export_onnx, ort_session
from repconv.models import resolve_arch

POLICIES = ("all", "hybrid")
FLOP_LIMIT = {"all": 4.09 / 2.24, "hybrid": 4.09 / 2.59}
TARGET = {"all": 1.8, "hybrid": 1.5}


def export_for_bench(model: nn.Module, path: Path, tuned: bool) -> Path:
    """The project's verified export. tuned: conv+BN fused and onnxslim; otherwise the straightforward graph."""
    meta = CheckpointMeta.for_arch(resolve_arch("resnet50"))
    return export_onnx(model, path, meta=meta, exporter="legacy", fuse_bn=tuned, simplify=tuned).path


def interleaved_medians(fns: dict[str, callable], repeats: int, warmup: int) -> dict[str, float]:
    """Median ms of each function, timed round-robin so that every one sees the same machine load."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _no_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def build_models(size: int) -> dict[str, tuple[nn.Module, dict]]:
    torch.manual_seed(0)
    base = torchvision.models.resnet50().eval()
    out = {"resnet50": (base, {"params": sum(p.numel() for p in base.parameters())})}
    for policy in POLICIES:
        conv = api.convert(base, arch="resnet50", method="parameter-free", pf_policy=policy)
        s = conv.summary
        out[f"pf-{policy}"] = (conv.model.eval(), {"params": s.params_after, "macs": s.macs_after})
        out["resnet50"][1]["macs"] = s.macs_before
    return out


def run(quick: bool, threads: int, size: int, batches: list[int], plain: bool = False,
        repeats: int | None = None) -> dict:
    torch.set_num_threads(threads)
    repeats, warmup = repeats or (5 if quick else 20), 2 if quick else 3
    models = build_models(size)
    results: dict = {"models": {}, "config": {"threads": threads, "size": size, "batches": batches,
                                              "repeats": repeats, "warmup": warmup, "quick": quick,
                                              "ort": "export_onnx (conv+BN fused, onnxslim), ORT_ENABLE_ALL",
                                              "ort_plain": "unfolded export, ORT_ENABLE_BASIC" if plain else None,
                                              "torch": torch.__version__, "onnxruntime": ort.__version__,
                                              "cpu": platform.processor() or platform.machine()}}
    x = torch.randn(max(batches), 3, size, size)
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = ("torch", "ort", "ort_plain") if plain else ("torch", "ort")
        runners: dict[str, dict[str, callable]] = {f"{rt}_b{b}_ms": {} for rt in runtimes for b in batches}
        for name, (model, counts) in models.items():
            folded, _ = fuse_conv_bn(model)
            with torch.no_grad():
                reference = model(x[:2])
                parity = float((folded(x[:2]) - reference).abs().max())
            session = ort_session(export_for_bench(model, Path(tmp) / f"{name}.onnx", True), "all", threads)
            ort_parity = float(np.abs(session.run(None, {"input": x[:2].numpy()})[0] - reference.numpy()).max())
            results["models"][name] = {**counts, "fold_max_abs_diff": parity, "onnx_max_abs_diff": ort_parity}
            plain_session = ort_session(export_for_bench(model, Path(tmp) / f"{name}-plain.onnx", False), "basic",
                                        threads) if plain else None
            for b in batches:
                xb, feed = x[:b].contiguous(), {"input": x[:b].numpy()}
                runners[f"torch_b{b}_ms"][name] = lambda m=folded, xb=xb: _no_grad(m, xb)
                runners[f"ort_b{b}_ms"][name] = lambda s=session, feed=feed: s.run(None, feed)
                if plain:
                    runners[f"ort_plain_b{b}_ms"][name] = lambda s=plain_session, feed=feed: s.run(None, feed)
        for key, fns in runners.items():
            for name, ms in interleaved_medians(fns, repeats, warmup).items():
                results["models"][name][key] = ms
    base = results["models"]["resnet50"]
    for policy in POLICIES:
        row = results["models"][f"pf-{policy}"]
        row["flop_limit"] = FLOP_LIMIT[policy]
        row["target"] = TARGET[policy]
        for key in [k for k in base if k.endswith("_ms")]:
            row[key.replace("_ms", "_speedup")] = base[key] / row[key]
    return results


def render(results: dict) -> None:
    console = Console(width=160)
    batches = results["config"]["batches"]
    table = Table(title=f"CPU latency, median ms ({results['config']['threads']} threads, "
                        f"{results['config']['size']}px)", title_justify="left")
    table.add_column("model")
    runtimes = [rt for rt in ("torch", "ort", "ort_plain") if f"{rt}_b{batches[0]}_ms" in results["models"]["resnet50"]]
    for col in ("params", "MACs", *(f"{rt} b{b}" for rt in runtimes for b in batches)):
        table.add_column(col, justify="right")
    for name, row in results["models"].items():
        cells = [f"{row['params'] / 1e6:.1f}M", f"{row['macs'] / 1e9:.2f}G"]
        for rt in runtimes:
            for b in batches:
                ms = row[f"{rt}_b{b}_ms"]
                speed = row.get(f"{rt}_b{b}_speedup")
                cells.append(f"{ms:.1f}" + (f" ({speed:.2f}x)" if speed else ""))
        table.add_row(name, *cells)
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (a CI-sized smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--plain", action="store_true", help="also time a straightforward ORT graph (unfolded "
                        "export, basic optimizations) to show what the tuned one gains")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 20, quick 5)")
    parser.add_argument("--out", type=Path, default=Path("parameter_free_latency.json"))
    args = parser.parse_args()
    results = run(args.quick, args.threads, args.size, args.batches, args.plain, args.repeats)
    render(results)
    write_text_atomic(args.out, json.dumps(results, indent=2))
    Console(stderr=True).print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
