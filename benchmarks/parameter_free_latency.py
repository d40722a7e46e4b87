"""CPU latency of torchvision resnet50 against its parameter-free conversions (``all`` = R50-max, ``hybrid``).

All models are measured in ONE run, in blocks and rounds with paired speed-ups (see ``latency.py``), so the
ratios compare numbers taken under the same load.
Runtimes: torch eager (BN folded into the convs) and ONNX Runtime (the project's verified export with conv+BN
fused and onnxslim; session at ORT_ENABLE_ALL: NCHWc layout, conv+activation fusion). The FLOP ratios
bound the speed-ups: 4.09 / 2.24 = 1.83x (all) and 4.09 / 2.59 = 1.58x (hybrid).

    PYTHONPATH=. python benchmarks/parameter_free_latency.py [--quick] [--out FILE.json]

"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import latency
import numpy as np
import onnxruntime as ort
import torch
import torchvision
from rich.console import Console
from rich.table import Table
from torch import nn

from repconv import api
from repconv.checkpoint import CheckpointMeta
from repconv.convert.fold import fuse_conv_bn
from repconv.export.onnx import export_onnx
from repconv.io import write_text_atomic
from repconv.models import resolve_arch
from repconv.onnx_graph import ort_session
from repconv.runtime.measure import cpu_model

POLICIES = ("all", "hybrid")
FLOP_LIMIT = {"all": 4.09 / 2.24, "hybrid": 4.09 / 2.59}
TARGET = {"all": 1.8, "hybrid": 1.5}


def export_for_bench(model: nn.Module, path: Path, tuned: bool, size: int = 224, arch: str = "resnet50") -> Path:
    """The project's verified export. tuned: conv+BN fused and onnxslim; otherwise the straightforward graph."""
    meta = dataclasses.replace(CheckpointMeta.for_arch(resolve_arch(arch)), input_size=(3, size, size))
    return export_onnx(model, path, meta=meta, exporter="legacy", fuse_bn=tuned, simplify=tuned).path


def build_models() -> dict[str, tuple[nn.Module, dict]]:
    torch.manual_seed(0)
    base = torchvision.models.resnet50().eval()
    out = {"resnet50": (base, {"params": sum(p.numel() for p in base.parameters())})}
    for policy in POLICIES:
        conv = api.convert(base, arch="resnet50", method="parameter-free", pf_policy=policy)
        s = conv.summary
        out[f"pf-{policy}"] = (conv.model.eval(), {"params": s.params_after, "macs": s.macs_after})
        out["resnet50"][1]["macs"] = s.macs_before
    return out


def run(quick: bool, threads: int, size: int, batches: list[int], plain: bool = False, processes: int | None = None,
        rounds: int | None = None) -> dict:
    torch.set_num_threads(threads)
    processes, rounds = processes or (1 if quick else 3), rounds or (2 if quick else 5)
    block, warmup = (2, 1) if quick else (5, 2)
    models = build_models()
    results: dict = {"models": {}, "config": {
        "threads": threads, "size": size, "batches": batches, "processes": processes, "rounds": rounds,
        "block": block, "warmup": warmup, "quick": quick, "timing": "blocks in rounds, paired speed-ups; "
        "ONNX Runtime in fresh processes (benchmarks/latency.py)",
        "ort": "export_onnx (conv+BN fused, onnxslim), ORT_ENABLE_ALL",
        "ort_plain": "unfolded export, ORT_ENABLE_BASIC" if plain else None,
        "torch": torch.__version__, "onnxruntime": ort.__version__, "cpu": cpu_model(),
        "loadavg_1m_at_start": os.getloadavg()[0]}}
    x = torch.randn(max(batches), 3, size, size)
    folded_models, onnx_files, plain_files = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, counts) in models.items():
            folded, _ = fuse_conv_bn(model)
            with torch.no_grad():
                reference = model(x[:2])
                parity = float((folded(x[:2]) - reference).abs().max())
            path = export_for_bench(model, Path(tmp) / f"{name}.onnx", True, size)
            out = ort_session(path, "all", threads=threads, spinning="on").run(None, {"input": x[:2].numpy()})[0]
            results["models"][name] = {**counts, "fold_max_abs_diff": parity,
                                       "onnx_max_abs_diff": float(np.abs(out - reference.numpy()).max())}
            folded_models[name] = folded
            onnx_files[name] = (path, "all")
            if plain:
                plain_files[name] = (export_for_bench(model, Path(tmp) / f"{name}-plain.onnx", False, size), "basic")
        inputs = {b: x[:b].contiguous() for b in batches}
        timing = {"rounds": rounds, "block": block, "warmup": warmup}
        timings = {"torch": latency.torch_latency(folded_models, inputs, **timing),
                   "ort": latency.ort_latency(onnx_files, batches, size, threads=threads, processes=processes,
                                              **timing)}
        if plain:
            timings["ort_plain"] = latency.ort_latency(plain_files, batches, size, threads=threads,
                                                       processes=processes, **timing)
    results["config"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    for runtime, per_batch in timings.items():
        for b, rows in per_batch.items():
            for name, row in rows.items():
                m = results["models"][name]
                m[f"{runtime}_{b}_ms"] = row["median_ms"]
                m[f"{runtime}_{b}_ms_range"] = [row["min_ms"], row["max_ms"]]
                if name != "resnet50":
                    m[f"{runtime}_{b}_speedup"] = row["speedup"]
                    m[f"{runtime}_{b}_speedup_range"] = [row["speedup_min"], row["speedup_max"]]
    for policy in POLICIES:
        row = results["models"][f"pf-{policy}"]
        row["flop_limit"], row["target"] = FLOP_LIMIT[policy], TARGET[policy]
        row["meets_target"] = all(row[f"ort_b{b}_speedup"] >= TARGET[policy] for b in batches)
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
                lo_hi = row.get(f"{rt}_b{b}_speedup_range")
                cells.append(f"{ms:.1f}" + (f" ({speed:.2f}x, {lo_hi[0]:.2f}-{lo_hi[1]:.2f})" if speed else ""))
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
    parser.add_argument("--processes", type=int, default=None, help="fresh ONNX Runtime processes (default 3, quick 1)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per process (default 5, quick 2)")
    parser.add_argument("--out", type=Path, default=Path("parameter_free_latency.json"))
    args = parser.parse_args()
    results = run(args.quick, args.threads, args.size, args.batches, args.plain, args.processes, args.rounds)
    render(results)
    write_text_atomic(args.out, json.dumps(results, indent=2))
    Console(stderr=True).print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
