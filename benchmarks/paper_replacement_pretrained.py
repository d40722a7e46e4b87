"""Replacement Learning on a pretrained model: accuracy vs the number of replaced units, positional vs measured.

A CIFAR-style ResNet is trained end to end on digits (``repconv.train``; or ``--checkpoint`` reuses one).
Then for k = 1, 2, ... replaced units, chosen either by position (the first k of ``convert --replace-every 2``'s
units) or by measured damage (``--select measured --budget k``: least KL to the original's logits), the
pipeline runs exactly as a user would: ``convert`` -> ``calibrate`` (a, b fitted in function space on a few
batches) -> ``finetune`` (labels, every parameter trainable). Validation accuracy is taken after each stage.

    PYTHONPATH=. python benchmarks/paper_replacement_pretrained.py [--quick] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from paper_common import err, finish, machine, save_partial
from rich.console import Console
from rich.table import Table

import repconv
from repconv.convert.measure import least_harmful
from repconv.data import make_dataset
from repconv.train.loop import evaluate


def unit_orders(checkpoint: Path, calib_batches: int, calib_batch_size: int) -> tuple[dict[str, list[str]], list]:
    """Units in the order each selection adds them: positional (every 2) and measured (least damage first)."""
    loaded = repconv.load_checkpoint(checkpoint)
    positional = repconv.convert(loaded, every=2).summary.replaced_units
    _, damages = repconv.measured_units(loaded.model, loaded.meta.input_size, data="digits", batches=calib_batches,
                                        batch_size=calib_batch_size, mean=loaded.meta.mean, std=loaded.meta.std)
    return {"position": positional, "measured": least_harmful(damages, None)}, damages


def one_point(checkpoint: Path, units: list[str], folder: Path, args) -> dict:
    conv = repconv.convert(checkpoint, units=units, output=folder / "converted.safetensors")
    cal = repconv.calibrate(conv.output, teacher=checkpoint, data="digits", output=folder / "calibrated.safetensors",
                            batches=args.calib_batches, batch_size=args.calib_batch_size)
    ft = repconv.finetune(cal.output, data="digits", output=folder / "finetuned.safetensors", train="all",
                          objective="ce", epochs=args.finetune_epochs, lr=args.finetune_lr, optimizer="adamw",
                          batch_size=args.batch_size, batches_per_epoch=args.batches_per_epoch)
    s = conv.summary
    return {"units": units, "k": len(units), "params_before": s.params_before, "params_after": s.params_after,
            "fraction_replaced": 1 - s.params_after / s.params_before, "acc_converted": cal.val_acc_before,
            "acc_calibrated": cal.val_acc, "acc_finetuned": ft.val_acc, "kl_before": cal.kl_before,
            "kl_after": cal.kl_after, "finetune_trainable_params": ft.trainable_params}


def original_accuracy(checkpoint: Path) -> float:
    loaded = repconv.load_checkpoint(checkpoint)
    return evaluate(loaded.model, make_dataset("digits", "val", loaded.meta.input_size, loaded.meta.mean,
                                               loaded.meta.std))


def render(result: dict) -> None:
    table = Table(title=f"{result['config']['arch']} pretrained on digits (val {result['original_acc']:.2%}): "
                        "replacing k units", title_justify="left")
    for col in ("select", "k", "units", "params replaced", "converted", "calibrated", "fine-tuned"):
        table.add_column(col, justify="left" if col in ("select", "units") else "right")
    for sel, points in result["sweeps"].items():
        for p in points:
            table.add_row(sel, str(p["k"]), " ".join(p["units"]), f"{p['fraction_replaced']:.1%}",
                          f"{p['acc_converted']:.2%}", f"{p['acc_calibrated']:.2%}", f"{p['acc_finetuned']:.2%}")
    Console(width=160).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="cifar_resnet32")
    ap.add_argument("--pretrain-batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--checkpoint", type=Path, help="a digits-trained model file to start from (skips pretraining)")
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--max-units", type=int, default=None, help="largest k (default: every unit of both orders)")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--calib-batch-size", type=int, default=32)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches-per-epoch", type=int, default=None, help="cap on batches per fine-tuning epoch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="cifar_resnet20 at 16px, 1 pretraining epoch, k = 1, 2 fine-tuning batches")
    ap.add_argument("--out", type=Path, default=Path("paper_replacement_pretrained.json"))
    args = ap.parse_args()
    if args.quick:
        args.size, args.pretrain_epochs, args.max_units, args.calib_batches, args.calib_batch_size = 16, 1, 1, 1, 16
        args.finetune_epochs, args.batch_size, args.batches_per_epoch = 1, 16, 2
        args.arch, args.pretrain_batch_size = "cifar_resnet20", 128  # one replaceable unit: layer1.1
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
              "machine": machine(args.threads), "sweeps": {}}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "pretrained.safetensors"
            err.print(f"pretraining {args.arch} on digits at {args.size}px for {args.pretrain_epochs} epochs")
            repconv.train(args.arch, data="digits", output=checkpoint, replace=False, epochs=args.pretrain_epochs,
                          batch_size=args.pretrain_batch_size, input_size=args.size, progress=True)
        result["original_acc"] = original_accuracy(checkpoint)
        orders, damages = unit_orders(checkpoint, args.calib_batches, args.calib_batch_size)
        result["orders"] = orders
        result["damage"] = [vars(d) for d in damages]
        save_partial(result, args.out)
        k_max = min(len(orders["position"]), len(orders["measured"]), args.max_units or 10**9)
        for k in range(1, k_max + 1):  # both selections at each k, so a partial result compares like with like
            for sel, order in orders.items():
                result["sweeps"].setdefault(sel, [])
                err.print(f"{sel}: k = {k} ({' '.join(order[:k])})")
                folder = Path(tmp) / f"{sel}-{k}"
                folder.mkdir()
                result["sweeps"][sel].append(one_point(checkpoint, order[:k], folder, args))
                save_partial(result, args.out)
    render(result)
    finish(result, args.out, started)


if __name__ == "__main__":
    main()
