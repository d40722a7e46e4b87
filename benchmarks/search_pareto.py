"""Plan search at several latency budgets against the uniform policies, all measured in one run.

A model trained on digits (``--arch``, 10 epochs as in docs/results.md 2.3c, or ``--checkpoint``) gets one
candidate table on ``--target`` (cached: every budget after the first is only a solve), then for each budget a
searched plan (converted, locally distilled, globally distilled); the uniform policies ``pf all``, ``pf hybrid`` and
replacement ``every 2`` get the same recovery (``repconv.search.recover``: the refit raced against none, local and
global epochs). All forms are then timed together
(interleaved, one measure_models call) and scored on the held-out split. Checks written to the JSON:
searched >= every uniform policy whose measured latency is equal or higher; no searched model slower than the
original; predicted latency within 10% of measured. A budget that no plan meets once measured on the assembled
model (``search`` re-solves with the savings it shows) is recorded as refused, with the reason.

    PYTHONPATH=. python benchmarks/search_pareto.py --arch resnet50 [--budgets 0.9 0.75 0.6] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import torch
from paper_common import err, finish, machine, save_partial

import repconv
from repconv.data import digits
from repconv.errors import PlanError
from repconv.search.damage import DamageOptions
from repconv.search.latency import measure_models
from repconv.search.pareto import Point, pareto_table, plot
from repconv.search.recover import recover
from repconv.search.run import SearchOptions, agreement, latency_model, search
from repconv.train.local import LocalOptions
from repconv.train.loop import evaluate

UNIFORM = {"pf-all": {"method": "parameter-free", "pf_policy": "all"},
           "pf-hybrid": {"method": "parameter-free", "pf_policy": "hybrid"},
           "replace-every-2": {"method": "replacement", "every": 2}}
# --quick: the search's table on layer3's units only, from 64 images, timed in one short round
QUICK_SEARCH = {"units": ("layer3.*",), "train_images": 64, "eval_images": 64, "latency_rounds": 1, "latency_block": 3,
                "latency_warmup": 1, "verify_rounds": 1, "latency_tolerance": 0.1}  # one short round: noisy timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--checkpoint", type=Path, help="a trained original (skips training)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.75, 0.6])
    ap.add_argument("--target", default="ort-cpu")
    ap.add_argument("--local-epochs", type=int, default=0)
    ap.add_argument("--global-epochs", type=int, default=10)
    ap.add_argument("--refit", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--race-plans", type=int, default=3, help="plans a searched plan races (1: the table's alone)")
    ap.add_argument("--race-epochs", type=int, nargs="+", default=[1], help="the race's rungs (train/race.py)")
    ap.add_argument("--global-lr", type=float, default=3e-3)
    ap.add_argument("--damage-steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches-per-epoch", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and ONNX Runtime threads (default 2; --quick: 1, as 2 threads' barriers stall a "
                    "quick run's tiny kernels on a busy 2-core machine, see blockwise_recovery.py --threads)")
    ap.add_argument("--quick", action="store_true", help="cifar_resnet20, 1 pretrain epoch, tiny budgets; the "
                    "search on layer3's units, 64 images and one latency round; one thread (a smoke test)")
    ap.add_argument("--out", type=Path, default=Path("search_pareto.json"))
    args = ap.parse_args()
    if args.quick:
        args.arch, args.pretrain_epochs, args.local_epochs, args.global_epochs = "cifar_resnet20", 1, 0, 2
        args.damage_steps, args.batches_per_epoch, args.batch_size, args.budgets = 2, 2, 32, [0.97, 0.9]
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    search_quick = QUICK_SEARCH if args.quick else {}
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}
                    | {"search_overrides": search_quick},
                    "machine": machine(args.threads), "searched": {}, "uniform": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint
        if ckpt is None:
            ckpt = tmp / "original.safetensors"
            err.print(f"training {args.arch} on digits at {args.size}px for {args.pretrain_epochs} epochs")
            repconv.train(args.arch, data="digits", output=ckpt, replace=False, epochs=args.pretrain_epochs,
                          batch_size=args.batch_size, batches_per_epoch=args.batches_per_epoch, input_size=args.size)
        loaded = repconv.load_checkpoint(ckpt)
        teacher, meta = loaded.model.eval(), loaded.meta
        train_set = digits("train", args.size, meta.mean, meta.std)
        val_set = digits("val", args.size, meta.mean, meta.std)
        eval_batches = list(val_set.tensors[0].split(128))
        result["original"] = {"val_acc": evaluate(teacher, val_set)}
        opts = SearchOptions(target=args.target, threads=args.threads,
                             damage=DamageOptions(steps=args.damage_steps, batch_size=args.batch_size),
                             local=LocalOptions(epochs=args.local_epochs, batch_size=args.batch_size),
                             global_epochs=args.global_epochs, global_lr=args.global_lr, refit=args.refit,
                             race_plans=args.race_plans, race_epochs=tuple(args.race_epochs),
                             batches_per_epoch=args.batches_per_epoch,
                             **search_quick)
        cache = tmp / "candidates.json"
        models = {"original": teacher}
        for b in args.budgets:
            err.print(f"search at latency budget {b}")
            try:
                res = search(ckpt, train_set, tmp / f"search-{b}", val_data=val_set, latency_budget=b, options=opts,
                             cache=cache, progress=err.print)
            except PlanError as exc:  # measured on the assembled model, no plan reaches it
                err.print(f"budget {b} refused: {exc}")
                result["refused"] = result.get("refused", {}) | {str(b): str(exc)}
                save_partial(result, args.out)
                continue
            student = repconv.load(res.checkpoint) if res.checkpoint else teacher
            name = f"searched-{b}"
            models[name] = latency_model(teacher, repconv.load_checkpoint(res.checkpoint).meta.plan) \
                if res.checkpoint else teacher
            result["searched"][name] = {"budget": b, "choice": res.selection.choice,
                                        "predicted_latency_ms": res.predicted_latency_ms,
                                        "predicted_ratio": res.predicted_ratio,
                                        "predicted_drop": res.predicted_drop, "val_acc": evaluate(student, val_set),
                                        "table_ratio": res.selection.predicted_ratio,
                                        "latency_probes": res.latency_probes,
                                        "agreement": res.agreement, "table_reused": res.table_reused,
                                        "start": res.start, "kept": res.kept, "contenders": res.contenders,
                                        "seconds": res.seconds, "loadavg_1m": round(os.getloadavg()[0], 2)}
            save_partial(result, args.out)
        for name, kw in UNIFORM.items():
            err.print(f"uniform {name}")
            conv = repconv.convert(ckpt, **kw)
            # the search's own recovery (refit raced, local, global); keep=best judges on a hold-out of the training
            # images, as the search does (choosing the epoch on the split the table reports would flatter them)
            student, info = recover(conv.model, teacher, train_set, conv.plan, opts, output=tmp / f"{name}.state")
            models[name] = latency_model(teacher, conv.plan)
            result["uniform"][name] = {"val_acc": evaluate(student, val_set),  # as the searched rows are scored
                                       "agreement": agreement(student, teacher, eval_batches),
                                       "start": info.get("start"), "loadavg_1m": round(os.getloadavg()[0], 2)}
            save_partial(result, args.out)
        err.print(f"timing {len(models)} models together on {args.target}")
        x = val_set.tensors[0][:1]
        lat = measure_models({k: copy.deepcopy(m) for k, m in models.items()}, x, args.target, threads=args.threads,
                             rounds=3 if args.quick else 7, block=5 if args.quick else 20)
    base = lat["original"]
    result["original"]["latency_ms"] = base
    pts = [Point("original", "original", base, result["original"]["val_acc"])]
    for group, kind in (("searched", "searched"), ("uniform", "uniform")):
        for name, row in result[group].items():
            row["latency_ms"] = lat[name]
            row["speedup"] = base / lat[name]
            pts.append(Point(name, kind, lat[name], row["val_acc"], row.get("predicted_latency_ms"),
                             row.get("predicted_drop"), row.get("budget")))
    checks = {}
    for name, row in result["searched"].items():
        measured_ratio = row["latency_ms"] / base
        row["predicted_vs_measured"] = row["predicted_ratio"] / measured_ratio - 1
        slower_uniform = [u for u, r in result["uniform"].items() if r["latency_ms"] >= row["latency_ms"]]
        checks[name] = {"not_slower_than_original": row["latency_ms"] <= base,
                        "prediction_within_10pct": abs(row["predicted_vs_measured"]) <= 0.10,
                        "beats_uniform_at_equal_or_higher_latency": all(
                            row["val_acc"] >= result["uniform"][u]["val_acc"] - 1e-9 for u in slower_uniform),
                        "uniform_compared": slower_uniform}
    result["checks"] = checks
    result["pareto"] = pareto_table(pts, base)
    png = args.out.with_suffix(".png")
    plot(pts, png, title=f"{args.arch} on digits, {args.target}: accuracy vs latency")
    result["plot"] = str(png)
    finish(result, args.out, started)


if __name__ == "__main__":
    main()
