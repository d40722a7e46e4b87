"""`repconv fold` and `export` (ONNX, or a TensorRT engine)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from repconv.cli import render
from repconv.cli.options import (
    ArchOpt,
    JsonOpt,
    MeanOpt,
    ModelArg,
    NumClassesOpt,
    RemapOpt,
    RemapRulesOpt,
    SizeOpt,
    StdOpt,
    TrustOpt,
)
from repconv.options import Dtype, Exporter, ExportFormat, OrtLevel


def fold(model: ModelArg,
         output: Annotated[Path, typer.Option("-o", "--output", help="output file: .safetensors (default) or .pt")],
         fuse_bn: Annotated[bool, typer.Option("--fuse-bn/--no-fuse-bn", help="also fuse conv + BatchNorm "
                                               "pairs (the file then needs repconv to load)")] = False,
         tolerance: Annotated[float, typer.Option("--tolerance", help="max relative difference converted vs "
                                                  "folded")] = 1e-5,
         arch: ArchOpt = None, num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False,
         remap: RemapOpt = None, remap_rules: RemapRulesOpt = None, as_json: JsonOpt = False) -> None:
    """Fold the replaced units' a*P_prev + b*P_next into ordinary weights (or bring a checkpoint in, remapped)."""
    from repconv import api

    with render.status("folding"):
        result = api.fold(model, output=output, fuse_bn=fuse_bn, tolerance=tolerance, arch=arch,
                          num_classes=num_classes, trust_pickle=trust_pickle, remap=remap, remap_rules=remap_rules)
    if as_json:
        render.emit_json(result.to_dict())
    else:
        render.folded(result, output)


def export(model: ModelArg,
           output: Annotated[Path, typer.Option("-o", "--output", help="output file (.onnx, or the engine)")],
           format: Annotated[ExportFormat, typer.Option("--format", help="onnx | engine (TensorRT, built from an "
                                                        "ONNX file)")] = "onnx",
           dtype: Annotated[Dtype, typer.Option("--dtype", help="fp32 | fp16 | int8")] = "fp32",
           opset: Annotated[int | None, typer.Option("--opset", help="default: the newest both onnxruntime and "
                                                     "the exporter support")] = None,
           static: Annotated[bool, typer.Option("--static", help="fixed batch (--batch-size) instead of a "
                                                "dynamic one")] = False,
           batch_size: Annotated[int, typer.Option("--batch-size", help="the batch of a --static export")] = 1,
           exporter: Annotated[Exporter, typer.Option("--exporter", help="dynamo (torch.export) | legacy "
                                                      "(TorchScript)")] = "dynamo",
           simplify: Annotated[bool, typer.Option("--simplify/--no-simplify", help="onnxslim graph "
                                                  "simplification")] = True,
           verify: Annotated[bool, typer.Option("--verify/--no-verify", help="compare onnxruntime with PyTorch "
                                                "(and fp16/int8 with fp32); fail above tolerance")] = True,
           fuse_bn: Annotated[bool, typer.Option("--fuse-bn/--no-fuse-bn", help="fuse conv + BN before "
                                                 "export")] = True,
           calib: Annotated[str | None, typer.Option("--calib", help="int8 calibration images: digits or an "
                                                     "image folder")] = None,
           calib_size: Annotated[int, typer.Option("--calib-size", help="calibration images to use")] = 256,
           check_images: Annotated[str | None, typer.Option("--check-images", help="real images the fp16/int8 "
                                                            "graph is checked on (default: --calib)")] = None,
           min_agreement: Annotated[float | None, typer.Option("--min-agreement", help="required top-1 "
                                                               "agreement with fp32 (fp16 0.99, int8 0.98)")] = None,
           ort_level: Annotated[OrtLevel, typer.Option("--ort-level", help="onnxruntime optimization level used "
                                                       "for checks: disable | basic | extended | all")] = "all",
           external_data: Annotated[bool, typer.Option("--external-data", help="weights in FILE.onnx.data beside "
                                                       "the graph (always when the graph is over 2 GiB)")] = False,
           min_batch: Annotated[int, typer.Option("--min-batch", help="engine profile: smallest batch")] = 1,
           opt_batch: Annotated[int, typer.Option("--opt-batch", help="engine profile: batch tuned for")] = 8,
           max_batch: Annotated[int, typer.Option("--max-batch", help="engine profile: largest batch")] = 32,
           workspace_mib: Annotated[int, typer.Option("--workspace", help="engine builder workspace limit, "
                                                      "MiB")] = 1024,
           timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="TensorRT timing cache file "
                                                             "(read if present, written after the build)")] = None,
           optimization_level: Annotated[int, typer.Option("--opt-level", help="TensorRT builder optimization "
                                                           "level 0..5")] = 3,
           print_trtexec: Annotated[bool, typer.Option("--print-trtexec", help="print the equivalent trtexec "
                                                       "command line instead of building")] = False,
           input_size: SizeOpt = None, mean: MeanOpt = None, std: StdOpt = None,
           arch: ArchOpt = None, num_classes: NumClassesOpt = None, trust_pickle: TrustOpt = False,
           as_json: JsonOpt = False) -> None:
    """Export a folded (or converted: folded first) model as a verified ONNX file, or a TensorRT engine."""
    from repconv import api
    from repconv.options import from_values

    values = {**locals(), "dynamic_batch": not static, "external_data": external_data or None}
    options = from_values(api.ExportOptions, values)
    load = dict(arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
    if format == "onnx":
        with render.status("exporting") as status:
            result = api.export(model, output, options=options, progress=status.update, input_size=input_size,
                                mean=mean, std=std, **load)
        if as_json:
            render.emit_json(result.to_dict())
        else:
            render.exported(result)
        return
    engine = from_values(api.EngineOptions, values)
    if print_trtexec:
        plan = api.engine_plan(model, output, engine, dtype=dtype, **load)
        if as_json:
            render.emit_json(plan.to_dict())
            return
        if plan.onnx_first:
            render.note(f"first write the ONNX: {plan.to_dict()['onnx_first']}")
        sys.stdout.write(plan.to_dict()["command"] + "\n")
        return
    with render.status("building the TensorRT engine"):
        build = api.build_engine(model, output, engine, export_options=options, **load)
    if as_json:
        render.emit_json(build.to_dict())
    else:
        render.engine(build)
