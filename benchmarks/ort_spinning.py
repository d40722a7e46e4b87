"""Do ONNX Runtime sessions that repconv opened (export's checks, demo, bench) slow down torch work after them?

Each condition runs in a fresh process (``--worker``): optionally open the ONNX Runtime sessions an export
verification opens (``repconv.export.onnx.ort_session``, 2 intra-op threads, each run a few times), keep
them alive, then time a torch stage: ``steps`` SGD steps of cifar_resnet20 (batch 64, 32x32) with
``threads`` torch threads, ``repeats`` times; the median stage time and the process CPU seconds per stage
second (ORT threads that spin show up there) are kept. Before the stage, the process's CPU seconds per wall
second are read while the main thread sleeps 10 ms, 100 ms and 1 s right after one ORT run: what the
session's idle pool burns by spinning. Conditions:

``alone``            no ONNX Runtime in the process
``ort_alive``        sessions opened and run, then kept alive while torch works
``ort_interleaved``  as ``ort_alive``, and one ORT run right before each timed stage (a check between epochs)
``*_nospin``         the same with ``session.intra_op.allow_spinning = 0`` on the sessions
``ort_closed``       sessions run and dereferenced before torch starts (``del`` + ``gc.collect()``)

Every condition also runs beside one competing busy-loop process (``+busy``). Conditions are interleaved
round by round (ABC ABC ...) so slow drifts of a shared machine hit them alike; the load average at start and
end is recorded.

    PYTHONPATH=. python benchmarks/ort_spinning.py [--quick] [--rounds 3] [--out benchmarks/results/ort_spinning.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONDITIONS = ("alone", "ort_alive", "ort_alive_nospin", "ort_interleaved", "ort_interleaved_nospin", "ort_closed")
BUSY = [sys.executable, "-c", "while True: pass"]
IDLE_WINDOWS = (0.01, 0.1, 1.0)  # seconds slept after an ORT run while the process's CPU time is read


def _sessions(onnx_path: str, spin: bool, count: int, threads: int):
    """``count`` sessions as export's checks open them: repconv's own builder, spinning as ONNX Runtime's default
    (before the fix) or off (after: what ``ort_session`` now does for verification)."""
    import numpy as np

    from repconv.onnx_graph import ort_session

    sessions = [ort_session(onnx_path, "all", threads=threads, spinning="on" if spin else "off") for _ in range(count)]
    feed = {sessions[0].get_inputs()[0].name: np.random.default_rng(0).standard_normal((32, 3, 32, 32), np.float32)}
    for s in sessions:
        for _ in range(3):
            s.run(None, feed)
    return sessions, feed


def _worker(job: dict) -> dict:
    import torch

    from repconv.models import resolve_arch

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    cond = job["condition"]
    sessions, feed = ([], None)
    if cond != "alone":
        sessions, feed = _sessions(job["onnx"], spin="nospin" not in cond, count=job["sessions"],
                                   threads=job["ort_threads"])
    idle = {}
    if sessions:  # process CPU per wall second while the main thread sleeps right after one ORT run
        for window in IDLE_WINDOWS:
            sessions[0].run(None, feed)
            c0, t0 = time.process_time(), time.perf_counter()
            time.sleep(window)
            idle[str(window)] = round((time.process_time() - c0) / (time.perf_counter() - t0), 4)
    if cond == "ort_closed":
        sessions.clear()
        gc.collect()
    model = resolve_arch("cifar_resnet20").build(num_classes=10).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))

    def stage():
        for _ in range(job["steps"]):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    stage()  # warm-up
    wall, cpu = [], []
    for _ in range(job["repeats"]):
        if cond.startswith("ort_interleaved"):
            sessions[0].run(None, feed)
        c0, t0 = time.process_time(), time.perf_counter()
        stage()
        t1, c1 = time.perf_counter(), time.process_time()
        wall.append(t1 - t0)
        cpu.append((c1 - c0) / (t1 - t0))
    return {"stage_s": statistics.median(wall), "stage_s_all": wall, "cpu_per_wall": statistics.median(cpu),
            "idle_cpu_per_wall": idle}


def _export(tmp: Path) -> str:
    import torch

    from repconv.models import resolve_arch

    model = resolve_arch("cifar_resnet20").build(num_classes=10).eval()
    path = tmp / "cifar_resnet20.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    return str(path)


def main(argv: list[str] | None = None) -> None:
    from paper_common import err, finish, machine, save_partial

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and ORT intra-op threads)")
    parser.add_argument("--sessions", type=int, default=3, help="ORT sessions opened, as export's checks do")
    parser.add_argument("--quick", action="store_true", help="1 round, 1 step, 2 repeats")
    parser.add_argument("--no-busy", action="store_true", help="skip the runs beside a competing process")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ort_spinning.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.repeats = 1, 1, 2
    started = time.perf_counter()
    result = {"machine": machine(args.threads),
              "config": {"rounds": args.rounds, "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
                         "sessions": args.sessions, "quick": args.quick, "stage": "cifar_resnet20 SGD steps, batch 64"},
              "rounds": {}}
    busy_modes = (False,) if args.no_busy else (False, True)
    with tempfile.TemporaryDirectory(prefix="ort_spinning_") as tmp:
        onnx_path = _export(Path(tmp))
        raw: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            for busy in busy_modes:
                competitor = subprocess.Popen(BUSY) if busy else None
                try:
                    for cond in CONDITIONS:
                        job = {"condition": cond, "onnx": onnx_path, "threads": args.threads,
                               "ort_threads": args.threads, "sessions": args.sessions, "steps": args.steps,
                               "repeats": args.repeats}
                        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                                              capture_output=True, text=True,
                                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
                        if done.returncode:
                            raise RuntimeError(f"worker {cond} failed: {done.stderr.strip()[-2000:]}")
                        name = cond + ("+busy" if busy else "")
                        out = json.loads(done.stdout.strip().splitlines()[-1])
                        out["loadavg_1m"] = os.getloadavg()[0]
                        raw.setdefault(name, []).append(out)
                        err.print(f"round {r} {name}: {out['stage_s']:.3f} s, cpu/wall {out['cpu_per_wall']:.2f}, "
                                  f"idle cpu/wall after an ORT run {out['idle_cpu_per_wall']}")
                        result["raw"] = raw
                        save_partial(result, args.out)
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
    base = {b: statistics.median(x["stage_s"] for x in raw["alone" + b]) for b in ("", "+busy") if "alone" + b in raw}
    for name, runs in raw.items():
        median = statistics.median(x["stage_s"] for x in runs)
        ref = base["+busy" if name.endswith("+busy") else ""]
        result["rounds"][name] = {"stage_s_median": median, "stage_s_rounds": [x["stage_s"] for x in runs],
                                  "vs_alone": median / ref,
                                  "cpu_per_wall_median": statistics.median(x["cpu_per_wall"] for x in runs),
                                  "idle_cpu_per_wall_after_ort_run": {
                                      w: statistics.median(x["idle_cpu_per_wall"][w] for x in runs)
                                      for w in runs[0]["idle_cpu_per_wall"]},
                                  "loadavg_1m": [x["loadavg_1m"] for x in runs]}
    finish(result, args.out, started)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    print(json.dumps(_worker(json.loads(sys.argv[2]))))
elif __name__ == "__main__":
    main()
