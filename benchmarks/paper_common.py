"""What the paper_*.py benchmarks share: machine description, summary statistics, fresh-process runs, JSON output.

The scripts run as ``python benchmarks/paper_X.py`` (this folder is then on ``sys.path``), so they import this
module and the older benchmarks (``parameter_free_latency``, ``int8_latency``, ``finetune_memory``) by name.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from repconv.io import write_text_atomic
from repconv.runtime.measure import cpu_model

err = Console(stderr=True)


def machine(threads: int) -> dict:
    """The machine and library versions a result was measured with, and how busy the machine was."""
    import numpy
    import onnx
    import onnxruntime
    import torch
    import torchvision

    return {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "threads": threads, "loadavg_1m_at_start": os.getloadavg()[0],
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "platform": platform.platform()}


def finish(result: dict, out: Path, started: float) -> None:
    """Record the wall time and end-of-run load, then write ``out`` atomically."""
    result["machine"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    partial_path(out).unlink(missing_ok=True)
    err.print(f"wrote {out} ({result['wall_s']:.0f} s)")


def partial_path(out: Path) -> Path:
    return out.with_suffix(".partial.json")


def save_partial(result: dict, out: Path) -> None:
    """What a long run has so far, beside ``out`` (removed by :func:`finish`)."""
    write_text_atomic(partial_path(out), json.dumps(result, indent=2) + "\n")


def mean_std(values: Sequence[float]) -> dict:
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def run_fresh(script: str, payload: dict) -> dict:
    """Run ``script --worker JSON`` in a fresh Python process (own peak-RSS counter) and parse its last line."""
    cmd = [sys.executable, script, "--worker", json.dumps(payload)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode:
        raise RuntimeError(f"worker failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

