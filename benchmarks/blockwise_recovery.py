"""Block-wise (local) distillation then global distillation, against today's recovery, on the digits bed.

The bed of docs/results.md 2.3c: torchvision resnet50 and mobilenet_v2 trained from scratch on digits at 32px
for 10 epochs (repconv.train: SGD lr 0.1, cosine), converted to parameter-free forms, then recovered with the
SAME budget as the original's control (10 epochs of fine-tuning, AdamW lr 1e-3, batch 64, every parameter).
One epoch of local distillation costs about one training epoch (one teacher forward, each unit forward and
backward), so it counts as one epoch of the budget. Arms per converted form:

* ``ce``: 10 epochs on labels (2.3c's recovery);
* ``kd``: 10 epochs of logits distillation from the original (today's logits-only recovery);
* ``local+kd``: ``--local-epochs`` of local distillation, then the rest of the budget as ``kd``;
* ``local+both``: the same, the global stage on labels + logits (``objective both``, alpha 0.5);
* ``refit+kd``: the least-squares refit (``repconv.train.refit``, ``--refit-batches`` batches, counted as one epoch
  of the budget), then the rest of the budget as ``kd``; ``refit+ce`` and ``refit+both``: the same on labels, or
  labels + logits (for a teacher much weaker than its fine-tuned control);
* ``refit+local+kd``: the search's recovery: the refit, local distillation, then ``kd`` for the rest.

An arm may carry its own global learning rate, ``ARM@LR`` (``kd@3e-3``); the control is fine-tuned once per
``--control-lrs`` value (default: ``--lr``), and every drop is against the best of those controls.

``--parts memory`` measures peak RSS of local distillation against global fine-tuning (resnet50 pf-hybrid,
same batch, fresh processes, like finetune_memory.py). Every figure is stored with the 1-min load average at
the time it was taken.

    PYTHONPATH=. python benchmarks/blockwise_recovery.py [--quick] [--out benchmarks/results/blockwise_recovery.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from paper_common import err, finish, machine, save_partial

import repconv
from repconv.data import digits
from repconv.train.local import LocalOptions, local_distill
from repconv.train.loop import TrainConfig, evaluate, fit
from repconv.train.refit import least_squares_refit

ARMS = ("ce", "kd", "local+kd", "local+both", "refit+ce", "refit+kd", "refit+both", "refit+local+kd")
DEFAULT_FORMS = {"resnet50": ["hybrid", "all"], "mobilenet_v2": ["hybrid"]}


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def _cfg(args, epochs: int, objective: str, lr: float | None = None) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=lr or args.lr, optimizer="adamw",
                       objective=objective, trainable="all", batches_per_epoch=args.batches_per_epoch, seed=0)


def parse_arm(text: str) -> tuple[str, float | None]:
    arm, _, lr = text.partition("@")
    if arm not in ARMS:
        raise SystemExit(f"unknown arm '{arm}': use one of {', '.join(ARMS)} (optionally @LR)")
    return arm, float(lr) if lr else None


def run_arm(spec: str, student, teacher, train_set, val_set, args) -> dict:
    started = time.perf_counter()
    arm, lr = parse_arm(spec)
    row: dict = {"arm": arm, "lr": lr or args.lr, "loadavg_1m_start": load1()}
    global_epochs = args.budget
    if arm.startswith("refit"):
        res = least_squares_refit(student, teacher, train_set, batches=args.refit_batches,
                                  batch_size=args.batch_size)
        row["refit"] = {"mean_error_before": res.mean_error_before, "mean_error_after": res.mean_error_after,
                        "seconds": res.seconds, "images": res.images, "skipped": res.skipped,
                        "sites": [{"module": x.module, "kind": x.kind, "before": round(x.error_before, 4),
                                   "after": round(x.error_after, 4)} for x in res.sites]}
        row["val_acc_after_refit"] = evaluate(student, val_set)
        global_epochs -= 1
    if "local" in arm:
        opts = LocalOptions(epochs=args.local_epochs, batch_size=args.batch_size, lr=args.local_lr,
                            steps_per_epoch=args.batches_per_epoch, pf_train=args.pf_train, bn_stats=args.bn_stats)
        res = local_distill(student, teacher, train_set, options=opts, eval_data=val_set)
        row["local"] = {"mean_error_before": res.mean_error_before, "mean_error_after": res.mean_error_after,
                        "seconds": res.seconds, "trainable_params": res.trainable_params,
                        "units": [{"unit": u.unit, "before": round(u.error_before, 4), "after": round(u.error_after, 4)}
                                  for u in res.units]}
        row["val_acc_after_local"] = evaluate(student, val_set)
        global_epochs -= args.local_epochs
    objective = {"ce": "ce", "kd": "distill", "local+kd": "distill", "local+both": "both", "refit+ce": "ce",
                 "refit+kd": "distill", "refit+both": "both", "refit+local+kd": "distill"}[arm]
    row["history"] = []
    if global_epochs > 0:
        res = fit(student, train_set, _cfg(args, global_epochs, objective, lr), val_set=val_set,
                  teacher=teacher if objective != "ce" else None)
        row["history"] = [{k: h.get(k) for k in ("epoch", "train_loss", "val_acc", "seconds")} for h in res.history]
    row["val_acc"] = evaluate(student, val_set)
    row["global_epochs"], row["seconds"] = max(global_epochs, 0), round(time.perf_counter() - started, 1)
    row["loadavg_1m_end"] = load1()
    err.print(f"  {arm}: {row['val_acc']:.2%} ({row['seconds']:.0f} s, load {row['loadavg_1m_end']})")
    return row


def accuracy(arch: str, forms: list[str], args, out: dict, tmp: Path, on_progress) -> None:
    out |= {"arch": arch, "input_size": args.size, "forms": {}}
    given = dict(c.split("=", 1) for c in args.checkpoint)
    if arch in given:  # a trained original (its training is then not part of this run)
        original = Path(given[arch])
        out["checkpoint"] = str(original)
    else:
        original = tmp / f"{arch}.safetensors"
        err.print(f"training {arch} on digits at {args.size}px for {args.pretrain_epochs} epochs")
        repconv.train(arch, data="digits", output=original, replace=False, epochs=args.pretrain_epochs,
                      batch_size=args.batch_size, batches_per_epoch=args.batches_per_epoch, input_size=args.size)
    teacher = repconv.load(original).eval()
    meta = repconv.load_checkpoint(original).meta
    train_set = digits("train", args.size, meta.mean, meta.std)
    val_set = digits("val", args.size, meta.mean, meta.std)
    out["original"] = {"val_acc": evaluate(teacher, val_set), "loadavg_1m": load1()}
    out["original"]["controls"] = []
    for lr in args.control_lrs or [args.lr]:
        control = copy.deepcopy(teacher)
        fit(control, train_set, _cfg(args, args.budget, "ce", lr), val_set=val_set)
        out["original"]["controls"].append({"lr": lr, "val_acc": evaluate(control, val_set), "loadavg_1m": load1()})
        err.print(f"{arch}: control at lr {lr}: {out['original']['controls'][-1]['val_acc']:.2%}")
    out["original"]["val_acc_finetuned"] = max(c["val_acc"] for c in out["original"]["controls"])
    out["original"]["loadavg_1m_finetuned"] = load1()
    err.print(f"{arch}: original {out['original']['val_acc']:.2%}, fine-tuned {args.budget} epochs "
              f"{out['original']['val_acc_finetuned']:.2%}")
    on_progress()
    for policy in forms:
        conv = repconv.convert(teacher, arch=arch, method="parameter-free", pf_policy=policy)
        row = out["forms"][f"pf-{policy}"] = {"val_acc_converted": evaluate(conv.model, val_set), "arms": {}}
        err.print(f"{arch} pf-{policy}: converted {row['val_acc_converted']:.2%}")
        for arm in args.arms:
            student = copy.deepcopy(conv.model)
            student.meta["repconv_plan"] = conv.plan
            row["arms"][arm] = run_arm(arm, student, teacher, train_set, val_set, args)
            row["arms"][arm]["drop_vs_original_finetuned"] = round(
                100 * (out["original"]["val_acc_finetuned"] - row["arms"][arm]["val_acc"]), 2)
            on_progress()


# ---------------------------------------------------------------- memory (fresh processes)


def _peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def memory_worker(payload: dict) -> dict:
    import ctypes

    torch.set_num_threads(payload["threads"])
    torch.manual_seed(0)
    import torchvision

    teacher = torchvision.models.resnet50(num_classes=10).eval()
    conv = repconv.convert(teacher, arch="resnet50", method="parameter-free", pf_policy="hybrid")
    student = conv.model
    images = torch.randn(payload["batch"] * payload["steps"], 3, payload["size"], payload["size"])
    labels = torch.randint(0, 10, (len(images),))
    ds = torch.utils.data.TensorDataset(images, labels)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kb()
    t0 = time.perf_counter()
    if payload["mode"] == "local":
        local_distill(student, teacher, ds, options=LocalOptions(epochs=1, batch_size=payload["batch"],
                                                                 eval_batches=1))
    else:
        fit(student, ds, TrainConfig(epochs=1, batch_size=payload["batch"], objective="distill", trainable="all"),
            teacher=teacher)
    return {"mode": payload["mode"], "rss_before_kb": base, "peak_kb": _peak_kb(), "train_mem_kb": _peak_kb() - base,
            "seconds": round(time.perf_counter() - t0, 2), "loadavg_1m": load1()}


def memory(args) -> dict:
    from paper_common import run_fresh

    out = {"model": "resnet50 pf-hybrid", "batch": args.mem_batch, "size": args.mem_size, "steps": args.mem_steps}
    for mode in ("global", "local"):
        out[mode] = run_fresh(__file__, {"mode": mode, "batch": args.mem_batch, "size": args.mem_size,
                                         "steps": args.mem_steps, "threads": args.threads})
        err.print(f"memory {mode}: {out[mode]['train_mem_kb'] / 1024:.0f} MiB above the loaded model")
    out["local_over_global"] = round(out["local"]["train_mem_kb"] / max(out["global"]["train_mem_kb"], 1), 3)
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["accuracy", "memory"], choices=["accuracy", "memory"])
    ap.add_argument("--archs", nargs="+", default=list(DEFAULT_FORMS))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), help=f"of {', '.join(ARMS)}, each optionally @LR")
    ap.add_argument("--forms", nargs="+", default=None, help="parameter-free policies (default: per arch)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--checkpoint", nargs="*", default=[], metavar="ARCH=PATH",
                    help="use this trained original for ARCH instead of training one")
    ap.add_argument("--budget", type=int, default=10, help="recovery epochs of every arm and of the control")
    ap.add_argument("--local-epochs", type=int, default=3)
    ap.add_argument("--local-lr", type=float, default=1e-3)
    ap.add_argument("--pf-train", default="all", choices=["all", "norm"])
    ap.add_argument("--bn-stats", default="freeze", choices=["freeze", "update", "recalibrate"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--control-lrs", type=float, nargs="+", default=None)
    ap.add_argument("--refit-batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches-per-epoch", type=int, default=None)
    ap.add_argument("--mem-batch", type=int, default=32)
    ap.add_argument("--mem-size", type=int, default=224)
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and ONNX Runtime threads (default 2; --quick: 1, as 2 threads' barriers stall a "
                    "quick run's tiny kernels on a busy 2-core machine: measured 216 s against 25 s)")
    ap.add_argument("--quick", action="store_true", help="mobilenet_v2 pf-hybrid, 1+1 epochs of 2 batches; "
                    "memory at 64px; one thread")
    ap.add_argument("--out", type=Path, default=Path("blockwise_recovery.json"))
    args = ap.parse_args()
    if args.quick:
        args.archs, args.pretrain_epochs, args.budget, args.local_epochs = ["mobilenet_v2"], 1, 2, 1
        args.batch_size, args.batches_per_epoch, args.mem_size, args.mem_batch = 16, 2, 64, 8
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(args.threads)}
    if "accuracy" in args.parts:
        result["accuracy"] = []
        with tempfile.TemporaryDirectory() as tmp:
            for arch in args.archs:
                result["accuracy"].append({})
                forms = args.forms or DEFAULT_FORMS.get(arch, ["hybrid"])
                accuracy(arch, forms, args, result["accuracy"][-1], Path(tmp), lambda: save_partial(result, args.out))
    if "memory" in args.parts:
        result["memory"] = memory(args)
    finish(result, args.out, started)


if __name__ == "__main__":
    main()
