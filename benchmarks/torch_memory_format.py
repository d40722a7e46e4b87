"""Torch eager CPU latency of the parameter-free forms in NCHW vs channels_last memory format.

Why: in ``paper_parameter_free.py`` the parameter-free forms gain little (resnet50) or lose 3-4x (mobilenet_v2,
efficientnet_b0) in torch eager, while ONNX Runtime shows the expected gains. The cause is torch's CPU max-pool
kernel for contiguous NCHW tensors, several times slower than its depthwise conv; its channels_last kernel is
not. This script measures every model of that benchmark (BN folded, as there) in both formats, in one run,
blocks in rounds with speed-ups paired against the original of the same family in NCHW (``latency.py``), and
the two operations alone: a 3x3 depthwise conv and the 3x3 max-pool that replaces it.

    PYTHONPATH=. python benchmarks/torch_memory_format.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import latency
import torch
from paper_common import err, finish, machine
from paper_parameter_free import FAMILIES, conversions
from rich.console import Console
from rich.table import Table

from repconv.convert.fold import fuse_conv_bn

FORMATS = ("nchw", "channels_last")


def measure(family: str, batches: list[int], size: int, rounds: int, block: int, warmup: int) -> dict:
    """name -> {"<format>_b<batch>": {median_ms, speedup}} for the family's original and conversions."""
    models = {}
    for name, (model, _) in conversions(family).items():
        folded = fuse_conv_bn(model)[0]
        models[f"{name} nchw"] = folded
        models[f"{name} channels_last"] = copy.deepcopy(folded).to(memory_format=torch.channels_last)
    x = torch.randn(max(batches), 3, size, size)
    rows: dict = {}
    for b in batches:
        nchw, cl = x[:b].contiguous(), x[:b].contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            fns = {name: (lambda m=m, xi=(cl if name.endswith("channels_last") else nchw): m(xi))
                   for name, m in models.items()}
            table = latency.summarize(latency.block_rounds(fns, rounds, block, warmup), f"{family} nchw")
        for key, r in table.items():
            name, fmt = key.rsplit(" ", 1)
            rows.setdefault(name, {})[f"{fmt}_b{b}"] = {"median_ms": r["median_ms"], "speedup": r["speedup"]}
    return rows


def measure_ops(shape: tuple[int, ...], rounds: int, block: int, warmup: int) -> dict:
    """Median ms of a 3x3 depthwise conv and a 3x3 max-pool (stride 1) on one tensor, in both formats."""
    channels = shape[1]
    ops = {"depthwise_conv3x3": torch.nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False).eval(),
           "max_pool3x3": torch.nn.MaxPool2d(3, 1, 1)}
    x = torch.randn(shape)
    inputs = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
    with torch.inference_mode():
        fns = {f"{op} {fmt}": (lambda m=m, xi=xi: m(xi)) for op, m in ops.items() for fmt, xi in inputs.items()}
        table = latency.summarize(latency.block_rounds(fns, rounds, block, warmup), "depthwise_conv3x3 nchw")
    return {"shape": list(shape), "median_ms": {k: v["median_ms"] for k, v in table.items()}}


def render(result: dict) -> None:
    cols = [f"{fmt}_b{b}" for b in result["config"]["batches"] for fmt in FORMATS]
    table = Table(title="torch eager, ms (speed-up vs the original in NCHW)")
    table.add_column("model")
    for c in cols:
        table.add_column(c.replace("_", " "), justify="right")
    for name, row in result["latency"].items():
        table.add_row(name, *(f"{row[c]['median_ms']:.1f} ({row[c]['speedup']:.2f}x)" for c in cols))
    Console(width=160).print(table)
    ops = result["ops"]
    Console(width=160).print(f"ops on {'x'.join(map(str, ops['shape']))}: "
                             + ", ".join(f"{k} {v:.2f} ms" for k, v in ops["median_ms"].items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=5, help="timed runs per block")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before each block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="mobilenet_v2 at 64px, batch 1 and 2, 2 rounds of 2")
    ap.add_argument("--out", type=Path, default=Path("torch_memory_format.json"))
    args = ap.parse_args()
    if args.quick:
        args.families, args.size, args.batches = ["mobilenet_v2"], 64, [1, 2]
        args.rounds, args.block, args.warmup = 2, 2, 1
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(args.threads),
                    "latency": {}}
    for family in args.families:
        err.print(f"timing {family} and its parameter-free forms in NCHW and channels_last")
        result["latency"] |= measure(family, args.batches, args.size, args.rounds, args.block, args.warmup)
    result["ops"] = measure_ops((2, 144, 16, 16) if args.quick else (8, 144, 56, 56), args.rounds, args.block,
                                args.warmup)
    render(result)
    finish(result, args.out, started)


if __name__ == "__main__":
    main()
