"""The candidate table: every unit's candidates with two measured figures each (accuracy damage in points of
agreement with the original, latency change in ms on the target), cached as JSON keyed by a digest of the
model's weights, the images used, the target and the settings, so that a new budget is only a new solve."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from repconv.errors import InputFileError
from repconv.search.candidates import KEEP, Candidate, UnitCandidates

TABLE_VERSION = 2  # 2: latency timed with sessions spinning only within runs (onnx_graph.ort_session "in-runs")


@dataclass
class Figures:
    """What one candidate costs and gains, measured with only its unit converted (and locally distilled)."""

    damage: float = 0.0  # accuracy points lost: 100 * (1 - top-1 agreement with the original) on held-out images
    kl: float = 0.0  # KL(original || candidate) of the logits on the same images
    latency_delta_ms: float = 0.0  # candidate unit minus kept unit, on the target (negative: faster)
    unit_error: float | None = None  # relative output error of the unit after local distillation
    measured: bool = True


@dataclass
class CandidateTable:
    key: str
    target: str
    base_latency_ms: float
    units: list[UnitCandidates]
    figures: dict[str, Figures] = field(default_factory=dict)  # candidate key -> figures; keep is all zeros
    model_digest: str = ""
    data_digest: str = ""
    settings: dict = field(default_factory=dict)
    created_utc: str = ""
    seconds: dict = field(default_factory=dict)  # time spent per phase
    version: int = TABLE_VERSION

    def figure(self, c: Candidate) -> Figures:
        if c.name == KEEP:
            return Figures()
        return self.figures[c.key]

    def rows(self) -> list[dict]:
        return [{"unit": u.unit, "candidate": c.name, "params_removed": c.params_removed,
                 **vars(self.figure(c))} for u in self.units for c in u.candidates]

    def to_dict(self) -> dict:
        return {"version": self.version, "key": self.key, "target": self.target,
                "base_latency_ms": self.base_latency_ms, "model_digest": self.model_digest,
                "data_digest": self.data_digest, "settings": self.settings, "created_utc": self.created_utc,
                "seconds": self.seconds, "units": [u.to_dict() for u in self.units],
                "figures": {k: vars(f) for k, f in self.figures.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> CandidateTable:
        units = [UnitCandidates(u["unit"], [Candidate.from_dict(c) for c in u["candidates"]],
                                dict(u.get("neighbours", {}))) for u in d["units"]]
        return cls(d["key"], d["target"], float(d["base_latency_ms"]), units,
                   {k: Figures(**f) for k, f in d.get("figures", {}).items()}, d.get("model_digest", ""),
                   d.get("data_digest", ""), dict(d.get("settings", {})), d.get("created_utc", ""),
                   dict(d.get("seconds", {})), int(d.get("version", TABLE_VERSION)))

    def save(self, path: str | os.PathLike) -> Path:
        from repconv.io import write_text_atomic

        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- digests


def model_digest(model: nn.Module) -> str:
    """sha256 of every tensor of the state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def data_digest(batches: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for x in batches:
        x = x.detach().cpu().contiguous().float()
        h.update(str(tuple(x.shape)).encode())
        h.update(x.numpy().tobytes())
    return h.hexdigest()[:20]


def table_key(model_sha: str, data_sha: str, target: str, settings: dict) -> str:
    text = json.dumps({"model": model_sha, "data": data_sha, "target": target, "settings": settings,
                       "version": TABLE_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_table(path: str | os.PathLike, *, expect_key: str | None = None,
               expect_units: Sequence[str] | None = None) -> CandidateTable:
    """Read a cached table; raise InputFileError when it is not a table, or is stale / foreign (``expect_key``:
    the key of the model, data, target and settings at hand)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        table = CandidateTable.from_dict(data)
    except FileNotFoundError as exc:
        raise InputFileError(f"candidate table '{path}' does not exist", "build it first (search writes it)") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise InputFileError(f"'{path}' is not a repconv candidate table ({type(exc).__name__}: {exc})",
                             "delete it to rebuild the table") from exc
    if table.version > TABLE_VERSION:
        raise InputFileError(f"candidate table '{path}' is version {table.version}, newer than this repconv",
                             "upgrade repconv or delete the table to rebuild it")
    if expect_key is not None and table.key != expect_key:
        raise InputFileError(f"candidate table '{path}' was measured for another model, data, target or settings "
                             f"(key {table.key}, expected {expect_key}; target {table.target})",
                             "delete it, or pass a new cache path, to measure the table again")
    if expect_units is not None and [u.unit for u in table.units] != list(expect_units):
        raise InputFileError(f"candidate table '{path}' lists other units than this model has",
                             "delete it to rebuild the table")
    missing = [c.key for u in table.units for c in u.candidates if c.name != KEEP and c.key not in table.figures]
    if missing:
        raise InputFileError(f"candidate table '{path}' has no figures for {', '.join(missing[:3])}"
                             f"{', ...' if len(missing) > 3 else ''}", "delete it to rebuild the table")
    return table
