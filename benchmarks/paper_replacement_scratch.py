"""Replacement Learning from scratch (the paper's setting): end-to-end vs ``--replace-every 2`` on digits at 32px.

CIFAR-style ResNet-32 and ResNet-56, several seeds each, the same epochs and schedule for both modes
(``repconv.train``: SGD + Nesterov, cosine with 1 warmup epoch). Each run is its own fresh Python process,
so its peak resident memory (VmHWM, reset just before training as in ``finetune_memory.py``) is its own.

    PYTHONPATH=. python benchmarks/paper_replacement_scratch.py [--quick] [--out FILE.json]

Reported per architecture and mode: final validation accuracy (mean, std over seeds), trainable
parameters, peak memory during training (RSS above the process's resident set before training),
training wall time per epoch (median over epochs, validation excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from paper_common import err, finish, machine, mean_std, run_fresh, save_partial
from rich.console import Console
from rich.table import Table

MODES = {"end-to-end": False, "replace-every-2": True}


def worker(cfg: dict) -> dict:
    import ctypes
    import gc

    import torch
    from finetune_memory import _status_kb

    import repconv

    torch.set_num_threads(cfg["threads"])
    with tempfile.TemporaryDirectory() as tmp:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS counter
        rss_before = _status_kb("VmRSS")
        res = repconv.train(cfg["arch"], data="digits", output=Path(tmp) / "model.safetensors",
                            replace=cfg["replace"], replace_every=2, epochs=cfg["epochs"],
                            batch_size=cfg["batch_size"], lr=cfg["lr"], optimizer=cfg.get("optimizer", "sgd"),
                            seed=cfg["seed"],
                            batches_per_epoch=cfg["batches_per_epoch"], input_size=cfg["size"])
        peak = _status_kb("VmHWM")
    return {"val_acc": res.val_acc, "val_acc_history": [h["val_acc"] for h in res.history],
            "params": res.params, "trainable_params": res.trainable_params, "replaced_units": res.replaced_units,
            "epoch_s": statistics.median(h["seconds"] for h in res.history),
            "epoch_s_all": [h["seconds"] for h in res.history], "peak_mb": peak / 1024,
            "train_mem_mb": (peak - rss_before) / 1024}


def summarize(runs: list[dict]) -> dict:
    return {"val_acc": mean_std([r["val_acc"] for r in runs]),
            "trainable_params": runs[0]["trainable_params"], "params": runs[0]["params"],
            "replaced_units": runs[0]["replaced_units"],
            "train_mem_mb": mean_std([r["train_mem_mb"] for r in runs]),
            "peak_mb": mean_std([r["peak_mb"] for r in runs]),
            "epoch_s": mean_std([r["epoch_s"] for r in runs])}


def render(result: dict) -> None:
    c = result["config"]
    table = Table(title=f"Replacement Learning from scratch on digits at {c['size']}px, {c['epochs']} epochs, "
                        f"seeds {c['seeds']}", title_justify="left")
    for col in ("model", "mode", "val acc (mean ± std)", "trainable", "vs e2e", "train mem", "vs e2e",
                "s/epoch", "vs e2e"):
        table.add_column(col, justify="left" if col in ("model", "mode") else "right")
    for arch, modes in result["models"].items():
        base = modes["end-to-end"]
        for mode, s in modes.items():
            acc = s["val_acc"]
            table.add_row(arch, mode, f"{acc['mean']:.2%} ± {acc['std']:.2%}", f"{s['trainable_params']:,}",
                          f"{s['trainable_params'] / base['trainable_params']:.2f}x",
                          f"{s['train_mem_mb']['mean']:.0f} MB",
                          f"{s['train_mem_mb']['mean'] / base['train_mem_mb']['mean']:.2f}x",
                          f"{s['epoch_s']['mean']:.1f}", f"{s['epoch_s']['mean'] / base['epoch_s']['mean']:.2f}x")
    Console(width=160).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["cifar_resnet32", "cifar_resnet56"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batches-per-epoch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="cifar_resnet32 at 16px, 1 epoch of 2 batches, 1 seed")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="adamw (lr 1e-3) for a ViT")
    ap.add_argument("--out", type=Path, default=Path("paper_replacement_scratch.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.archs, args.seeds, args.epochs, args.size, args.batch_size, args.batches_per_epoch = (
            ["cifar_resnet32"], [0], 1, 16, 16, 2)
    started = time.perf_counter()
    config = {k: getattr(args, k) for k in ("archs", "seeds", "epochs", "batch_size", "lr", "optimizer", "size",
                                            "batches_per_epoch", "quick")}
    config["schedule"] = (f"repconv.train defaults with optimizer {args.optimizer} (sgd: nesterov momentum 0.9), "
                          "wd 5e-4, cosine, 1 warmup epoch")
    result = {"config": config, "machine": machine(args.threads), "models": {}, "runs": []}
    for arch in args.archs:
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for seed in args.seeds:  # modes alternate, so a partial result compares like with like
            for mode, replace in MODES.items():
                err.print(f"training {arch} {mode} seed {seed} (fresh process)")
                run = run_fresh(__file__, {"arch": arch, "replace": replace, "seed": seed, "epochs": args.epochs,
                                           "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
                                           "size": args.size,
                                           "batches_per_epoch": args.batches_per_epoch, "threads": args.threads})
                runs[mode].append(run)
                result["runs"].append({"arch": arch, "mode": mode, "seed": seed, **run})
                result["models"][arch] = {m: summarize(r) for m, r in runs.items() if r}
                save_partial(result, args.out)
    render(result)
    finish(result, args.out, started)


if __name__ == "__main__":
    main()
