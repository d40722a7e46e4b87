"""Deployment cost of each form: torch eager vs ONNX fp32 vs ONNX int8 CPU latency, all timed in one run.

Forms of one torchvision resnet50 (random weights, randomized BN statistics; latency does not depend on the
values): the original; its Replacement Learning conversion (``--replace-every 2``), folded (``repconv fold``:
the original architecture again); its parameter-free conversions (R50-max = ``--pf-policy all``, R50-hybrid).
Each form is exported with repconv's verified export (BN folded, onnxslim, ORT parity check; int8 = static
QDQ calibrated on digits images), and every (form, runtime) pair is timed round-robin at batch 1 and 8, so
all ratios compare numbers taken under the same machine load. Torch eager runs the module as a user would
(``model.eval()`` under ``no_grad``, BN not fused).

    PYTHONPATH=. python benchmarks/paper_deployment.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from int8_latency import randomize_bn
from paper_common import err, finish, machine
from parameter_free_latency import _no_grad, interleaved_medians
from rich.console import Console
from rich.table import Table

import repconv
from repconv.checkpoint import CheckpointMeta, Loaded
from repconv.export.onnx import ort_session
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


def export_all(forms: dict, folder: Path, calib_size: int, check_size: int, threads: int) -> tuple[dict, dict]:
    sessions, info = {}, {}
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
            sessions[(form, f"onnx-{dtype}")] = ort_session(res.path, "all", threads=threads)
    return sessions, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--check-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="64px, original + folded replacement + pf-all, 2 repeats")
    ap.add_argument("--out", type=Path, default=Path("paper_deployment.json"))
    args = ap.parse_args()
    if args.quick:
        args.size, args.forms, args.repeats, args.warmup = 64, ["original", "replacement-folded", "pf-all"], 2, 1
        args.calib_size, args.check_size, args.batches = 16, 8, [1, 2]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(args.threads),
                    "note": "torch eager: BN not fused; ONNX: repconv export (BN folded, onnxslim), ORT_ENABLE_ALL"}
    forms = build_forms(args.arch, args.size, args.forms)
    x = torch.randn(max(args.batches), 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        sessions, info = export_all(forms, Path(tmp), args.calib_size, args.check_size, args.threads)
        result["forms"] = info
        for b in args.batches:
            xb, feed = x[:b].contiguous(), {"input": x[:b].numpy()}
            fns = {(f, "torch"): (lambda m=m, xb=xb: _no_grad(m, xb)) for f, (m, _) in forms.items()}
            fns |= {key: (lambda s=s, feed=feed: s.run(None, feed)) for key, s in sessions.items()}
            err.print(f"timing batch {b}: {len(fns)} (form, runtime) pairs, round-robin")
            for (form, rt), ms in interleaved_medians(fns, args.repeats, args.warmup).items():
                info[form].setdefault(rt, {})[f"b{b}_ms"] = ms
    base = info.get("original")
    for row in info.values():
        for rt in RUNTIMES:
            for b in args.batches:
                row[rt][f"b{b}_vs_original_torch"] = base["torch"][f"b{b}_ms"] / row[rt][f"b{b}_ms"] if base else None
    table = Table(title=f"{args.arch} at {args.size}px, CPU {args.threads} threads: median ms (speed-up vs the "
                        "original in torch eager)", title_justify="left")
    table.add_column("form")
    table.add_column("params", justify="right")
    for rt in RUNTIMES:
        for b in args.batches:
            table.add_column(f"{rt} b{b}", justify="right")
    for form, row in info.items():
        cells = [f"{row[rt][f'b{b}_ms']:.1f} ({row[rt][f'b{b}_vs_original_torch'] or 0:.2f}x)"
                 for rt in RUNTIMES for b in args.batches]
        table.add_row(form, f"{row['params'] / 1e6:.1f}M", *cells)
    Console(width=180).print(table)
    finish(result, args.out, started)


if __name__ == "__main__":
    main()
