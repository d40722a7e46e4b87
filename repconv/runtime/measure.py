"""Measuring on this machine: peak memory, wall-time runs, and what the machine is (for every figure).

Linux keeps the process's peak RSS (VmHWM) and lets a process reset it (clear_refs "5", Linux >= 4.0):
exact and free, unlike a sampling thread, which would contend for the GIL with the model being timed.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repconv._version import __version__
from repconv.runtime.base import Session

# ---------------------------------------------------------------- memory


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
