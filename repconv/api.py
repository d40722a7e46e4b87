"""The public Python API: one function per pipeline stage, re-exported from the module that holds it.

Each function takes paths or modules and an options dataclass (or keyword overrides of its fields) and
returns a dataclass; nothing here prints. docs/architecture.md shows where each stage lives.
"""

from repconv.checkpoint import CheckpointMeta, Loaded, load, load_checkpoint, save
from repconv.conversion import (
    Conversion,
    ConversionSummary,
    ConvertOptions,
    FoldResult,
    check_round_trip,
    convert,
    fold,
    inspect,
    measured_units,
    parameter_free_report,
    summarize,
)
from repconv.demo import DemoResult, demo
from repconv.export.deploy import EnginePlan, build_engine, engine_plan, export
from repconv.export.onnx import ExportOptions, ExportResult
from repconv.export.tensorrt import EngineBuild, EngineOptions
from repconv.models import list_models, register_model, resolve_arch
from repconv.report import ReportResult, report
from repconv.runtime.base import Session
from repconv.runtime.bench import BenchOptions, BenchReport, bench
from repconv.runtime.predict import PredictResult, predict
from repconv.runtime.record import record_run
from repconv.runtime.session import open_session
from repconv.runtime.validate import ValidateResult, validate
from repconv.search.run import SearchOptions, SearchResult, search
from repconv.search.table import CandidateTable, load_table
from repconv.train.local import LocalOptions, LocalResult, local_distill
from repconv.train.loop import TrainConfig
from repconv.train.recover import (
    CalibrateOptions,
    CalibrationResult,
    FinetuneResult,
    TrainResult,
    calibrate,
    finetune,
    train,
)

__all__ = [
    "BenchOptions", "BenchReport", "CalibrateOptions", "CalibrationResult", "CandidateTable", "CheckpointMeta",
    "Conversion", "ConversionSummary", "ConvertOptions", "DemoResult", "EngineBuild", "EngineOptions", "EnginePlan",
    "ExportOptions", "ExportResult", "FinetuneResult", "FoldResult", "Loaded", "LocalOptions", "LocalResult",
    "PredictResult",
    "ReportResult", "SearchOptions", "SearchResult", "Session", "TrainConfig", "TrainResult", "ValidateResult",
    "bench", "build_engine", "calibrate", "check_round_trip", "convert", "demo", "engine_plan", "export", "finetune",
    "fold", "inspect", "list_models", "load", "load_checkpoint", "load_table", "local_distill", "measured_units",
    "open_session",
    "parameter_free_report", "predict", "record_run", "register_model", "report", "resolve_arch", "save", "search",
    "summarize", "train", "validate",
]
