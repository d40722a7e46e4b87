"""Deployment cost of each form: torch eager vs ONNX fp32 vs ONNX int8 CPU latency, all timed in one run.

Forms of one torchvision resnet50 (random weights, randomized BN statistics; latency does not depend on the
values): the original; its Replacement Learning conversion (``--replace-every 2``), folded (``repconv fold``:
the original architecture again); its parameter-free conversions (R50-max = ``--pf-policy all``, R50-hybrid).
Each form is exported with repconv's verified export (BN folded, onnxslim, ORT parity check; int8 = static
QDQ calibrated on digits images), and every (form, runtime) pair is timed at batch 1 and 8 in one run, in
blocks and rounds with paired speed-ups (``latency.py``; ONNX Runtime in fresh processes). Torch eager runs
the module as a user would (``model.eval()`` under ``inference_mode``, BN not fused).

    PYTHONPATH=. python benchmarks/paper_deployment.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import latency
import torch
from int8_latency import randomize_bn
from paper_common import err, finish, machine
from rich.console import Console
from rich.table import Table

import repconv
from repconv.checkpoint import CheckpointMeta, Loaded
from repconv.models import resolve_arch

FORMS = ("original", "replacement-folded", "pf-all", "pf-hybrid")
RUNTIMES = ("torch", "onnx-fp32", "onnx-int8")


def build_forms(arch: str, size: int, forms: list[str]) -> dict[str, tuple[torch.nn.Module, object]]:
    """form -> (module for torch eager, what ``repconv.export`` takes)."""
    spec = resolve_arch(arch)
    torch.manual_seed(0)
    model = randomize_bn(spec.build()).eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # logits of a trained model's size (random init gives |logits| ~ 100, beyond the export's
        head.weight.mul_(0.05)  # absolute parity tolerance of 1e-4 in fp32 for reasons of scale only)
    meta = CheckpointMeta.for_arch(spec)
    meta.input_size = (3, size, size)
    original = Loaded(model, meta)
    out = {}
    for form in forms:
        if form == "original":
            out[form] = (model, original)
        elif form == "replacement-folded":
            folded = repconv.fold(repconv.convert(original, every=2))
            out[form] = (folded.model.eval(), Loaded(folded.model, folded.meta))
        else:
            conv = repconv.convert(original, method="parameter-free", pf_policy=form.removeprefix("pf-"))
            out[form] = (conv.model.eval(), conv)
    return out


def export_all(forms: dict, folder: Path, calib_size: int, check_size: int) -> tuple[dict, dict]:
    files, info = {}, {}
    for form, (module, exportable) in forms.items():
        info[form] = {"params": sum(p.numel() for p in module.parameters())}
        for dtype in ("fp32", "int8"):
            err.print(f"exporting {form} {dtype}")
            res = repconv.export(exportable, folder / f"{form}-{dtype}.onnx", dtype=dtype, exporter="legacy",
                                 calib="digits" if dtype == "int8" else None, calib_size=calib_size,
                                 check_size=check_size, min_agreement=0.0)
            check = res.checks[-1]
            info[form][f"onnx-{dtype}"] = {"file_mb": res.file_size / 2**20, "max_abs_vs_reference": check.max_abs,
                                           "top1_agreement": check.top1_agreement}
            files[f"{form}/onnx-{dtype}"] = (res.path, "all")
    return files, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--processes", type=int, default=3, help="fresh ONNX Runtime processes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=5, help="timed runs per block")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before each block")
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--check-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="64px, original + folded replacement + pf-all, 2 rounds")
    ap.add_argument("--out", type=Path, default=Path("paper_deployment.json"))
    args = ap.parse_args()
    if args.quick:
        args.size, args.forms = 64, ["original", "replacement-folded", "pf-all"]
        args.processes, args.rounds, args.block, args.warmup = 1, 2, 2, 1
        args.calib_size, args.check_size, args.batches = 16, 8, [1, 2]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(args.threads),
                    "note": "torch eager: BN not fused; ONNX: repconv export (BN folded, onnxslim), ORT_ENABLE_ALL"}
    forms = build_forms(args.arch, args.size, args.forms)
    x = torch.randn(max(args.batches), 3, args.size, args.size)
    timing = {"rounds": args.rounds, "block": args.block, "warmup": args.warmup}
    with tempfile.TemporaryDirectory() as tmp:
        files, info = export_all(forms, Path(tmp), args.calib_size, args.check_size)
        result["forms"] = info
        err.print(f"timing {len(forms)} forms in torch eager, then {len(files)} ONNX files in "
                  f"{args.processes} fresh processes (blocks in rounds, paired speed-ups)")
        timings = {"torch": latency.torch_latency({f: m for f, (m, _) in forms.items()},
                                                  {b: x[:b].contiguous() for b in args.batches}, **timing)}
        ort_rows = latency.ort_latency(files, args.batches, args.size, threads=args.threads,
                                       processes=args.processes, **timing)
    for b, rows in timings["torch"].items():
        for form, row in rows.items():
            info[form].setdefault("torch", {}).update({f"{b}_ms": row["median_ms"], f"{b}_speedup": row["speedup"]})
    for b, rows in ort_rows.items():
        for key, row in rows.items():
            form, _, rt = key.partition("/")
            info[form].setdefault(rt, {}).update({f"{b}_ms": row["median_ms"], f"{b}_speedup": row["speedup"]})
    table = Table(title=f"{args.arch} at {args.size}px, CPU {args.threads} threads: median ms (paired speed-up "
                        "vs the original: torch eager vs torch eager, ONNX vs the original's fp32 ONNX)",
                  title_justify="left")
    table.add_column("form")
    table.add_column("params", justify="right")
    for rt in RUNTIMES:
        for b in args.batches:
            table.add_column(f"{rt} b{b}", justify="right")
    for form, row in info.items():
        cells = [f"{row[rt][f'b{b}_ms']:.1f} ({row[rt][f'b{b}_speedup']:.2f}x)"
                 for rt in RUNTIMES for b in args.batches]
        table.add_row(form, f"{row['params'] / 1e6:.1f}M", *cells)
    Console(width=180).print(table)
    finish(result, args.out, started)


if __name__ == "__main__":
    main()
