"""Accuracy damage of every candidate, LANA-style: all candidates of all units are locally distilled in ONE pass
over unlabeled images (one teacher forward per batch; each candidate is trained on its unit's teacher input to
reproduce the teacher unit's output), then each is plugged into the teacher alone (a forward hook swaps its
unit's output) and scored on held-out images by top-1 agreement with the teacher and KL of the logits.

Replacement candidates are not trained locally (per-unit output MSE on two scalars drives them towards 0,
``repconv.train.local``); their scalars are the best of a few starting points by KL on the first held-out
batch, as ``repconv.train.calibrate.measure_damage`` does.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from repconv.convert.graph import trace
from repconv.convert.measure import kl_to_teacher
from repconv.convert.parameter_free import apply_parameter_free
from repconv.convert.replacement import synthesize
from repconv.search.candidates import KEEP, Candidate, UnitCandidates
from repconv.train.local import _Capture, _relative, relative_error

_STARTS = ((0.5, 0.5), (1.0, 0.0), (0.0, 1.0))


@dataclass
class DamageOptions:
    steps: int = 40  # local-distillation steps (batches), all candidates together
    batch_size: int = 64
    lr: float = 1e-3
    pf_train: str = "all"  # all | norm
    stats_batches: int = 8  # batches re-estimating each candidate's BN statistics before training

    def to_dict(self) -> dict:
        return asdict(self)


class CandidateReplaced(nn.Module):
    """A replacement candidate run alone on the teacher's neighbours, with its own (a, b)."""

    def __init__(self, teacher: nn.Module, unit: str, prev: str, next: str):
        super().__init__()
        self.unit = copy.deepcopy(teacher.get_submodule(unit))
        self.a = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.tensor(0.5))
        p, q = teacher.get_submodule(prev), teacher.get_submodule(next)
        self._prev, self._next = dict(p.named_parameters()), dict(q.named_parameters())
        self._names = [n for n, _ in self.unit.named_parameters()]

    def forward(self, x):
        params = {n: synthesize(self.a, self.b, self._prev[n], self._next[n]) for n in self._names}
        return torch.func.functional_call(self.unit, params, (x,))


def candidate_view(teacher: nn.Module, unit: str, cand: Candidate) -> nn.Module:
    """The candidate's unit as a standalone module with its own parameters (copied from the teacher)."""
    if cand.name == "replace":
        s = cand.steps[0]
        return CandidateReplaced(teacher, s.unit, s.prev, s.next).eval()
    gm = trace(copy.deepcopy(teacher.get_submodule(unit)))
    apply_parameter_free(gm, [_relative(s, unit) for s in cand.steps])
    return gm.eval()


def build_views(teacher: nn.Module, table: Sequence[UnitCandidates]) -> dict[str, dict[str, nn.Module]]:
    return {u.unit: {c.name: candidate_view(teacher, u.unit, c) for c in u.candidates if c.name != KEEP}
            for u in table}


def _swap(view: nn.Module) -> Callable:
    def hook(module, args, output):
        return view(*args)
    return hook


def _score(teacher: nn.Module, unit: str, view: nn.Module, batches, t_logits) -> tuple[float, float]:
    """(agreement, KL) of the teacher with ``unit`` swapped for ``view`` on ``batches``."""
    handle = teacher.get_submodule(unit).register_forward_hook(_swap(view))
    agree = total = 0
    kl = 0.0
    try:
        with torch.no_grad():
            for x, t in zip(batches, t_logits, strict=True):
                y = teacher(x)
                agree += int((y.argmax(1) == t.argmax(1)).sum())
                kl += float(kl_to_teacher(y, t)) * len(x)
                total += len(x)
    finally:
        handle.remove()
    return agree / max(total, 1), kl / max(total, 1)


def train_views(teacher: nn.Module, views: dict[str, dict[str, nn.Module]], batches: Sequence[torch.Tensor],
                options: DamageOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Local distillation of every parameter-free candidate at once (one teacher forward per batch)."""
    from repconv.train.local import _NORMS

    trained: dict[str, dict[str, nn.Module]] = {}
    params = []
    for unit, cands in views.items():
        for name, v in cands.items():
            if isinstance(v, CandidateReplaced):
                continue
            ps = list(v.parameters()) if options.pf_train == "all" else [
                p for m in v.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)]
            if ps:
                for p in ps:
                    p.requires_grad_(True)
                params += ps
                trained.setdefault(unit, {})[name] = v
    if not batches:
        return {"steps": 0}
    # BN statistics of every candidate re-estimated on its unit's teacher inputs (repconv.train.local), kept per
    # candidate only where that lowers its unit error on those batches
    probe = batches[: options.stats_batches]
    pf = {u: {n: v for n, v in c.items() if not isinstance(v, CandidateReplaced)} for u, c in views.items()}
    pf = {u: c for u, c in pf.items() if c}
    before = _unit_errors(teacher, pf, probe)
    saved = {(u, n): {k: b.clone() for k, b in v.named_buffers()} for u, c in pf.items() for n, v in c.items()}
    capture = _Capture(teacher, pf)
    try:
        _init_stats(teacher, pf, probe, capture)
    finally:
        capture.close()
    after = _unit_errors(teacher, pf, probe)
    with torch.no_grad():
        for (u, n), bufs in saved.items():
            if after[u, n] > before[u, n]:
                for k, b in pf[u][n].named_buffers():
                    b.copy_(bufs[k])
    if not params:
        return {"steps": 0}
    opt = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
    capture = _Capture(teacher, trained)
    steps = 0
    try:
        while steps < options.steps:
            for x in batches:
                if steps >= options.steps:
                    break
                capture.run(teacher, x)
                opt.zero_grad(set_to_none=True)
                for unit, cands in trained.items():
                    for v in cands.values():
                        relative_error(v(*capture.inputs[unit]), capture.outputs[unit]).backward()
                opt.step()
                steps += 1
                if progress and steps % 10 == 0:
                    progress(f"local distillation of the candidates: step {steps}/{options.steps}")
    finally:
        capture.close()
    for cands in trained.values():
        for v in cands.values():
            v.requires_grad_(False)
    return {"steps": steps}


def _init_stats(teacher, views, batches, capture) -> None:
    from repconv.convert.measure import batch_stats

    modules = [v for cands in views.values() for v in cands.values() if not isinstance(v, CandidateReplaced)]
    for v in modules:
        for m in v.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
    with torch.no_grad(), batch_stats(modules, momentum=None):
        for x in batches:
            capture.run(teacher, x)
            for unit, cands in views.items():
                for v in cands.values():
                    if not isinstance(v, CandidateReplaced):
                        v(*capture.inputs[unit])
    for v in modules:
        v.eval()


def _unit_errors(teacher, views, batches) -> dict[tuple[str, str], float]:
    capture = _Capture(teacher, views)
    num: dict = {}
    den: dict = {}
    try:
        for x in batches:
            capture.run(teacher, x)
            with torch.no_grad():
                for unit, cands in views.items():
                    t = capture.outputs[unit].float()
                    for name, v in cands.items():
                        diff = float((v(*capture.inputs[unit]) - t).pow(2).sum())
                        num[unit, name] = num.get((unit, name), 0.0) + diff
                        den[unit, name] = den.get((unit, name), 0.0) + float(t.pow(2).sum())
    finally:
        capture.close()
    return {k: num[k] / max(den[k], 1e-12) for k in num}


def measure_damage(teacher: nn.Module, table: Sequence[UnitCandidates], train_batches: Sequence[torch.Tensor],
                   eval_batches: Sequence[torch.Tensor], options: DamageOptions | None = None, *,
                   views: dict[str, dict[str, nn.Module]] | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Candidate key -> {damage (points), kl, unit_error, agreement}; ``views`` (trained in place) default to
    fresh ones built from the teacher."""
    options = options or DamageOptions()
    teacher.eval()
    grads = [p.requires_grad for p in teacher.parameters()]
    teacher.requires_grad_(False)
    started = time.perf_counter()
    try:
        views = views if views is not None else build_views(teacher, table)
        with torch.no_grad():
            t_logits = [teacher(x) for x in eval_batches]
        for u in table:  # replacement scalars: best start by KL on the first held-out batch
            for v in views[u.unit].values():
                if isinstance(v, CandidateReplaced):
                    best = min(_STARTS, key=lambda ab, v=v, u=u: _set_and_score(teacher, u.unit, v, ab,
                                                                                eval_batches[:1], t_logits[:1]))
                    _set_ab(v, best)
        info = train_views(teacher, views, train_batches, options, progress)
        errors = _unit_errors(teacher, views, eval_batches)
        out = {}
        n = sum(len(c) for c in views.values())
        i = 0
        for unit, cands in views.items():
            for name, v in cands.items():
                i += 1
                if progress:
                    progress(f"damage {i}/{n}: {unit} {name}")
                agreement, kl = _score(teacher, unit, v, eval_batches, t_logits)
                out[f"{unit}:{name}"] = {"damage": 100 * (1 - agreement), "kl": kl, "agreement": agreement,
                                         "unit_error": errors[unit, name]}
        out["_info"] = {"train_steps": info["steps"], "seconds": round(time.perf_counter() - started, 2)}
        return out
    finally:
        for p, r in zip(teacher.parameters(), grads, strict=True):
            p.requires_grad_(r)


def _set_ab(v: CandidateReplaced, ab) -> None:
    with torch.no_grad():
        v.a.fill_(ab[0])
        v.b.fill_(ab[1])


def _set_and_score(teacher, unit, v, ab, batches, t_logits) -> float:
    _set_ab(v, ab)
    return _score(teacher, unit, v, batches, t_logits)[1]
