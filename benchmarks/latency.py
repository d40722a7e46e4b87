"""How the benchmarks time models: blocks in rounds, ONNX Runtime in fresh processes, paired speed-up ratios.

Why not one call per model, round-robin: every ONNX Runtime session owns a thread pool whose threads spin
for a while after each run, so on a 2-core machine the session timed next shares its cores with the
spinning pool of the one before (resnet50 at batch 1 measured 108 ms that way and 55 ms alone). So each
round runs every model as a *block* (``warmup`` untimed runs, then ``block`` timed ones, median kept), and
the speed-up of a model is the median over rounds of ``baseline block / model block``: the two blocks of a
pair are seconds apart, so slow drifts of the machine cancel. ONNX Runtime is timed in ``processes`` fresh
processes (only onnxruntime imported, no torch threads around), because a process's memory layout alone
moved one model's median by 30% from one process to the next; the result pools the rounds of all of them.

    python benchmarks/latency.py --worker JSON   # what ort_latency runs; prints one JSON line
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np


def block_rounds(fns: Mapping[str, Callable[[], object]], rounds: int, block: int, warmup: int) -> dict[str, list]:
    """For each name, the median ms of its block in every round (blocks run in the mapping's order). Not
    ``repconv.search.latency.time_interleaved``: the ``--worker`` processes that run this import onnxruntime
    alone, and that module imports torch."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            out[name].append(statistics.median(times))
    return out


def summarize(rounds_ms: Mapping[str, list[float]], baseline: str) -> dict[str, dict]:
    """Median ms, spread, and the median paired speed-up against ``baseline`` (round i against round i)."""
    base = rounds_ms[baseline]
    rows = {}
    for name, ms in rounds_ms.items():
        ratios = [b / m for b, m in zip(base, ms, strict=True)]
        rows[name] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "rounds": len(ms),
                      "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios)}
    return rows


def _worker(job: dict) -> dict:
    """Time ONNX files (name -> [path, level]) at each batch: {batch: {name: [round medians]}}."""
    from repconv.onnx_graph import ort_session

    sessions = {name: ort_session(path, level, threads=job["threads"], spinning="in-runs")
                for name, (path, level) in job["models"].items()}
    rng = np.random.default_rng(0)
    result = {}
    for batch in job["batches"]:
        feed = {"input": rng.standard_normal((batch, 3, job["size"], job["size"]), dtype=np.float32)}
        fns = {name: (lambda s=s, feed=feed: s.run(None, feed)) for name, s in sessions.items()}
        result[str(batch)] = block_rounds(fns, job["rounds"], job["block"], job["warmup"])
    return result


def ort_latency(models: Mapping[str, tuple[Path, str]], batches: list[int], size: int, *, threads: int = 2,
                processes: int = 3, rounds: int = 5, block: int = 5, warmup: int = 2) -> dict[str, dict]:
    """ONNX Runtime latency of name -> (onnx path, optimization level); the first name is the baseline.

    Returns ``{f"b{batch}": summarize(...)}`` pooled over ``processes`` fresh processes.
    """
    job = {"models": {k: [str(p), lvl] for k, (p, lvl) in models.items()}, "batches": batches, "size": size,
           "threads": threads, "rounds": rounds, "block": block, "warmup": warmup}
    pooled: dict[str, dict[str, list[float]]] = {str(b): {k: [] for k in models} for b in batches}
    for _ in range(processes):
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode:
            raise RuntimeError(f"latency worker failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        for batch, per_model in json.loads(done.stdout.strip().splitlines()[-1]).items():
            for name, ms in per_model.items():
                pooled[batch][name] += ms
    baseline = next(iter(models))
    return {f"b{b}": summarize(rounds_ms, baseline) for b, rounds_ms in pooled.items()}


def torch_latency(models: Mapping[str, Callable[[object], object]], inputs: Mapping[int, object], *,
                  rounds: int = 5, block: int = 3, warmup: int = 1) -> dict[str, dict]:
    """Torch eager latency (in this process) of name -> callable at each batch; the first is the baseline."""
    import torch

    out = {}
    for batch, x in inputs.items():
        with torch.inference_mode():
            fns = {name: (lambda m=m, x=x: m(x)) for name, m in models.items()}
            out[f"b{batch}"] = summarize(block_rounds(fns, rounds, block, warmup), next(iter(models)))
    return out


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    print(json.dumps(_worker(json.loads(sys.argv[2]))))
