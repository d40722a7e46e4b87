"""When does a race of plans know its winner? Per-epoch hold-out curves of the search's global stage.

The search races the plans that meet a latency budget (the table's plan, the uniform policies, other timed plans;
``repconv.search.rivals``) inside the global stage and keeps the one the judge scores best (``repconv.train.race``).
This benchmark trains each plan through the whole global stage (the search's recovery, ``search.recover``, the
refit off so that the curves are the plans') and records, per epoch, the judge's score on the hold-out of the
training images; the end is each plan's accuracy on the digits val split (the figure the search reports).

Plans: the search's choice at each ``--budgets`` value (the integer program, checked by timing the assembled
model: ``search.measured``) and each uniform policy. From the curves it derives what a race would have kept,
judged after epoch e alone (the search's default judges after epoch 1), and by successive halving over
``--rungs`` (default 1,3), and that choice's regret: the best plan's mean end accuracy minus the kept plan's,
over ``--seeds`` (each seed orders the data and draws the hold-out).

    PYTHONPATH=. python benchmarks/race_curves.py --checkpoint resnet50.repconv.safetensors \\
        [--budgets 0.9 0.8 0.7] [--quick] [--out benchmarks/results/race_curves.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from paper_common import err, finish, machine, save_partial

import repconv
from repconv.data import digits
from repconv.errors import PlanError
from repconv.search.candidates import assemble_plan
from repconv.search.damage import DamageOptions
from repconv.search.measured import select_measured
from repconv.search.recover import recover
from repconv.search.run import SearchOptions, build_table, plan_measurer
from repconv.train.local import LocalOptions
from repconv.train.loop import evaluate
from repconv.train.race import survivors

UNIFORM = {"pf-hybrid": {"method": "parameter-free", "pf_policy": "hybrid"},
           "pf-all": {"method": "parameter-free", "pf_policy": "all"},
           "replace-every-2": {"method": "replacement", "every": 2}}


def kept_by_halving(curves: dict[str, list[float]], rungs: list[int]) -> str:
    """The plan a race over ``rungs`` keeps, replayed on the curves with ``repconv.train.race.survivors``."""
    names, alive = list(curves), list(curves)
    for r, rung in enumerate(rungs):
        alive = survivors({n: curves[n][rung - 1] for n in alive}, names, last=r == len(rungs) - 1)
        if len(alive) == 1:
            break
    return alive[0]


def kept_after(curves: dict[str, list[float]], epoch: int) -> str:
    """The plan a race judged after ``epoch`` alone keeps (one rung; ties: the first listed)."""
    return kept_by_halving(curves, [epoch])


def races(arms: dict, seeds: list[int], epochs: int, rungs: list[int]) -> dict:
    """For each judge (after epoch e alone; halving over ``rungs``), the plan it keeps on each seed's curves and its
    regret in points: the best plan's mean end accuracy minus the kept plan's (means over seeds: one seed's end
    accuracy is as noisy as the judge)."""
    best = max(a["end_mean"] for a in arms.values())
    judges = {f"epoch {e}": (lambda c, e=e: kept_after(c, e)) for e in range(1, epochs + 1)}
    judges[f"halving {','.join(map(str, rungs))}"] = lambda c: kept_by_halving(c, rungs)
    out = {}
    for how, judge in judges.items():
        kept = [judge({n: a["runs"][i]["holdout"] for n, a in arms.items()}) for i in range(len(seeds))]
        regrets = [round(100 * (best - arms[n]["end_mean"]), 2) for n in kept]
        out[how] = {"kept": kept, "regret_points": regrets, "mean_regret_points": round(statistics.fmean(regrets), 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="a trained original (default: train cifar_resnet20, --quick)")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.9, 0.8, 0.7])
    ap.add_argument("--policies", nargs="*", choices=list(UNIFORM), default=["pf-hybrid", "pf-all"])
    ap.add_argument("--global-epochs", type=int, default=10)
    ap.add_argument("--global-lr", type=float, default=3e-3)
    ap.add_argument("--rungs", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, help="the candidate table's cache (reused when it matches)")
    ap.add_argument("--quick", action="store_true", help="cifar_resnet20 for one epoch, 2 global epochs of 2 "
                    "batches, layer3's units (a smoke test)")
    ap.add_argument("--out", type=Path, default=Path("race_curves.json"))
    args = ap.parse_args()
    quick = {"units": ("layer3.*",), "train_images": 64, "eval_images": 64, "latency_rounds": 1,
             "latency_block": 3, "latency_warmup": 1, "batches_per_epoch": 2} if args.quick else {}
    if args.quick:
        args.global_epochs, args.rungs, args.budgets, args.seeds = 2, [1, 2], [0.95], [0, 1]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
                    "machine": machine(args.threads), "arms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint
        if ckpt is None:
            ckpt = tmp / "original.safetensors"
            repconv.train("cifar_resnet20", data="digits", output=ckpt, replace=False, epochs=1, batch_size=32,
                          batches_per_epoch=4, input_size=32)
        loaded = repconv.load_checkpoint(ckpt)
        teacher, meta = loaded.model.eval(), loaded.meta
        size = meta.input_size[-1]
        train_set, val_set = digits("train", size, meta.mean, meta.std), digits("val", size, meta.mean, meta.std)
        opts = SearchOptions(threads=args.threads, damage=DamageOptions(steps=2 if args.quick else 40),
                             local=LocalOptions(epochs=0), global_epochs=args.global_epochs,
                             global_lr=args.global_lr, refit="off", **quick)
        result["original"] = {"val_acc": evaluate(teacher, val_set)}
        err.print("building the candidate table")
        table, _ = build_table(teacher, train_set, val_set, options=opts, cache=args.cache, progress=err.print)
        specs: dict[str, dict] = {}
        for b in args.budgets:
            try:  # as the search selects: the table's plan, checked on the assembled model
                choice = select_measured(table, b, plan_measurer(table, teacher, val_set.tensors[0][:1], opts, ()),
                                         checks=opts.latency_checks, tolerance=opts.latency_tolerance).selection.choice
            except PlanError as exc:
                err.print(f"budget {b}: {exc}")
                continue
            if choice and all(choice != s.get("choice") for s in specs.values()):
                specs[f"table-{b}"] = {"choice": choice}
        specs |= {name: UNIFORM[name] for name in args.policies}
        for name, spec in specs.items():
            plan = assemble_plan(table.units, spec["choice"], arch=meta.arch) if "choice" in spec else None
            arm = result["arms"][name] = {"choice": spec.get("choice"), "runs": []}
            for seed in args.seeds:  # the seed orders the data and draws the hold-out the judge scores on
                err.print(f"{name}, seed {seed}: the global stage, {args.global_epochs} epochs")
                t0 = time.perf_counter()
                conv = repconv.convert(ckpt, plan=plan) if plan else repconv.convert(ckpt, **spec)
                arm["units"] = len(conv.plan.steps)
                student, info = recover(conv.model, teacher, train_set, conv.plan, replace(opts, seed=seed),
                                        output=tmp / f"{name}.state")
                arm["runs"].append({"seed": seed, "end": evaluate(student, val_set),
                                    "holdout": [h.get("val_acc", h.get("agreement")) for h in info["history"]],
                                    "seconds": round(time.perf_counter() - t0, 1),
                                    "loadavg_1m": round(os.getloadavg()[0], 2)})
                save_partial(result, args.out)
            ends = [r["end"] for r in arm["runs"]]
            arm["end_mean"], arm["end_sd"] = statistics.fmean(ends), statistics.pstdev(ends)
    result["races"] = races(result["arms"], args.seeds, args.global_epochs, args.rungs)
    finish(result, args.out, started)


if __name__ == "__main__":
    main()
