"""Every unit's candidates: keep it; Replacement Learning (interior units of a run); parameter-free max or avg
pools (``all`` policy restricted to the unit); hybrid (stride-2 units: AvgPool2d then the conv at stride 1);
the ViT token mixer. A unit is a block (``repconv.train.local.block_of``), so the candidates of one unit are
alternatives: exactly one is chosen. Candidates are built from the existing plan machinery
(``find_runs``/``select_units``' neighbour rule and ``find_targets``/``_step``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from torch import nn

from repconv.convert.graph import find_runs, trace
from repconv.convert.parameter_free import _step, find_targets
from repconv.convert.plan import STEP_KINDS, Plan, ReplaceStep
from repconv.errors import NothingToReplace, PlanError
from repconv.train.local import block_of

KEEP = "keep"
KINDS = ("replace", "pf-max", "pf-avg", "hybrid", "token-mixer")


@dataclass
class Candidate:
    """One way to change one unit: the plan steps that make it."""

    unit: str
    name: str  # keep | replace | pf-max | pf-avg | hybrid | token-mixer
    steps: list = field(default_factory=list)  # ReplaceStep / ParameterFreeStep
    params_removed: int = 0

    @property
    def key(self) -> str:
        return f"{self.unit}:{self.name}"

    def to_dict(self) -> dict:
        return {"unit": self.unit, "name": self.name, "params_removed": self.params_removed,
                "steps": [{"kind": s.kind, **asdict(s)} for s in self.steps]}

    @classmethod
    def from_dict(cls, d: dict) -> Candidate:
        steps = []
        for raw in d.get("steps", []):
            raw = dict(raw)
            steps.append(STEP_KINDS[raw.pop("kind")](**raw))
        return cls(d["unit"], d["name"], steps, int(d.get("params_removed", 0)))


@dataclass
class UnitCandidates:
    unit: str
    candidates: list[Candidate]  # the first is always "keep"
    neighbours: dict = field(default_factory=dict)  # replace candidate: {"prev": path, "next": path}

    def get(self, name: str) -> Candidate:
        for c in self.candidates:
            if c.name == name:
                return c
        raise PlanError(f"unit '{self.unit}' has no candidate '{name}'",
                        f"its candidates: {', '.join(c.name for c in self.candidates)}")

    def to_dict(self) -> dict:
        return {"unit": self.unit, "neighbours": dict(self.neighbours),
                "candidates": [c.to_dict() for c in self.candidates]}


def enumerate_candidates(model: nn.Module, *, leaves: Sequence[str] = (), kinds: Sequence[str] = KINDS,
                         units: Sequence[str] | None = None) -> list[UnitCandidates]:
    """The candidate units of ``model`` (an original, unconverted model), in module order."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise PlanError(f"unknown candidate kinds {sorted(unknown)}", f"use some of {', '.join(KINDS)}")
    gm = trace(model, leaves)
    by_unit: dict[str, list[Candidate]] = {}
    neighbours: dict[str, dict] = {}
    targets = find_targets(model, leaves=leaves, gm=gm)
    grouped: dict[str, list] = {}
    for t in targets:
        grouped.setdefault(block_of(model, t.path), []).append(t)
    for unit, ts in grouped.items():
        convs = [t for t in ts if t.kind != "attention"]
        attention = [t for t in ts if t.kind == "attention"]
        found = by_unit.setdefault(unit, [])
        removed = sum(t.params for t in convs)
        if convs and "pf-max" in kinds:
            found.append(Candidate(unit, "pf-max", [_step(t, "all", "max") for t in convs], removed))
        if convs and "pf-avg" in kinds:
            found.append(Candidate(unit, "pf-avg", [_step(t, "all", "avg") for t in convs], removed))
        if convs and "hybrid" in kinds and any(t.stride > 1 for t in convs):
            steps = [_step(t, "hybrid", "max") for t in convs]
            kept = sum(t.params for t in convs if t.stride > 1)
            found.append(Candidate(unit, "hybrid", steps, removed - kept))
        if attention and "token-mixer" in kinds:
            found.append(Candidate(unit, "token-mixer", [_step(t, "all", "max") for t in attention], 0))
    if "replace" in kinds:
        for run in find_runs(model, opaque=leaves):
            for i, member in enumerate(run.members[1:-1], start=1):
                step = ReplaceStep(member, run.members[i - 1], run.members[i + 1], init="half")
                by_unit.setdefault(member, []).append(Candidate(member, "replace", [step], run.params_per_member))
                neighbours[member] = {"prev": step.prev, "next": step.next}
    order = {p: i for i, (p, _) in enumerate(model.named_modules())}
    out = [UnitCandidates(u, [Candidate(u, KEEP), *cs], neighbours.get(u, {}))
           for u, cs in sorted(by_unit.items(), key=lambda kv: order.get(kv[0], len(order))) if cs]
    if units is not None:
        import fnmatch

        out = [u for u in out if any(fnmatch.fnmatchcase(u.unit, g) for g in units)]
    if not out:
        raise NothingToReplace(f"{type(model).__name__} has no unit that can be converted (no repeated unit with "
                               "two neighbours, no parameter-free target)", "choose another model")
    return out


def conflicts(table: Sequence[UnitCandidates]) -> list[tuple[str, str, str]]:
    """Pairs that cannot be chosen together, as (unit, candidate, other unit): ``candidate`` of ``unit`` needs
    ``other unit`` kept (a replaced unit's neighbours keep their weights; nested units take one form)."""
    paths = [u.unit for u in table]
    out = []
    for u in table:
        for c in u.candidates:
            if c.name == "replace":
                for n in (u.neighbours.get("prev"), u.neighbours.get("next")):
                    for other in paths:
                        if other != u.unit and (other == n or other.startswith(f"{n}.") or n.startswith(f"{other}.")):
                            out.append((u.unit, c.name, other))
        for other in paths:
            if other != u.unit and (other.startswith(u.unit + ".") or u.unit.startswith(other + ".")):
                out += [(u.unit, c.name, other) for c in u.candidates if c.name != KEEP]
    return sorted(set(out))


def chosen_candidates(table: Sequence[UnitCandidates], choice: dict[str, str]) -> list[Candidate]:
    """The candidates ``choice`` (unit -> candidate name) names; PlanError for a unit or candidate not in ``table``."""
    known = {u.unit: u for u in table}
    for unit in choice:
        if unit not in known:
            raise PlanError(f"'{unit}' is not a candidate unit", "pick units from the candidate table")
    return [known[unit].get(name) for unit, name in choice.items()]


def assemble_plan(table: Sequence[UnitCandidates], choice: dict[str, str], *, arch: str | None = None,
                  leaves: Sequence[str] = ()) -> Plan:
    """The plan that applies ``choice`` (unit -> candidate name; units not named are kept)."""
    steps = [_copy(s) for c in chosen_candidates(table, choice) for s in c.steps]  # keep has no steps
    steps.sort(key=lambda s: s.kind != "replace")
    return Plan(steps, arch, list(leaves))


def _copy(step):
    return type(step)(**asdict(step))
