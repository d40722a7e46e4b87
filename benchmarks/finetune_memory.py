"""Peak memory and step time of fine-tuning: a converted resnet50 (`--train scalars`, `--train all`)
against full fine-tuning of the original, at the same batch size, in one run.

    python benchmarks/finetune_memory.py [--quick] [--batch-size 16] [--size 224] [--steps 3] [--out FILE.json]

How memory is measured (CPU): every configuration runs in its own fresh Python process. After the model
is loaded and the allocator trimmed (malloc_trim), the process resets its peak-RSS counter (Linux: write
5 to /proc/self/clear_refs) and records its resident set; after the training steps it reads the peak
(VmHWM in /proc/self/status). So the peak covers the training steps only (not loading, which briefly
holds two copies of the weights), and ``train_mem`` = peak - resident before training is what the steps
themselves need: activations kept for backward, gradients, optimizer state. The step is the real one
(`repconv.train.loop`: objective, trainable set, AdamW) on random images with random labels.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

CONFIGS = {  # name -> (which file, --train)
    "full fine-tuning (original)": ("original", "all"),
    "converted, --train all": ("converted", "all"),
    "converted, --train scalars": ("converted", "scalars"),
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(path: str, trainable: str, batch: int, size: int, steps: int, threads: int) -> dict:
    import gc

    import torch

    from repconv.checkpoint import load_checkpoint as load
    from repconv.train.loop import TrainConfig, make_optimizer, objective_loss, set_trainable

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load(path).model
    cfg = TrainConfig(trainable=trainable, objective="ce", optimizer="adamw")
    names = set_trainable(model, trainable)
    opt = make_optimizer(cfg, model)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    model.train()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS counter
    rss_before = _status_kb("VmRSS")
    times = []
    for _ in range(steps + 1):  # the first step allocates optimizer state; it is not timed
        t = time.perf_counter()
        loss = objective_loss(cfg, model(x), y, None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    peak = _status_kb("VmHWM")
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for n, p in model.named_parameters() if n in names)
    return {"params": params, "trainable_params": trained, "rss_before_mb": rss_before / 1024,
            "peak_mb": peak / 1024, "train_mem_mb": (peak - rss_before) / 1024,
            "step_s": statistics.median(times[1:]), "first_step_s": times[0]}


def prepare(folder: Path) -> tuple[Path, Path]:
    """A random-weight resnet50 (no download) and its Replacement Learning conversion, as repconv files."""
    import torch
    import torchvision

    import repconv
    from repconv.checkpoint import CheckpointMeta, save
    from repconv.models import resolve_arch

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    original = folder / "resnet50.repconv.safetensors"
    save(original, model, CheckpointMeta.for_arch(resolve_arch("resnet50")))
    converted = folder / "resnet50_rl.repconv.safetensors"
    repconv.convert(original, output=converted)
    return original, converted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="batch 8 at 128 px, 2 timed steps")
    ap.add_argument("--out", type=Path, default=Path("finetune_memory.json"))
    ap.add_argument("--worker", nargs=2, metavar=("FILE", "TRAIN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.batch_size, args.size, args.steps = 8, 128, 2
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch_size, args.size, args.steps, args.threads)))
        return

    from repconv.io import write_text_atomic

    err = Console(stderr=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = dict(zip(("original", "converted"), prepare(Path(tmp)), strict=True))
        for name, (which, trainable) in CONFIGS.items():
            err.print(f"running: {name} (batch {args.batch_size} at {args.size}px, fresh process)")
            cmd = [sys.executable, __file__, "--worker", str(files[which]), trainable,
                   "--batch-size", str(args.batch_size), "--size", str(args.size), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
    full = rows["full fine-tuning (original)"]
    for r in rows.values():
        r["peak_vs_full"] = r["peak_mb"] / full["peak_mb"]
        r["train_mem_vs_full"] = r["train_mem_mb"] / full["train_mem_mb"]
        r["step_vs_full"] = r["step_s"] / full["step_s"]
    scalars = rows["converted, --train scalars"]
    result = {"arch": "resnet50", "batch_size": args.batch_size, "input_size": args.size, "steps": args.steps,
              "threads": args.threads, "optimizer": "adamw", "configs": rows,
              "target": "scalars-only training memory <= 0.6x full fine-tuning",
              "target_met": scalars["train_mem_vs_full"] <= 0.6,
              "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}}
    table = Table(title=f"fine-tuning resnet50, batch {args.batch_size} at {args.size}px (CPU, AdamW)",
                  title_justify="left")
    for col in ("configuration", "trainable", "peak RSS", "training memory", "vs full", "step", "vs full"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for name, r in rows.items():
        table.add_row(name, f"{r['trainable_params'] / 1e6:.2f}M", f"{r['peak_mb']:.0f} MB",
                      f"{r['train_mem_mb']:.0f} MB", f"{r['train_mem_vs_full']:.2f}x", f"{r['step_s']:.2f} s",
                      f"{r['step_vs_full']:.2f}x")
    Console(width=140).print(table)
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    err.print(f"target (scalars-only training memory <= 0.6x): {'met' if result['target_met'] else 'NOT met'}; "
              f"wrote {args.out}")


if __name__ == "__main__":
    main()
