"""A plan: the list of changes a conversion makes, as dataclasses with a JSON round trip.

A plan is what a converted checkpoint stores so that loading can rebuild the converted structure on
a freshly built architecture. Users can write or edit one and pass it with ``--plan FILE``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from repconv.errors import PlanError

PLAN_VERSION = 1


@dataclass
class ReplaceStep:
    """Replacement Learning: ``unit`` keeps no weights; they are ``a * P[prev] + b * P[next]``."""

    kind: ClassVar[str] = "replace"
    unit: str
    prev: str
    next: str
    init: str = "half"  # half | lstsq | fixed (a, b given)
    a: float = 0.5
    b: float = 0.5
    neighbor_grad: bool = False
    fit_error: float | None = None  # weight-space relative error of the initial (a, b), when measured

    def validate(self, model: nn.Module) -> None:
        from repconv.convert.graph import param_signature

        modules = dict(model.named_modules())
        for role, path in (("unit", self.unit), ("prev", self.prev), ("next", self.next)):
            if path not in modules:
                raise PlanError(f"replace step for '{self.unit}': {role} '{path}' is not a module of the model",
                                "fix the plan or regenerate it with `repconv convert --plan-out`")
        sig = param_signature(modules[self.unit])
        if not sig:
            raise PlanError(f"replace step: unit '{self.unit}' has no parameters to replace",
                            "pick a unit with parameters")
        for path in (self.prev, self.next):
            if param_signature(modules[path]) != sig:
                raise PlanError(f"replace step for '{self.unit}': neighbour '{path}' has other parameter "
                                "names or shapes", "neighbours must be repeated units of the same shape")
        if self.init not in ("half", "lstsq", "fixed"):
            raise PlanError(f"replace step for '{self.unit}': unknown init '{self.init}'",
                            "use half, lstsq or fixed")


@dataclass
class ParameterFreeStep:
    """Parameter-free layers: the spatial op at ``target`` becomes a built-in parameter-free op.

    ``form`` says how: ``pool`` (the pool replaces conv [+ norm + activation], ``absorbed`` lists the
    norm/activation modules it stands for), ``avgpool_conv`` (AvgPool2d(2,2) then the pretrained conv
    at stride 1, the hybrid rule for stride-2 targets) or ``token_mixer`` (a transformer's attention).
    """

    kind: ClassVar[str] = "parameter_free"
    target: str
    form: str = "pool"
    op: str = "max"
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    absorbed: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for path in (self.target, *self.absorbed):
            if path not in modules:
                raise PlanError(f"parameter-free step: '{path}' is not a module of the model",
                                "fix the plan or regenerate it")


STEP_KINDS: dict[str, type] = {cls.kind: cls for cls in (ReplaceStep, ParameterFreeStep)}


@dataclass
class Plan:
    steps: list = field(default_factory=list)
    arch: str | None = None
    leaves: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION

    @property
    def replace_steps(self) -> list[ReplaceStep]:
        return [s for s in self.steps if isinstance(s, ReplaceStep)]

    @property
    def parameter_free_steps(self) -> list[ParameterFreeStep]:
        return [s for s in self.steps if isinstance(s, ParameterFreeStep)]

    def without_replacement(self) -> Plan:
        """The plan of the folded model: replaced units hold ordinary weights again."""
        return Plan(self.parameter_free_steps, self.arch, list(self.leaves), self.version)

    # -- JSON

    def to_dict(self) -> dict:
        return {"version": self.version, "arch": self.arch, "leaves": list(self.leaves),
                "steps": [{"kind": s.kind, **asdict(s)} for s in self.steps]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=indent is None)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise PlanError("a plan is a JSON object with a 'steps' list", "see docs/convert.md for the format")
        if data.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise PlanError(f"plan version {data['version']} is newer than this repconv understands",
                            "upgrade repconv")
        steps = []
        for i, raw in enumerate(data["steps"]):
            raw = dict(raw)
            kind = raw.pop("kind", None)
            if kind not in STEP_KINDS:
                raise PlanError(f"plan step {i} has unknown kind {kind!r}",
                                f"use one of {', '.join(STEP_KINDS)}")
            step_cls = STEP_KINDS[kind]
            names = {f.name for f in fields(step_cls)}
            extra = set(raw) - names
            if extra:
                raise PlanError(f"plan step {i} ({kind}) has unknown fields {sorted(extra)}",
                                f"allowed: {sorted(names)}")
            try:
                steps.append(step_cls(**raw))
            except TypeError as exc:
                raise PlanError(f"plan step {i} ({kind}) is incomplete: {exc}", "add the missing fields") from exc
        return cls(steps, data.get("arch"), list(data.get("leaves", [])), data.get("version", PLAN_VERSION))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"the plan is not valid JSON ({exc})", "fix the file") from exc
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file '{path}' does not exist", "check the path given to {option}", option="plan")
        return cls.from_json(path.read_text())

    def digest(self) -> str:
        return hashlib.sha256(self.to_json(indent=None).encode()).hexdigest()[:16]

    # -- validation

    def validate(self, model: nn.Module) -> None:
        """Check every step against ``model`` (the original architecture) and the steps against each other."""
        for step in self.steps:
            step.validate(model)
        units = [s.unit for s in self.replace_steps]
        if len(set(units)) != len(units):
            raise PlanError("a unit is replaced twice in the plan", "list each unit once")
        for s in self.replace_steps:
            for other in units:
                for _role, path in (("prev", s.prev), ("next", s.next)):
                    if _within(path, other) or _within(other, path):
                        raise PlanError(f"unit '{s.unit}' takes its weights from '{path}', which overlaps "
                                        f"the replaced unit '{other}'",
                                        "neighbours of a replaced unit must keep their own weights")
        for s in self.replace_steps:
            for other in units:
                if other != s.unit and (_within(s.unit, other) or _within(other, s.unit)):
                    raise PlanError(f"replaced units '{s.unit}' and '{other}' are nested", "keep only one")


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".")
