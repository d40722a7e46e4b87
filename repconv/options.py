"""The choices stage options take, as ``Literal`` types, and the one check of option dataclasses.

The API's option dataclasses (``ConvertOptions``, ``ExportOptions``, ``TrainConfig``, ...) and the CLI's
flags share these types; this module imports nothing heavy, so ``repconv --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from repconv.errors import OptionError

Method = Literal["replacement", "parameter-free", "both"]
Select = Literal["position", "measured"]
Init = Literal["half", "lstsq"]
PfPolicy = Literal["all", "hybrid"]
PfOp = Literal["max", "avg"]
CalibrateSelect = Literal["all", "measured"]
Objective = Literal["ce", "distill", "both"]
Trainable = Literal["auto", "scalars", "norm", "all"]
Optimizer = Literal["sgd", "adamw"]
Amp = Literal["auto", "on", "off"]
BnStats = Literal["freeze", "update", "recalibrate"]  # BatchNorm running statistics while recovering
# finetune's choice: auto = freeze, unless the plan has parameter-free steps (their norms see new inputs): update
BnStatsChoice = Literal["auto", "freeze", "update", "recalibrate"]
Keep = Literal["best", "best_epoch", "last"]  # which weights a training run writes
Dtype = Literal["fp32", "fp16", "int8"]
Exporter = Literal["dynamo", "legacy"]
OrtLevel = Literal["disable", "basic", "extended", "all"]
ExportFormat = Literal["onnx", "engine"]
Backend = Literal["torch", "ort", "trt"]
Device = Literal["cpu", "cuda"]
Refit = Literal["auto", "on", "off"]  # the least-squares refit before recovery; auto: raced against no refit
Rival = Literal["pf-all", "pf-hybrid", "replace-every-2"]  # uniform policies a searched plan races (search/rivals)

T = TypeVar("T")


def check_choice(option: str, value: Any, choices: Any) -> None:
    """Raise OptionError unless ``value`` is one of the ``Literal`` type ``choices``."""
    allowed = typing.get_args(choices)
    if value not in allowed:
        raise OptionError(option, value, "is not a known choice", f"use one of {', '.join(map(str, allowed))}")


def check_choices(options: Any) -> None:
    """Check every ``Literal``-typed field of an options dataclass (call it from ``__post_init__``)."""
    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        hint, value = hints.get(f.name), getattr(options, f.name)
        if typing.get_origin(hint) in (tuple, list) and isinstance(value, (tuple, list)):  # several choices
            for choices in _literals(hint):
                for v in value:
                    check_choice(f.name, v, choices)
            continue
        for choices in _literals(hint):
            if value is None and type(None) in typing.get_args(hint):
                break
            check_choice(f.name, value, choices)


def _literals(hint: Any) -> list[Any]:
    if typing.get_origin(hint) is Literal:
        return [hint]
    return [a for a in typing.get_args(hint) if typing.get_origin(a) is Literal]


def from_values(cls: type[T], values: Mapping[str, Any]) -> T:
    """``cls(**values)`` for the keys that are fields of the dataclass ``cls`` (the CLI passes its locals)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def with_overrides(cls: type[T], options: T | None, overrides: Mapping[str, Any]) -> T:
    """``options`` (or ``cls()``) with keyword overrides; an unknown keyword is a TypeError, as for any call."""
    base = options if options is not None else cls()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) for {cls.__name__}: {', '.join(sorted(unknown))}")
    return dataclasses.replace(base, **overrides) if overrides else base
