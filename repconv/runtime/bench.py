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
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repconv import __version__
from repconv.convert.graph import example_input
from repconv.errors import OptionError
from repconv.runtime.session import Session

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
            raise OptionError(f"batch sizes {list(self.batches)} must be positive", "e.g. --batch 1,8,32")
        if self.size is not None and self.size < 8:
            raise OptionError(f"--size {self.size} is too small", "give the image side in pixels, e.g. 224")
        if self.warmup < 0 or self.repeats < 1:
            raise OptionError("--warmup must be >= 0 and --repeats >= 1", "e.g. --warmup 3 --repeats 20")


def parse_batches(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> (1, 8, 32); anything else is an OptionError."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise OptionError(f"--batch '{text}' does not parse as a list of positive integers",
                          "write it like --batch 1,8,32")
    return tuple(dict.fromkeys(values))


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


# ---------------------------------------------------------------- memory
# Linux keeps the process's peak RSS (VmHWM) and lets a process reset it (clear_refs "5", Linux >= 4.0):
# exact and free, unlike a sampling thread, which would contend for the GIL with the model being timed.


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _status_bytes(field_name: str) -> int:
    kib = _status_kib(field_name)
    if kib is None:  # not Linux: the lifetime high-water mark is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def release_free_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc ``malloc_trim``).

    Without it, memory freed by one target stays in the process's RSS and the next target's "peak minus
    RSS before" reads low: ONNX Runtime's resnet50 measured 443 MB first and 134 MB after another target.
    """
    import contextlib
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset (or, where resets are impossible, since the process started)."""
    return _status_bytes("VmHWM")


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    import onnxruntime

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "onnxruntime": onnxruntime.__version__, "repconv": __version__}
    for name in ("onnx", "torchvision", "tensorrt"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, OSError, AttributeError):
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg")
            else None, "gpu": gpu, "cuda": torch.version.cuda, "device": device, "versions": versions}


# ---------------------------------------------------------------- measuring


def time_runs(session: Session, x: np.ndarray, warmup: int, repeats: int, max_seconds: float) -> list[float]:
    for _ in range(warmup):
        session.run(x)
    latencies: list[float] = []
    start = time.perf_counter()
    while len(latencies) < repeats and (len(latencies) < 3 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        session.run(x)
        latencies.append((time.perf_counter() - t0) * 1e3)
    return latencies


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
            result.max_abs_diff_vs_baseline = float(np.abs(logits - reference).max())
            result.top1_agreement_vs_baseline = float((logits.argmax(1) == reference.argmax(1)).mean())
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

    from repconv.checkpoint import atomic_path

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
