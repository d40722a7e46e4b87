"""A run record (``run.json``) for a user's own artifacts, so that ``repconv report`` serves any pipeline, not
only the demo's: each artifact becomes a stage with its size, parameters, MACs, parity against the first
artifact, and, given labeled data, its accuracy; ``bench=True`` adds measured latency."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from repconv.convert.graph import example_input
from repconv.errors import OptionError
from repconv.onnx_graph import parity
from repconv.report import ParityRecord, RunRecord, Stage
from repconv.runtime.bench import bench as run_bench
from repconv.runtime.measure import machine_info
from repconv.runtime.session import open_session
from repconv.runtime.validate import validate

__all__ = ["record_run"]

_KINDS = {"model": "model", "converted": "converted", "folded": "folded", "onnx": "onnx", "engine": "onnx"}


def record_run(artifacts: Sequence[str | os.PathLike], out: str | os.PathLike, *, data: str | None = None,
               title: str | None = None, bench: bool = False, arch: str | None = None,
               num_classes: int | None = None, trust_pickle: bool = False,
               progress: Callable[[str], None] | None = None) -> Path:
    """Measure ``artifacts`` (the first is the reference) and write ``OUT/run.json``; returns its folder.

    Parity is measured on the same seeded random batch for every artifact (at the first one's input size);
    accuracy and agreement on ``data`` ("digits" or a labeled folder) when given; latency with ``bench``.
    """
    if not artifacts:
        raise OptionError("artifacts", None, "are missing", "give one or more model files")
    say = progress or (lambda _m: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = RunRecord(title=title or f"repconv report: {', '.join(Path(a).name for a in artifacts)}",
                    machine=machine_info("cpu"))
    load = dict(arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
    accuracy: list[float | None] = [None] * len(artifacts)
    if data is not None:
        say(f"validating {len(artifacts)} artifacts on {data}")
        result = validate(artifacts, data=data, **load)
        accuracy = [s.top1 for s in result.scores]
        run.data = {"name": str(data), "split": result.split, "images": result.samples}
    reference = None
    for path, acc in zip(map(Path, artifacts), accuracy, strict=True):
        say(f"measuring {path.name}")
        start = time.perf_counter()
        with open_session(path, **load) as session:
            x = example_input(session.input_size, batch=2, seed=1)
            logits = session.run(x)
            checks = []
            if reference is None:  # the first artifact is the reference of every parity
                reference = logits
            elif reference.shape == logits.shape:
                p = parity(reference, logits)
                checks.append(ParityRecord(Path(artifacts[0]).name, p.max_abs, p.max_rel, p.top1_agreement,
                                           "2 random inputs, seed 1"))
            info = session.info
            run.add(Stage(path.stem, _KINDS.get(info.kind, "model"), None, str(path.resolve()),
                          sum(f.stat().st_size for f in session.files()), acc,
                          session.count_params(), None, session.count_macs(), checks,
                          time.perf_counter() - start))
    if bench:
        say("benchmarking")
        run.bench = run_bench(artifacts, json_out=out / "bench.json", progress=say, **load).to_dict()
    run.save(out)
    return out
