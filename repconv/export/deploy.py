"""The export stage: a checkpoint (converted ones are folded first) to a verified ONNX file or TensorRT engine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from repconv.artifact import ArtifactInfo
from repconv.checkpoint import Loaded, ModelLike, load_checkpoint
from repconv.conversion import Conversion, as_loaded, fold
from repconv.convert.replacement import replaced_units
from repconv.errors import OptionError
from repconv.export.engine import require_tensorrt
from repconv.export.onnx import ExportOptions, ExportResult, check_options, export_onnx
from repconv.export.tensorrt import EngineBuild, EngineOptions, format_command, profile_shapes, trtexec_command
from repconv.export.tensorrt import build_engine as _build_engine
from repconv.io import artifact_backend
from repconv.onnx_graph import read_onnx
from repconv.options import ExportFormat, check_choice, with_overrides

__all__ = ["EnginePlan", "build_engine", "engine_plan", "export"]


def export(model: ModelLike | Conversion, output: str | os.PathLike, *, format: ExportFormat = "onnx",
           arch: str | None = None, num_classes: int | None = None, trust_pickle: bool = False,
           input_size=None, mean=None, std=None, options: ExportOptions | None = None, progress=None,
           **overrides) -> ExportResult:
    """Export a checkpoint (path, module, Loaded or Conversion) as a verified ONNX file.

    A converted model is folded first (its fold parity is checked as in :func:`repconv.fold`). ``options``
    (or keyword overrides of its fields: ``dtype``, ``opset``, ``dynamic_batch``, ``exporter``, ``calib``, ...;
    see :class:`~repconv.export.onnx.ExportOptions`) say how. Engines: :func:`build_engine`.
    ``input_size`` / ``mean`` / ``std`` override the preprocessing written into the ONNX metadata.
    """
    check_choice("format", format, ExportFormat)
    if format != "onnx":
        raise OptionError("format", format, "is built by build_engine, not export", "call repconv.build_engine")
    o = with_overrides(ExportOptions, options, overrides)
    check_options(output, o)  # fail fast, before loading and folding
    loaded = as_loaded(model, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
    if replaced_units(loaded.model) or loaded.meta.kind == "converted":
        folded = fold(loaded)
        loaded = Loaded(folded.model, folded.meta, loaded.path)
    return export_onnx(loaded.model, output, meta=loaded.meta.with_input(input_size, mean, std), options=o,
                       progress=progress)


@dataclass
class EnginePlan:
    """What a TensorRT build of ``source`` would do: shapes, and the equivalent trtexec command."""

    source: Path
    onnx: Path
    engine: Path
    shapes: dict[str, dict[str, list[int]]]
    dynamic: bool
    trtexec: list[str]
    onnx_first: list[str] | None = None  # the repconv command that writes the ONNX, when source is a checkpoint

    def to_dict(self) -> dict:
        return {"source": str(self.source), "onnx": str(self.onnx), "engine": str(self.engine),
                "shapes": self.shapes, "dynamic": self.dynamic, "trtexec": self.trtexec,
                "command": format_command(self.trtexec),
                "onnx_first": format_command(self.onnx_first) if self.onnx_first else None}


def engine_plan(source: str | os.PathLike, output: str | os.PathLike, options: EngineOptions | None = None, *,
                dtype: str = "fp32", arch: str | None = None, num_classes: int | None = None,
                trust_pickle: bool = False) -> EnginePlan:
    """The engine build for ``source`` (an ONNX file, or a checkpoint to export first) without TensorRT."""
    options = options or EngineOptions()
    options.validate()
    source, output = Path(source), Path(output)
    if source.is_file() and artifact_backend(source) == "ort":
        graph = read_onnx(source)
        shapes, dynamic, onnx_path, first = profile_shapes(graph, options), graph.dynamic, source, None
    else:
        loaded = load_checkpoint(source, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
        size = list(ArtifactInfo.from_checkpoint(loaded.meta).input_size)
        shapes = {"input": {"min": [options.min_batch, *size], "opt": [options.opt_batch, *size],
                            "max": [options.max_batch, *size]}}
        dynamic, onnx_path = True, output.with_suffix(".onnx")
        first = ["repconv", "export", str(source), "--format", "onnx", "--dtype", dtype, "-o", str(onnx_path)]
        if arch:
            first[3:3] = ["--arch", arch]
    return EnginePlan(source, onnx_path, output, shapes, dynamic,
                      trtexec_command(onnx_path, output, shapes, options, dynamic), first)


def build_engine(source: str | os.PathLike, output: str | os.PathLike, options: EngineOptions | None = None, *,
                 arch: str | None = None, num_classes: int | None = None, trust_pickle: bool = False,
                 export_options: ExportOptions | None = None, **overrides) -> EngineBuild:
    """Build a TensorRT engine (+ JSON sidecar) and verify it against ONNX Runtime.

    ``source`` is an ONNX file, or a checkpoint that is first exported (:func:`export` with ``export_options``
    or keyword overrides of them, e.g. ``dtype``) to ``output`` with the suffix ``.onnx``. Needs TensorRT and
    an NVIDIA GPU; without them a DependencyError says how to get them, before anything is written.
    """
    require_tensorrt("building a TensorRT engine")
    if not (Path(source).is_file() and artifact_backend(source) == "ort"):
        onnx_path = Path(output).with_suffix(".onnx")
        export(source, onnx_path, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle,
               options=with_overrides(ExportOptions, export_options, overrides))
        source = onnx_path
    return _build_engine(source, output, options)
