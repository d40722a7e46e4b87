"""Foreign checkpoints: put a state_dict whose key names are someone else's onto a built model.

Two ways, both explicit (nothing here guesses on its own):

``mode="position"``
    Pair the foreign tensors with the model's state_dict entries in order. Bookkeeping entries
    (BatchNorm's ``num_batches_tracked``) are left out on both sides while pairing; the model's get the
    foreign value of the paired module when there is one, else zero. Every pair must agree in shape, and
    where both keys end in a standard tensor name (``weight``, ``bias``, ``running_mean``, ...) in that name
    too; the counts must agree. The first disagreement is refused with an :class:`ArchError` naming the
    index, both keys and both shapes. Position mapping relies on the file keeping the order its model
    saved the tensors in (``torch.save`` does; ``.safetensors`` files store keys in alphabetical order), so
    a foreign state_dict in alphabetical order is refused unless the model's own order is alphabetical too.

``rules=FILE`` (or the name of a rules file shipped in ``repconv/models/remaps/``)
    A JSON or TOML file of ordered regular-expression rules::

        {"rules": [["^_blocks\\\\.0\\\\.", "blocks.0.0."], ["^_fc\\\\.", "classifier."]],
         "drop": ["^_fc\\\\."]}

    Every foreign key not matched by a ``drop`` pattern goes through *all* the rules in order, like
    ``sed -e R1 -e R2 ...``: each rule is ``re.sub(pattern, replacement, key, count=1)`` applied to the
    result of the previous one (Python ``re`` syntax, ``\\1`` for groups). The result must name a key of
    the model with the same shape. Rules files are matched by name, so they do not depend on the order
    of the tensors in the file.

:func:`remap_state_dict` returns the remapped state_dict (ready for ``fit_state_dict``) and a
:class:`RemapReport` saying what went where, what was dropped and what matched nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from repconv.errors import ArchError, InputFileError, OptionError

RemapMode = Literal["position"]
REMAPS_DIR = Path(__file__).with_name("remaps")
BOOKKEEPING = re.compile(r"(^|\.)num_batches_tracked$")
FX_CONSTANT = re.compile(r"_tensor_constant\d+")  # the same names as repconv.convert.graph.FX_CONSTANT
# Leaf names whose meaning is fixed: a position pair whose leaves are both in here must agree on it.
_STANDARD_LEAVES = frozenset({"weight", "bias", "running_mean", "running_var", "in_proj_weight", "in_proj_bias",
                              "cls_token", "pos_embed", "position_embeddings"})
_SHOWN = 4


@dataclass
class RemapRules:
    """Ordered rename rules and drop patterns, read from a rules file."""

    rules: list[tuple[re.Pattern, str]]
    drop: list[re.Pattern] = field(default_factory=list)
    source: str = ""
    description: str = ""

    def rename(self, key: str) -> str | None:
        """The model key for a foreign key, or None when a drop pattern matches it."""
        if any(p.search(key) for p in self.drop):
            return None
        for pattern, replacement in self.rules:
            key = pattern.sub(replacement, key, count=1)
        return key


@dataclass
class RemapReport:
    """What a remap did: pairs (foreign key, model key), dropped foreign keys, what matched nothing."""

    mode: str  # "position" | "rules" | "none"
    rules_file: str | None = None
    mapped: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # foreign keys left out on purpose (drop rules, bookkeeping)
    unmatched: list[str] = field(default_factory=list)  # foreign keys that name no tensor of the model
    missing: list[str] = field(default_factory=list)  # model keys no foreign tensor maps to
    filled: list[str] = field(default_factory=list)  # model bookkeeping keys set to zero (no foreign value)
    problems: list[str] = field(default_factory=list)  # shape disagreements, collisions (rules mode)

    @property
    def renamed(self) -> int:
        return sum(a != b for a, b in self.mapped)

    @property
    def ok(self) -> bool:
        return not (self.unmatched or self.missing or self.problems)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mapped"] = [list(p) for p in self.mapped]
        data["renamed"], data["ok"] = self.renamed, self.ok
        return data

    def summary(self) -> list[str]:
        """Lines for the CLI to print."""
        how = f"rules {self.rules_file}" if self.mode == "rules" else self.mode
        lines = [f"remap ({how}): {len(self.mapped)} tensors mapped, {self.renamed} renamed, "
                 f"{len(self.dropped)} dropped, {len(self.unmatched)} unmatched, {len(self.missing)} missing"]
        for label, keys in (("dropped", self.dropped), ("unmatched", self.unmatched), ("missing", self.missing),
                            ("zero-filled", self.filled), ("problem", self.problems)):
            if keys:
                lines.append(f"  {label}: {_shorten(keys)}")
        return lines


def _shorten(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _target(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    own = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    return {k: v for k, v in own.items() if not FX_CONSTANT.fullmatch(k)}


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(like.shape, dtype=like.dtype)  # on CPU even when the model was built on meta


# ---------------------------------------------------------------- rules files


def shipped_rules() -> dict[str, Path]:
    """Rules files that come with repconv, by name (``efficientnet_lite0`` -> its JSON file)."""
    return {p.stem: p for p in sorted(REMAPS_DIR.glob("*.json"))}


def _rules_path(rules: str | Path) -> Path:
    path = Path(rules)
    if path.is_file():
        return path
    shipped = shipped_rules()
    if str(rules) in shipped:
        return shipped[str(rules)]
    raise InputFileError(f"rules file '{rules}' does not exist",
                         f"give a JSON or TOML rules file, or one of the shipped names: {', '.join(shipped) or 'none'}")


def load_rules(rules: str | Path) -> RemapRules:
    """Read a rules file (``.json`` or ``.toml``), or a shipped one by name; bad regexes are named."""
    path = _rules_path(rules)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError as exc:  # Python 3.10
                raise InputFileError(f"'{path}' is TOML, which this Python (3.10) cannot read without tomli",
                                     "write the rules as JSON instead") from exc
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (ValueError, TypeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise InputFileError(f"rules file '{path}' does not parse: {exc}",
                             'expected {"rules": [[PATTERN, REPLACEMENT], ...], "drop": [PATTERN, ...]}') from exc
    if not isinstance(data, dict) or not isinstance(data.get("rules", []), list) \
            or not isinstance(data.get("drop", []), list):
        raise InputFileError(f"rules file '{path}' has no list under 'rules'",
                             'expected {"rules": [[PATTERN, REPLACEMENT], ...], "drop": [PATTERN, ...]}')
    compiled, drops = [], []
    for i, rule in enumerate(data.get("rules", [])):
        if isinstance(rule, dict):
            rule = [rule.get("pattern"), rule.get("replace", rule.get("replacement"))]
        if not (isinstance(rule, list | tuple) and len(rule) == 2 and all(isinstance(s, str) for s in rule)):
            raise InputFileError(f"rule {i} in '{path}' is {rule!r}, not a [PATTERN, REPLACEMENT] pair of strings",
                                 "write each rule as [\"^old\\\\.\", \"new.\"]")
        compiled.append((_compile(rule[0], path, f"rule {i}"), rule[1]))
    for i, pattern in enumerate(data.get("drop", [])):
        if not isinstance(pattern, str):
            raise InputFileError(f"drop pattern {i} in '{path}' is {pattern!r}, not a string", "list regex strings")
        drops.append(_compile(pattern, path, f"drop pattern {i}"))
    if not compiled and not drops:
        raise InputFileError(f"rules file '{path}' has no rules and no drop patterns", "add rules or drop patterns")
    return RemapRules(compiled, drops, str(path), str(data.get("description", "")))


def _compile(pattern: str, path: Path, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InputFileError(f"{what} in '{path}' is not a valid regular expression ({pattern!r}: {exc})",
                             "use Python re syntax; escape literal dots as \\\\.") from exc


# ---------------------------------------------------------------- remapping


def remap_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module | Mapping[str, torch.Tensor], *,
                     mode: RemapMode | None = None, rules: str | Path | RemapRules | None = None,
                     strict: bool = True, arch: str = "the model") -> tuple[dict[str, torch.Tensor], RemapReport]:
    """``state_dict`` renamed to ``model``'s keys, by position (``mode="position"``) or by a rules file.

    ``model`` is a built module (the meta device is fine: only its keys and shapes are read) or its
    state_dict. With neither ``mode`` nor ``rules`` the state_dict comes back as it is (report mode
    ``"none"``). ``strict`` (the default) raises :class:`ArchError` on the first thing that does not fit;
    without it the partial result (tensors of the wrong shape included) and a report listing every problem
    come back, for a dry run or to read the class count from.
    """
    if mode is not None and rules is not None:
        raise OptionError("remap", mode, "and a rules file cannot both map the keys",
                          "keep one: by position, or by the rules file")
    if mode is None and rules is None:
        return dict(state_dict), RemapReport("none")
    if mode is not None and mode != "position":
        raise OptionError("remap", mode, "is not a known mode", "the only mode is 'position' (or give a rules file)")
    target = _target(model)
    if mode == "position":
        return _by_position(dict(state_dict), target, strict, arch)
    return _by_rules(dict(state_dict), target, rules if isinstance(rules, RemapRules) else load_rules(rules),
                     strict, arch)


def _module_of(key: str) -> str:
    return key.rpartition(".")[0]


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def _by_position(foreign: dict[str, torch.Tensor], target: dict[str, torch.Tensor], strict: bool,
                 arch: str) -> tuple[dict[str, torch.Tensor], RemapReport]:
    report = RemapReport("position")
    src = [k for k in foreign if not BOOKKEEPING.search(k)]
    dst = [k for k in target if not BOOKKEEPING.search(k)]
    if len(src) > 2 and src == sorted(src) and dst != sorted(dst):
        raise ArchError(f"the foreign tensors are in alphabetical order (as .safetensors files store them), not in "
                        f"the order their model made them, so pairing them by position with {arch} is unreliable",
                        "give the torch.save file the weights came from, or map names with a rules file")
    first = _first_position_mismatch(foreign, target, src, dst)
    if first is not None:
        if strict:
            raise ArchError(f"the foreign weights do not pair with {arch} by position: {first}",
                            "check {option} and the class count, or map names with a rules file instead", option="arch")
        report.problems.append(first)
    out: dict[str, torch.Tensor] = {}
    modules: dict[str, str] = {}  # model module -> foreign module, from the pairs
    for s, d in zip(src, dst, strict=False):
        out[d] = foreign[s]
        report.mapped.append((s, d))
        modules.setdefault(_module_of(d), _module_of(s))
    report.unmatched = src[len(dst):]
    report.missing = dst[len(src):]
    used = set()
    for d in target:
        if not BOOKKEEPING.search(d):
            continue
        s = f"{modules[_module_of(d)]}.{_leaf(d)}".lstrip(".") if _module_of(d) in modules else None
        if s in foreign and _shape(foreign[s]) == _shape(target[d]):
            out[d] = foreign[s]
            report.mapped.append((s, d))
            used.add(s)
        else:
            out[d] = _zero(target[d])
            report.filled.append(d)
    report.dropped = [k for k in foreign if BOOKKEEPING.search(k) and k not in used]
    return out, report


def _first_position_mismatch(foreign, target, src: list[str], dst: list[str]) -> str | None:
    for i, (s, d) in enumerate(zip(src, dst, strict=False)):
        a, b = _shape(foreign[s]), _shape(target[d])
        if a != b:
            return f"#{i} foreign '{s}' {a} vs model '{d}' {b}"
        if _leaf(s) != _leaf(d) and _leaf(s) in _STANDARD_LEAVES and _leaf(d) in _STANDARD_LEAVES:
            return f"#{i} foreign '{s}' is a {_leaf(s)}, model '{d}' a {_leaf(d)} (both {a})"
    if len(src) != len(dst):
        i = min(len(src), len(dst))
        extra = (f"foreign '{src[i]}' {_shape(foreign[src[i]])} has no model tensor" if len(src) > len(dst)
                 else f"model '{dst[i]}' {_shape(target[dst[i]])} gets no foreign tensor")
        return (f"{len(src)} foreign tensors vs {len(dst)} in the model (not counting num_batches_tracked); "
                f"#{i} {extra}")
    return None


def _by_rules(foreign: dict[str, torch.Tensor], target: dict[str, torch.Tensor], rules: RemapRules, strict: bool,
              arch: str) -> tuple[dict[str, torch.Tensor], RemapReport]:
    report = RemapReport("rules", rules_file=rules.source)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in foreign.items():
        new = rules.rename(key)
        if new is None:
            report.dropped.append(key)
        elif new not in target:
            if BOOKKEEPING.search(key):
                report.dropped.append(key)  # the model has no counter there: nothing is lost
            else:
                report.unmatched.append(f"{key} -> {new}" if new != key else key)
        elif new in origin:
            report.problems.append(f"'{origin[new]}' and '{key}' both map to '{new}'")
        elif _shape(value) != _shape(target[new]):  # kept in the (lenient) result: it shows the class count
            report.problems.append(f"'{key}' {_shape(value)} -> '{new}' {_shape(target[new])}")
            out[new], origin[new] = value, key
        else:
            out[new], origin[new] = value, key
            report.mapped.append((key, new))
    for key, value in target.items():
        if key not in out:
            if BOOKKEEPING.search(key):
                out[key] = _zero(value)
                report.filled.append(key)
            else:
                report.missing.append(key)
    if strict and not report.ok:
        parts = [f"{len(keys)} {label}: {_shorten(keys)}" for label, keys in
                 (("wrong", report.problems), ("unmatched", report.unmatched), ("missing", report.missing)) if keys]
        raise ArchError(f"rules '{rules.source}' do not map the foreign weights onto {arch}: " + "; ".join(parts),
                        "check {option} and the class count, or fix the rules file", option="arch")
    return out, report


def remap_for_arch(state_dict: Mapping[str, torch.Tensor], spec, *, num_classes: int | None = None,
                   mode: RemapMode | None = None, rules: str | Path | RemapRules | None = None
                   ) -> tuple[dict[str, torch.Tensor], RemapReport, dict]:
    """Remap onto the architecture ``spec`` (an :class:`repconv.models.ArchSpec`), finding the class count too.

    Returns the remapped state_dict, the report and the builder's keyword arguments (``{"num_classes": N}``
    when it differs from the default, as ``checkpoint._from_state_dict`` builds): without ``num_classes``,
    a first, lenient pass onto the default model reads the class count from the classifier tensors the
    foreign ones land on, and the strict pass uses a model built with it. Models are built on the meta
    device (no memory, no initialisation) when the builder allows.
    """
    from repconv.models import build_on_meta, infer_num_classes

    if isinstance(rules, str | Path):
        rules = load_rules(rules)
    nc = num_classes
    if nc is None and (mode is not None or rules is not None):
        loose, _ = remap_state_dict(state_dict, build_on_meta(spec) or spec.build(), mode=mode, rules=rules,
                                    strict=False, arch=spec.name)
        nc = infer_num_classes(spec, loose)
    kwargs = {"num_classes": nc} if nc is not None and (nc != spec.num_classes or spec.source == "repconv") else {}
    target = build_on_meta(spec, **kwargs) or spec.build(**kwargs)
    out, report = remap_state_dict(state_dict, target, mode=mode, rules=rules, arch=spec.name)
    return out, report, kwargs
