"""How stable the candidate table's latency figures are between builds, per number of timing rounds.

The search's plans change between runs of the same command because the table's per-unit latency deltas do
(docs/results.md 2.7g: its fastest plan was put at 0.496 in one run and 0.185 in the next, and ran at 0.66-0.72
both times). This builds the latency half of the table ``--repeats`` times for each ``--rounds`` setting (the
candidates untrained: latency does not depend on their weights) and reports, per setting, the spread of the
fastest plan's predicted ratio and of each unit's best saving, beside the time the latency phase took. The
assembled fastest plan of the first build is timed once against the original as the reference.

    PYTHONPATH=. python benchmarks/table_latency_stability.py --checkpoint resnet50.repconv.safetensors
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from paper_common import err, finish, machine, mean_std

import repconv
from repconv.models import resolve_arch
from repconv.search.candidates import assemble_plan, enumerate_candidates
from repconv.search.damage import build_views
from repconv.search.latency import measure_models, measure_unit_deltas
from repconv.search.run import latency_model


def fastest_choice(deltas: dict[str, dict[str, float]]) -> tuple[dict[str, str], float]:
    """Each unit's candidate with the largest saving (none when every candidate is slower) and the total, ms."""
    choice, saved = {}, 0.0
    for unit, d in deltas.items():
        cands = {k: v for k, v in d.items() if k not in ("keep_ms", "replace")}
        best = min(cands, key=cands.get) if cands else None
        if best is not None and cands[best] < 0:
            choice[unit], saved = best, saved - cands[best]
    return choice, saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="an original (e.g. 2.7d's converged resnet50); without it an "
                    "untrained --arch at --size (latency does not depend on the weights)")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, nargs="+", default=[5, 20])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target", default="ort-cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="an untrained cifar_resnet20 at 16px, 1 and 2 rounds, 2 "
                    "builds, one thread (a smoke test)")
    ap.add_argument("--out", type=Path, default=Path("table_latency_stability.json"))
    args = ap.parse_args()
    if args.quick:
        args.checkpoint, args.arch, args.size, args.rounds, args.repeats, args.threads = None, "cifar_resnet20", 16, \
            [1, 2], 2, 1
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.checkpoint:
        loaded = repconv.load_checkpoint(args.checkpoint)
        teacher, arch, input_size = loaded.model.eval(), loaded.meta.arch, loaded.meta.input_size
    else:
        teacher, arch, input_size = resolve_arch(args.arch).build().eval(), args.arch, (3, args.size, args.size)
    example = torch.randn(1, *input_size)
    units = enumerate_candidates(teacher, kinds=("pf-max", "pf-avg", "hybrid"))
    views = build_views(teacher, units)
    base = measure_models({"original": teacher}, example, args.target, threads=args.threads)["original"]
    result: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
                    "machine": machine(args.threads), "base_ms": base, "settings": {}}
    first_choice = None
    for rounds in args.rounds:
        builds = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            deltas = measure_unit_deltas(teacher, views, example, args.target, threads=args.threads, rounds=rounds,
                                         block=3 if args.quick else 10)
            seconds = time.perf_counter() - t0
            choice, saved = fastest_choice(deltas)
            first_choice = first_choice or choice
            builds.append({"seconds": round(seconds, 1), "fastest_ratio": 1 - saved / base, "units": len(choice),
                           "best_saving_ms": {u: -min(v for k, v in d.items() if k not in ("keep_ms", "replace"))
                                              for u, d in deltas.items()}})
            err.print(f"rounds {rounds}, build {i + 1}: fastest plan {builds[-1]['fastest_ratio']:.3f} "
                      f"({len(choice)} units), {seconds:.1f} s")
        per_unit_sd = [statistics.pstdev([b["best_saving_ms"][u] for b in builds]) for u in builds[0]["best_saving_ms"]]
        result["settings"][str(rounds)] = {
            "builds": builds, "fastest_ratio": mean_std([b["fastest_ratio"] for b in builds]),
            "mean_unit_saving_sd_ms": statistics.fmean(per_unit_sd),
            "seconds": mean_std([b["seconds"] for b in builds])}
    plan = assemble_plan(units, first_choice, arch=arch)
    timed = measure_models({"original": teacher, "fastest": latency_model(teacher, plan)}, example, args.target,
                           threads=args.threads, rounds=2 if args.quick else 7, block=3 if args.quick else 20)
    result["fastest_measured_ratio"] = timed["fastest"] / timed["original"]
    err.print(f"the first build's fastest plan, assembled: {result['fastest_measured_ratio']:.3f}")
    finish(result, args.out, started)


if __name__ == "__main__":
    main()
