"""Latency on a deployment target: each candidate's change to its unit's time, and whole models, timed
interleaved (every model of a group once per round, in rotated order) so that all figures of one group are
taken under the same load.

Targets: ``ort-cpu`` (ONNX Runtime, CPU provider, all graph optimizations), ``ort-cuda`` (CUDA provider),
``tensorrt`` (ONNX Runtime's TensorRT provider), ``torch-nchw`` and ``torch-channels-last`` (torch eager,
batch norms folded; ``device="cuda"`` runs them on the GPU). A unit's change is measured on the unit alone,
exported (or run) with the input shape it gets inside the model: ``time(candidate) - time(kept unit)``.
Whole-model latency is not exactly the sum (ONNX Runtime fuses and re-lays out across units), so the
assembled model is measured too and reported beside the prediction. ONNX Runtime sessions come from
:func:`repconv.onnx_graph.ort_session` with the target's execution provider.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from repconv.errors import DependencyError, OptionError
from repconv.onnx_graph import ort_session

TARGETS = ("ort-cpu", "ort-cuda", "tensorrt", "torch-nchw", "torch-channels-last")
_PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
              "tensorrt": "TensorrtExecutionProvider"}


def check_target(target: str, device: str = "cpu") -> None:
    """Raise when ``target`` is unknown or its backend is not installed here."""
    if target not in TARGETS:
        raise OptionError("target", target, "is not a known target", f"use one of {', '.join(TARGETS)}")
    if target in _PROVIDERS:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise DependencyError(f"{{option}} {target} needs onnxruntime, which is not installed",
                                  "pip install onnxruntime (or onnxruntime-gpu)", option="target") from exc
        if _PROVIDERS[target] not in ort.get_available_providers():
            raise DependencyError(f"{{option}} {target} needs ONNX Runtime's {_PROVIDERS[target]}, which this "
                                  f"onnxruntime does not have (available: {', '.join(ort.get_available_providers())})",
                                  "install onnxruntime-gpu (and TensorRT for the tensorrt target), or use the target "
                                  "ort-cpu", option="target")
    if device == "cuda" and not torch.cuda.is_available():
        raise DependencyError("the cuda device was asked for but torch sees no CUDA device", "use the cpu device")


def export_onnx_file(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Plain fp32 ONNX of ``model`` (legacy TorchScript exporter: fast for small graphs)."""
    model = copy.deepcopy(model).cpu().eval()  # a candidate trained on the GPU is exported from the CPU
    with torch.no_grad():
        torch.onnx.export(model, (example.cpu(),), str(path), dynamo=False, input_names=["input"],
                          output_names=["output"], opset_version=17, do_constant_folding=True)
    return path


def runner(target: str, model: nn.Module, example: torch.Tensor, *, tmp: Path, name: str, threads: int = 2,
           device: str = "cpu") -> Callable[[], None]:
    """A zero-argument function that runs ``model`` once on ``example`` on ``target``."""
    if target in _PROVIDERS:
        path = export_onnx_file(model, example, tmp / f"{name}.onnx")
        # ONNX Runtime's defaults otherwise: worker threads spin within a run (as bench's sessions), not after it
        # (several sessions are timed in turn), the target's provider alone
        session = ort_session(path, "all", threads=threads, spinning="in-runs", providers=[_PROVIDERS[target]])
        feed = {"input": example.numpy()}
        return lambda: session.run(None, feed)
    from repconv.convert.fold import fuse_conv_bn

    try:
        folded, _ = fuse_conv_bn(copy.deepcopy(model).eval())
    except Exception:  # a unit fx cannot trace alone is timed unfolded
        folded = copy.deepcopy(model).eval()
    folded = folded.to(device)
    x = example.to(device)
    if target == "torch-channels-last":
        folded, x = folded.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.no_grad():
            folded(x)
        sync()

    return run


def time_interleaved(runners: dict[str, Callable[[], None]], *, rounds: int = 5, block: int = 10,
                     warmup: int = 2) -> dict[str, float]:
    """Median ms per run of each runner; each round times every runner for ``block`` runs, order rotated."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = runners[name]
            for _ in range(warmup):
                fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_models(models: dict[str, nn.Module], example: torch.Tensor, target: str, *, threads: int = 2,
                   device: str = "cpu", rounds: int = 5, block: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median latency (ms) of whole models on ``target``, timed interleaved."""
    check_target(target, device)
    with tempfile.TemporaryDirectory(prefix="repconv-latency-") as tmp:
        runs = {k: runner(target, m, example, tmp=Path(tmp), name=f"m{i}", threads=threads, device=device)
                for i, (k, m) in enumerate(models.items())}
        return time_interleaved(runs, rounds=rounds, block=block, warmup=warmup)


def unit_inputs(model: nn.Module, units: list[str], example: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each unit's input tensor when ``model`` runs on ``example``."""
    from repconv.train.local import _Capture

    capture = _Capture(model, units)
    try:
        capture.run(model.eval(), example)
    finally:
        capture.close()
    return {u: capture.inputs[u][0] for u in units}


def measure_unit_deltas(teacher: nn.Module, views: dict[str, dict[str, nn.Module]], example: torch.Tensor,
                        target: str, *, threads: int = 2, device: str = "cpu", rounds: int = 5, block: int = 10,
                        warmup: int = 2, progress: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """``views[unit][candidate]`` -> ms change of that unit on ``target`` (candidate minus the kept unit)."""
    check_target(target, device)
    inputs = unit_inputs(teacher, list(views), example)
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="repconv-latency-") as tmp:
        for i, (unit, cands) in enumerate(views.items()):
            if progress:
                progress(f"latency {i + 1}/{len(views)}: {unit}")
            x = inputs[unit]
            group = {"keep": runner(target, teacher.get_submodule(unit), x, tmp=Path(tmp), name=f"u{i}_keep",
                                    threads=threads, device=device)}
            for j, (name, view) in enumerate(cands.items()):
                if name == "replace":  # folds back to the original unit: no change at inference
                    continue
                group[name] = runner(target, view, x, tmp=Path(tmp), name=f"u{i}_{j}", threads=threads, device=device)
            med = time_interleaved(group, rounds=rounds, block=block, warmup=warmup)
            out[unit] = {name: med[name] - med["keep"] if name in med else 0.0 for name in cands}
            out[unit]["keep_ms"] = med["keep"]
    return out
