"""Side-by-side latency of artifacts on one machine, in one process, on the same inputs.

Each target (an artifact on one backend) is opened, warmed up and timed at every batch size, one after
another; the first target is the baseline of the speed-up ratios. Peak memory is the process RSS
(the kernel's high-water mark, reset before each target) while the target loads and runs, minus the RSS
before it loaded (and, on CUDA, torch's peak allocation). The JSON report follows ``bench.schema.json``
beside this module.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repconv._version import __version__
from repconv.convert.graph import example_input
from repconv.errors import InputFileError, OptionError
from repconv.export.deploy import build_engine, export
from repconv.export.engine import require_tensorrt
from repconv.io import artifact_backend, atomic_path, check_output_path, write_text_atomic
from repconv.onnx_graph import parity
from repconv.options import Backend, check_choice, with_overrides
from repconv.runtime.base import Session
from repconv.runtime.measure import (
    machine_info,
    peak_rss_bytes,
    release_free_memory,
    reset_peak_rss,
    rss_bytes,
    time_runs,
)
from repconv.runtime.session import open_session

__all__ = ["BenchOptions", "BenchReport", "bench"]

SCHEMA_PATH = Path(__file__).with_name("bench.schema.json")
SCHEMA_VERSION = 1


@dataclass
class BenchOptions:
    batches: tuple[int, ...] = (1, 8, 32)
    size: int | None = None  # image side; default: the first target's input size
    warmup: int = 3
    repeats: int = 20
    max_seconds: float = 10.0  # per (target, batch); at least 3 timed runs are always made
    device: str | None = None
    threads: int | None = None
    channels_last: bool = False  # torch targets run in channels_last memory format

    def validate(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise OptionError("batches", list(self.batches), "must be positive", "e.g. 1,8,32")
        if self.size is not None and self.size < 8:
            raise OptionError("size", self.size, "is too small", "give the image side in pixels, e.g. 224")
        if self.warmup < 0:
            raise OptionError("warmup", self.warmup, "must not be negative", "e.g. 3")
        if self.repeats < 1:
            raise OptionError("repeats", self.repeats, "must be at least 1", "e.g. 20")


@dataclass
class Target:
    """One artifact on one backend; ``opener`` loads it (so loading is measured like running)."""

    label: str
    path: Path
    backend: str
    opener: Callable[[], Session]


@dataclass
class Timing:
    batch: int
    latencies_ms: list[float]
    median_ms: float
    p90_ms: float
    mean_ms: float
    throughput: float  # images / s at the median latency
    speedup: float | None = None  # baseline median / this median, same batch

    @classmethod
    def of(cls, batch: int, latencies_ms: list[float]) -> Timing:
        arr = np.asarray(latencies_ms)
        median = float(np.median(arr))
        return cls(batch, [round(v, 4) for v in latencies_ms], median, float(np.percentile(arr, 90)),
                    float(arr.mean()), batch / (median / 1e3))


@dataclass
class TargetResult:
    label: str
    path: str
    backend: str
    device: str
    dtype: str
    input_size: list[int]
    params: int | None
    macs: int | None
    file_bytes: int
    load_seconds: float
    peak_memory_bytes: int  # RSS peak while loading + running, minus RSS before loading
    peak_rss_bytes: int
    cuda_peak_bytes: int | None
    timings: list[Timing]
    skipped: dict[str, str] = field(default_factory=dict)  # batch -> why it was not run
    max_abs_diff_vs_baseline: float | None = None
    top1_agreement_vs_baseline: float | None = None


@dataclass
class BenchReport:
    targets: list[TargetResult]
    machine: dict[str, Any]
    options: dict[str, Any]
    baseline: str
    created: str
    schema_version: int = SCHEMA_VERSION
    repconv_version: str = __version__

    def to_dict(self) -> dict:
        return asdict(self)


InputsFor = Callable[[Session], dict[int, np.ndarray]]
Progress = Callable[[str], None]  # called before each (target, batch) measurement: "[3/6] name [ort] batch 8"


def bench_target(target: Target, inputs_for: InputsFor, options: BenchOptions,
                 progress: Callable[[str], None] | None = None) -> tuple[TargetResult, np.ndarray | None]:
    """Load and time one target at every batch size; also return its logits on the first batch."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    release_free_memory()
    reset_peak_rss()
    before = rss_bytes()
    t0 = time.perf_counter()
    session = target.opener()
    load_seconds = time.perf_counter() - t0
    timings, skipped, first = [], {}, None
    for batch, x in inputs_for(session).items():
        if progress:
            progress(f"{target.label} [{target.backend}] batch {batch}")
        if not session.accepts_batch(batch):
            lo, hi = session.batch_limits()
            skipped[str(batch)] = f"the artifact takes batches {lo}..{hi if hi else 'any'}"
            continue
        if tuple(session.input_size[1:]) != tuple(x.shape[2:]) and session.backend != "torch":
            skipped[str(batch)] = f"the artifact takes {session.input_size[1]}x{session.input_size[2]} images"
            continue
        if first is None:
            first = session.run(x)
        timings.append(Timing.of(batch, time_runs(session, x, options.warmup, options.repeats,
                                                  options.max_seconds)))
    peak = peak_rss_bytes()
    result = TargetResult(
        label=target.label, path=str(target.path), backend=session.backend, device=session.device,
        dtype=session.info.dtype, input_size=list(session.input_size), params=session.count_params(),
        macs=session.count_macs(), file_bytes=sum(f.stat().st_size for f in session.files()), load_seconds=load_seconds,
        peak_memory_bytes=max(0, peak - before), peak_rss_bytes=peak,
        cuda_peak_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        timings=timings, skipped=skipped)
    session.close()
    return result, first


def run_bench(targets: Sequence[Target], options: BenchOptions, progress: Progress | None = None) -> BenchReport:
    """Measure every target on the same seeded inputs; the first target is the baseline.

    The image size is ``options.size`` or, by default, the first target's input size.
    """
    options.validate()
    inputs: dict[int, np.ndarray] = {}

    def inputs_for(session: Session) -> dict[int, np.ndarray]:
        if not inputs:
            h, w = (options.size, options.size) if options.size else session.input_size[1:]
            inputs.update({b: example_input((3, h, w), batch=b, seed=0).numpy() for b in options.batches})
        return inputs

    total, done = len(targets) * len(options.batches), [0]

    def step(message: str) -> None:
        done[0] += 1
        if progress:
            progress(f"[{done[0]}/{total}] {message}")

    results: list[TargetResult] = []
    reference = None
    for target in targets:
        result, logits = bench_target(target, inputs_for, options, step)
        if reference is None:
            reference = logits
        elif logits is not None and reference is not None and logits.shape == reference.shape:
            p = parity(reference, logits)
            result.max_abs_diff_vs_baseline, result.top1_agreement_vs_baseline = p.max_abs, p.top1_agreement
        results.append(result)
    _add_speedups(results)
    device = results[0].device if results else "cpu"
    size = int(next(iter(inputs.values())).shape[-1]) if inputs else (options.size or 0)
    return BenchReport(results, machine_info(device), {**asdict(options), "size": size,
                                                       "batches": list(options.batches)},
                       baseline=results[0].label if results else "",
                       created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def _add_speedups(results: list[TargetResult]) -> None:
    if not results:
        return
    base = {t.batch: t.median_ms for t in results[0].timings}
    for r in results:
        for t in r.timings:
            t.speedup = base[t.batch] / t.median_ms if t.batch in base and t.median_ms > 0 else None


# ---------------------------------------------------------------- schema, plot


def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def validate_report(data: dict) -> None:
    """Raise jsonschema.ValidationError when ``data`` does not follow the documented schema."""
    import jsonschema

    jsonschema.validate(data, schema())


def plot_report(report: BenchReport, path: Path) -> None:
    """Median latency and throughput per batch size, one line per target (PNG, SVG or PDF by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in report.targets:
        if not r.timings:
            continue
        b = [t.batch for t in r.timings]
        label = f"{r.label} [{r.backend}]"
        ax_lat.errorbar(b, [t.median_ms for t in r.timings], yerr=[[0] * len(b),
                        [t.p90_ms - t.median_ms for t in r.timings]], marker="o", capsize=3, label=label)
        ax_tp.plot(b, [t.throughput for t in r.timings], marker="o", label=label)
    batches = sorted({t.batch for r in report.targets for t in r.timings})
    ax_lat.set_yscale("log")
    for ax, title, unit in ((ax_lat, "latency (median, bar to p90)", "ms"), (ax_tp, "throughput", "images / s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_lat.legend(fontsize=8)
    m = report.machine
    fig.suptitle(f"repconv bench: {m['cpu']} ({m['torch_threads']} threads), {m['device']}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower(), dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- the bench stage

_DERIVED = {("torch", "ort"), ("torch", "trt"), ("ort", "trt")}  # (artifact's backend, backend it can run on)


def bench(artifacts: Sequence[str | os.PathLike], *, backends: Sequence[Backend] | None = None,
          arch: str | None = None, num_classes: int | None = None, trust_pickle: bool = False,
          json_out: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
          progress: Progress | None = None, options: BenchOptions | None = None, **overrides) -> BenchReport:
    """Measure artifacts side by side in this process; the first one is the baseline of every ratio.

    ``options`` (or keyword overrides: ``batches``, ``size``, ``device``, ``warmup``, ``repeats``,
    ``max_seconds``, ``threads``, ``channels_last``). Each artifact runs on every backend in ``backends``
    that can run it, by default on its own: a checkpoint on torch, and on ort / trt through a temporary
    export; an ONNX file on ort, and on trt through a temporary engine; an engine on trt. ``json_out`` /
    ``plot`` are written at the end (their folders are checked first).
    """
    if "batches" in overrides:
        overrides["batches"] = tuple(overrides["batches"])
    o = with_overrides(BenchOptions, options, overrides)
    o.validate()
    if not artifacts:
        raise OptionError("artifacts", None, "are missing", "give one or more checkpoints, .onnx or .engine files")
    for target in (json_out, plot):
        if target is not None:
            check_output_path(target)
    if plot is not None and Path(plot).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise OptionError("plot", str(plot), "has no image suffix", "end it with .png, .svg or .pdf")
    for b in backends or ():
        check_choice("backends", b, Backend)
    previous_threads = torch.get_num_threads()
    if o.threads:
        torch.set_num_threads(o.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="repconv-bench-") as scratch:
            targets = [t for a in artifacts for t in _targets(Path(a), Path(scratch), o, backends, arch, num_classes,
                                                               trust_pickle)]
            report = run_bench(targets, o, progress)
    finally:
        torch.set_num_threads(previous_threads)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(report.to_dict(), indent=2) + "\n")
    if plot is not None:
        plot_report(report, Path(plot))
    return report


def _targets(path: Path, scratch: Path, o: BenchOptions, backends, arch, num_classes, trust_pickle) -> list[Target]:
    """The targets of one artifact: one per backend that runs it (exporting it or building an engine first)."""
    if not path.is_file():
        raise InputFileError(f"'{path}' does not exist or is not a file", "check the artifact paths")
    natural = artifact_backend(path)
    chosen = [b for b in (backends or [natural]) if b == natural or (natural, b) in _DERIVED]
    if "trt" in chosen:  # refuse now, not after measuring the artifacts before this one
        require_tensorrt(f"benchmarking '{path.name}' with TensorRT")
    if not chosen:
        raise OptionError("backends", list(backends), f"leaves out '{path}', a TensorRT engine", "add trt")
    targets = []
    for b in chosen:
        run_path, label = path, path.name
        if natural == "torch" and b != "torch":  # export it, as `repconv export` would
            run_path, label = scratch / f"{path.stem}.onnx", f"{path.name} -> onnx"
            if not run_path.exists():
                export(path, run_path, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
        if b == "trt" and natural != "trt":
            run_path = build_engine(run_path, scratch / f"{path.stem}.engine").engine
            label = f"{path.name} -> engine"
        targets.append(Target(label, run_path, b, _opener(run_path, b, o, arch, num_classes, trust_pickle)))
    return targets


def _opener(path: Path, backend: str, o: BenchOptions, arch, num_classes, trust_pickle) -> Callable[[], Session]:
    return lambda: open_session(path, backend if backend != "torch" else None, o.device, arch=arch,
                                num_classes=num_classes, trust_pickle=trust_pickle, threads=o.threads,
                                channels_last=o.channels_last and backend == "torch")
