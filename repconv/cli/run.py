"""`repconv predict`, `validate` and `bench`: running artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from repconv.cli import render, render_run
from repconv.cli.options import ArchOpt, BackendOpt, DeviceOpt, JsonOpt, NumClassesOpt, TrustOpt, parse_ints


def predict(artifact: Annotated[Path, typer.Argument(help="checkpoint, .onnx or .engine")],
            images: Annotated[list[Path], typer.Argument(help="image files or folders of images")],
            top_k: Annotated[int, typer.Option("--top-k", help="classes shown per image")] = 5,
            backend: BackendOpt = None, device: DeviceOpt = None, arch: ArchOpt = None,
            num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False, as_json: JsonOpt = False) -> None:
    """Top-k classes per image with any checkpoint, ONNX file or TensorRT engine."""
    from repconv import api

    result = api.predict(artifact, images, top_k=top_k, backend=backend, device=device, arch=arch,
                         num_classes=num_classes, trust_pickle=trust_pickle)
    for warning in result.warnings:
        render.warn(warning)
    if as_json:
        render.emit_json(result.to_dict())
    else:
        render_run.predictions(result, artifact)


def validate(artifacts: Annotated[list[Path], typer.Argument(help="checkpoints, .onnx files and .engine files")],
             data: Annotated[str, typer.Option("--data", help="'digits' (bundled) or a labeled folder ROOT/CLASS/*.jpg "
                                               "(ROOT/val when present)")] = "digits",
             batch_size: Annotated[int, typer.Option("--batch-size")] = 64,
             limit: Annotated[int | None, typer.Option("--limit", help="use this many samples, spread over the "
                                                       "data")] = None,
             per_class: Annotated[bool, typer.Option("--per-class", help="also show the accuracy per class")] = False,
             backend: BackendOpt = None, device: DeviceOpt = None,
             threads: Annotated[int | None, typer.Option("--threads", help="CPU threads")] = None,
             arch: ArchOpt = None, num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False,
             as_json: JsonOpt = False) -> None:
    """Top-1 / top-5 and per-class accuracy of artifacts on labeled data, and their agreement, side by side."""
    from repconv import api

    with render.status("validating") as status:
        result = api.validate(artifacts, data=data, batch_size=batch_size, backend=backend, device=device, arch=arch,
                              num_classes=num_classes, trust_pickle=trust_pickle, threads=threads, limit=limit,
                              progress=status.update)
    for warning in result.warnings:
        render.warn(warning)
    if as_json:
        render.emit_json(result.to_dict())
    else:
        render_run.validation(result, per_class)


def bench(artifacts: Annotated[list[Path], typer.Argument(help="checkpoints, .onnx files and .engine files; "
                                                          "the first is the baseline")],
          batches: Annotated[str, typer.Option("--batch", help="batch sizes, comma-separated")] = "1,8,32",
          size: Annotated[int | None, typer.Option("--size", help="image side (default: the first artifact's "
                                                   "input size)")] = None,
          backends: Annotated[str | None, typer.Option("--backend", help="backends to run each artifact on, "
                                                       "comma-separated: torch,ort,trt (default: its own)")] = None,
          device: DeviceOpt = None,
          warmup: Annotated[int, typer.Option("--warmup", help="untimed runs first")] = 3,
          repeats: Annotated[int, typer.Option("--repeats", help="timed runs per batch size")] = 20,
          max_seconds: Annotated[float, typer.Option("--max-seconds", help="time budget per artifact and "
                                                     "batch size (at least 3 runs)")] = 10.0,
          threads: Annotated[int | None, typer.Option("--threads", help="CPU threads (torch and ONNX "
                                                      "Runtime alike)")] = None,
          channels_last: Annotated[bool, typer.Option("--channels-last", help="run PyTorch checkpoints in "
                                                      "channels_last memory format (faster max-pool on CPU)")] = False,
          arch: ArchOpt = None, num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False,
          json_out: Annotated[Path | None, typer.Option("--json-out", help="also write the full JSON report "
                                                        "to this file")] = None,
          plot: Annotated[Path | None, typer.Option("--plot", help="write a latency/throughput plot "
                                                    "(.png, .svg or .pdf)")] = None,
          as_json: JsonOpt = False) -> None:
    """Latency, throughput, size and memory of artifacts side by side, in one process, on the same inputs."""
    from repconv import api
    from repconv.options import from_values

    values = {**locals(), "batches": parse_ints(batches, "batches", "1,8,32")}
    names = [b.strip() for b in backends.split(",") if b.strip()] if backends else None
    with render.status("bench") as status:
        report = api.bench(artifacts, backends=names, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle,
                           json_out=json_out, plot=plot, progress=status.update,
                           options=from_values(api.BenchOptions, values))
    if as_json:
        render.emit_json(report.to_dict())
    else:
        render_run.bench(report)
    for path, what in ((json_out, "JSON report"), (plot, "plot")):
        if path is not None:
            render.note(f"{what} -> {path}")
