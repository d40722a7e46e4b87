"""Recovery of a pretrained model on a small unlabeled set: BatchNorm statistics (freeze / update / recalibrate)
and best-so-far selection, measured as top-1 agreement with the teacher on held-out images (issue 17).

The teacher is repconv's ``cifar_resnet20`` trained on part A of the digits training split (the loop, labels).
The recovery set is a few hundred *unlabeled* images of part B (the rest of the training split); held-out
data is the digits validation split (never seen by teacher or recovery). Arms:

* the teacher, unconverted, put through finetune (distill from itself, every parameter) at learning rate 0
  under each ``bn_stats``: its agreement with itself shows what the statistics alone do;
* converted (Replacement Learning, every 2nd interior unit, scalars 0.5/0.5);
* calibrated (a, b fitted in function space) under each calibrate ``bn_stats``;
* fine-tuned from the calibrated model by distillation, ``--train norm`` and ``--train all``, under each
  ``bn_stats`` with ``keep=last`` (the raw effect), and under the defaults (``freeze``, ``keep=best``: best
  epoch by agreement on a 15% held-out split of the recovery set, never worse than the input).

    PYTHONPATH=. python benchmarks/bn_stats_recovery.py [--quick] [--out benchmarks/results/bn_stats_recovery.json]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from paper_common import err, finish, machine, save_partial
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]


def split_digits(size: int, recovery_images: int, part_a: int, seed: int, classes=None):
    """(part A labeled, recovery set unlabeled from part B (only ``classes`` when given), held-out labeled =
    digits val)."""
    import torch
    from torch.utils.data import TensorDataset

    from repconv.data import digits
    from repconv.models import resolve_arch

    spec = resolve_arch("cifar_resnet20")
    train, val = digits("train", size, spec.mean, spec.std), digits("val", size, spec.mean, spec.std)
    x, y = train.tensors
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + seed))
    a, b = order[:part_a], order[part_a:]
    if classes:
        b = b[torch.isin(y[b], torch.tensor(classes))]
    b = b[:recovery_images]
    return (TensorDataset(x[a], y[a]), TensorDataset(x[b], torch.full((len(b),), -1)), val)


def measure(model, teacher_pred, val) -> dict:
    from repconv.train.recovery import agreement, predictions

    pred, labels = predictions(model, val)
    return {"agreement": agreement(pred, teacher_pred), "val_acc": float((pred == labels).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16, help="input size (the digits are 8x8)")
    ap.add_argument("--part-a", type=int, default=1000, help="teacher's training images (part A)")
    ap.add_argument("--recovery-images", type=int, default=300, help="unlabeled recovery images (part B)")
    ap.add_argument("--recovery-classes", type=int, nargs="*", default=None,
                    help="draw the recovery set from these classes only (a narrow domain; held-out keeps all)")
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--calib-batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (the README recipe: 3)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr-norm", type=float, default=1e-3)
    ap.add_argument("--lr-all", type=float, default=1e-4)
    ap.add_argument("--seeds", type=int, default=1, help="repeat everything with seeds 0..N-1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--from-partial", action="store_true",
                    help="finish OUT from the seeds its .partial.json holds (a run stopped early)")
    ap.add_argument("--quick", action="store_true", help="8px, 400 teacher images, 1 epoch each: CI smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bn_stats_recovery.json")
    args = ap.parse_args()
    if args.quick:
        args.size, args.part_a, args.recovery_images, args.teacher_epochs = 8, 400, 128, 2
        args.calib_batches, args.epochs, args.seeds = 2, 1, 1
    import torch

    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.from_partial:
        import json

        from paper_common import partial_path

        result = json.loads(partial_path(args.out).read_text())
        result["config"]["stopped_after_seeds"] = len(result["runs"])
        result["summary"] = summarize(result["runs"])
        render(result)
        began = time.mktime(time.strptime(result["machine"]["utc"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        finish(result, args.out, started - (time.time() - began))  # wall: from the run's start to now
        return
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
              "machine": machine(args.threads), "runs": []}
    for seed in range(args.seeds):
        result["runs"].append(one_seed(args, seed))
        save_partial(result, args.out)
    result["summary"] = summarize(result["runs"])
    render(result)
    finish(result, args.out, started)


def one_seed(args, seed: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    import repconv
    from repconv.checkpoint import CheckpointMeta, Loaded
    from repconv.models import resolve_arch
    from repconv.train.calibrate import calibrate_units
    from repconv.train.loop import TrainConfig, fit
    from repconv.train.recovery import predictions

    part_a, recovery, val = split_digits(args.size, args.recovery_images, args.part_a, seed, args.recovery_classes)
    spec = resolve_arch("cifar_resnet20")
    torch.manual_seed(seed)
    teacher = spec.build(num_classes=10)
    err.print(f"seed {seed}: training the teacher on {len(part_a)} images of part A at {args.size}px")
    fit(teacher, part_a, TrainConfig(epochs=args.teacher_epochs, batch_size=64, lr=0.1, optimizer="sgd",
                                     weight_decay=5e-4, warmup_epochs=1, seed=seed))
    teacher.eval()
    teacher_pred, labels = predictions(teacher, val)
    run = {"seed": seed, "teacher_val_acc": float((teacher_pred == labels).float().mean()),
           "recovery_images": len(recovery), "heldout_images": len(val)}

    def distill(model, trainable: str, lr: float, bn_stats: str, keep: str, epochs: int = args.epochs) -> dict:
        t0 = time.perf_counter()
        r = fit(model, recovery, TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=lr, objective="distill",
                                             trainable=trainable, bn_stats=bn_stats, keep=keep, seed=seed),
                teacher=copy.deepcopy(teacher))
        out = measure(model, teacher_pred, val)
        return {**out, "written": r.written, "warning": r.warning, "input_holdout_agreement":
                (r.input_metrics or {}).get("agreement"),
                "holdout_agreement_per_epoch": [h.get("agreement") for h in r.history],
                "holdout_images": r.holdout_images, "seconds": round(time.perf_counter() - t0, 1)}

    # 1. The unconverted teacher through finetune at learning rate 0: what the statistics alone do.
    run["teacher_lr0"] = {}
    for mode in ("freeze", "update", "recalibrate"):
        err.print(f"seed {seed}: teacher at lr 0, bn_stats {mode}")
        run["teacher_lr0"][mode] = distill(copy.deepcopy(teacher), "all", 0.0, mode, "last")

    # 2. Convert, 3. calibrate under each bn_stats.
    meta = CheckpointMeta.for_arch(spec, {"num_classes": 10})
    conv = repconv.convert(Loaded(copy.deepcopy(teacher), meta), every=2, init="half")
    run["replaced_units"] = conv.summary.replaced_units
    run["converted"] = measure(conv.model, teacher_pred, val)
    calib_loader = DataLoader(recovery, batch_size=args.calib_batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(seed))
    calib = [x for _, (x, _) in zip(range(args.calib_batches), calib_loader, strict=False)]
    run["calibrated"], calibrated = {}, {}
    for mode in ("freeze", "recalibrate"):
        model = copy.deepcopy(conv.model)
        cal = calibrate_units(model, teacher, calib, bn_stats=mode)
        calibrated[mode] = model
        run["calibrated"][mode] = {**measure(model, teacher_pred, val), "kl_before": cal.kl_before,
                                   "kl_after": cal.kl_after, "calib_agreement_after": cal.agreement_after,
                                   "kept_input": cal.kept_input, "units": [vars(u) for u in cal.units]}
        err.print(f"seed {seed}: calibrated ({mode}): agreement {run['calibrated'][mode]['agreement']:.2%}")
    start = "recalibrate"  # the calibrate default; the other is reported above
    run["finetune_from"] = f"calibrated ({start})"

    # 4. Fine-tune from the calibrated model: each bn_stats with keep=last, then the defaults (freeze, keep=best).
    run["finetuned"] = {}
    for trainable, lr in (("norm", args.lr_norm), ("all", args.lr_all)):
        for mode, keep in (("freeze", "last"), ("update", "last"), ("recalibrate", "last"), ("freeze", "best")):
            name = f"{trainable}/{mode}/{keep}"
            err.print(f"seed {seed}: finetune --train {trainable} --bn-stats {mode} --keep {keep}")
            run["finetuned"][name] = distill(copy.deepcopy(calibrated[start]), trainable, lr, mode, keep)
    return run


def summarize(runs: list[dict]) -> dict:
    from paper_common import mean_std

    rows = {"teacher": [r["teacher_val_acc"] for r in runs]}
    flat: dict[str, list[float]] = {}
    for r in runs:
        flat.setdefault("converted", []).append(r["converted"]["agreement"])
        for k, v in r["teacher_lr0"].items():
            flat.setdefault(f"teacher lr0 {k}", []).append(v["agreement"])
        for k, v in r["calibrated"].items():
            flat.setdefault(f"calibrated {k}", []).append(v["agreement"])
        for k, v in r["finetuned"].items():
            flat.setdefault(f"finetuned {k}", []).append(v["agreement"])
    out = {"teacher_val_acc": mean_std(rows["teacher"]), "agreement": {k: mean_std(v) for k, v in flat.items()}}
    cal = [r["calibrated"]["recalibrate"]["agreement"] for r in runs]
    out["defaults_never_below_calibrate"] = all(
        r["finetuned"][f"{t}/freeze/best"]["agreement"] >= c for r, c in zip(runs, cal, strict=True)
        for t in ("norm", "all"))
    return out


def render(result: dict) -> None:
    table = Table(title="cifar_resnet20 on digits: agreement with the teacher on held-out images (mean over seeds)",
                  title_justify="left")
    for col in ("arm", "agreement", "val acc", "written"):
        table.add_column(col, justify="left" if col in ("arm", "written") else "right")
    runs = result["runs"]

    def row(name, getter):
        vals = [getter(r) for r in runs]
        agree = sum(v["agreement"] for v in vals) / len(vals)
        acc = sum(v["val_acc"] for v in vals) / len(vals)
        table.add_row(name, f"{agree:.2%}", f"{acc:.2%}", ", ".join(sorted({v.get("written", "") for v in vals})))

    for mode in runs[0]["teacher_lr0"]:
        row(f"teacher, finetune lr 0, bn_stats {mode}", lambda r, m=mode: r["teacher_lr0"][m])
    row("converted (every 2, a = b = 0.5)", lambda r: r["converted"])
    for mode in runs[0]["calibrated"]:
        row(f"calibrated, bn_stats {mode}", lambda r, m=mode: r["calibrated"][m])
    for name in runs[0]["finetuned"]:
        row(f"finetuned {name}", lambda r, n=name: r["finetuned"][n])
    Console(width=160).print(table)
    err.print(f"defaults never below calibrate: {result['summary']['defaults_never_below_calibrate']}")


if __name__ == "__main__":
    main()
