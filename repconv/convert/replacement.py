"""Replacement Learning pass (Zhang et al. 2024): a replaced unit's weights are ``a * P_prev + b * P_next``.

The pass rewrites a traced GraphModule in place:

* the unit's parameters become ``None`` slots (so they leave ``parameters()`` and ``state_dict()``;
  buffers such as BN running statistics stay where they were);
* a :class:`ReplacementScalars` module holding ``a`` and ``b`` is added at ``<unit>.replacement``;
* every call of a parameterized leaf inside the unit runs through :func:`call_with_params` with the
  synthesized tensors, and every ``get_attr`` of one of its parameters reads the synthesized tensor.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch
from torch import fx, nn

from repconv.convert.graph import Run
from repconv.convert.plan import ReplaceStep
from repconv.errors import OptionError

SCALARS_NAME = "replacement"


class ReplacementScalars(nn.Module):
    """The two learnable scalars of one replaced unit, and where its weights come from."""

    def __init__(self, unit: str, prev: str, next: str, param_names: Sequence[str],
                 a: float = 0.5, b: float = 0.5, neighbor_grad: bool = False):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))
        self.unit, self.prev, self.next = unit, prev, next
        self.param_names = tuple(param_names)
        self.neighbor_grad = neighbor_grad

    def extra_repr(self) -> str:
        return (f"unit={self.unit!r}, prev={self.prev!r}, next={self.next!r}, "
                f"a={self.a.item():.4f}, b={self.b.item():.4f}, neighbor_grad={self.neighbor_grad}")


def synthesize(a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor,
               neighbor_grad: bool = False) -> torch.Tensor:
    """``a * prev + b * next``; with gradients, through :class:`Synthesis` (same values, fewer temporaries)."""
    if not neighbor_grad:
        prev, next = prev.detach(), next.detach()
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or prev.requires_grad or next.requires_grad):
        return Synthesis.apply(a, b, prev, next)
    return synthesize_autograd(a, b, prev, next)


def synthesize_autograd(a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, next: torch.Tensor) -> torch.Tensor:
    """The synthesis as plain tensor ops (autograd differentiates it): the reference for :class:`Synthesis`."""
    return a.to(prev.dtype) * prev + b.to(next.dtype) * next


class Synthesis(torch.autograd.Function):
    """``W = a * prev + b * next`` with a hand-written backward.

    Plain autograd computes ``grad_a = (grad_W * prev).sum()``: a weight-shaped temporary per scalar, two
    per synthesized tensor and step, plus three weight-shaped results in the forward (``a * prev``,
    ``b * next``, their sum). Here the scalars' gradients are dot products (``vdot``, no temporary) and the
    forward adds in place, so one synthesized tensor costs two weight-shaped allocations per step instead of
    five, and half the memory traffic. The forward is bit-identical to :func:`synthesize_autograd`. Nothing
    weight-shaped is saved that autograd would not keep anyway: ``prev`` and ``next`` are the neighbours'
    parameters (the synthesized ``W`` itself is what the conv / linear saves for its input gradient, in
    either implementation).
    """

    @staticmethod
    def forward(ctx, a, b, prev, next):
        ctx.save_for_backward(a, b, prev, next)
        w = a.to(prev.dtype) * prev
        return w.add_(b.to(next.dtype) * next)

    @staticmethod
    def backward(ctx, grad):
        a, b, prev, next = ctx.saved_tensors
        need_a, need_b, need_prev, need_next = ctx.needs_input_grad
        flat = grad.reshape(-1)
        # .to(a): the scalars may live elsewhere than the weights (a 0-dim CPU tensor with CUDA weights)
        ga = torch.vdot(flat, prev.reshape(-1)).to(a).reshape(a.shape) if need_a else None
        gb = torch.vdot(flat, next.reshape(-1)).to(b).reshape(b.shape) if need_b else None
        gp = (grad * a.to(grad.dtype)).to(prev.dtype) if need_prev else None
        gn = (grad * b.to(grad.dtype)).to(next.dtype) if need_next else None
        return ga, gb, gp, gn


def call_with_params(module: nn.Module, params: dict, *args, **kwargs):
    """Run a leaf module with the given tensors in its (emptied) parameter slots."""
    return torch.func.functional_call(module, dict(params), args, kwargs)


# ---------------------------------------------------------------- choosing units


def select_units(runs: Sequence[Run], *, every: int = 2, units: Sequence[str] | None = None,
                 max_fraction: float | None = None, total_params: int | None = None,
                 init: str = "half", neighbor_grad: bool = False) -> list[ReplaceStep]:
    """Choose replaced units among the interior members of ``runs``.

    ``every`` keeps interior members ``0, K, 2K, ...`` of each run (K >= 2, so no two replaced units
    touch); ``units`` (globs) picks explicitly instead; ``max_fraction`` caps the share of the model's
    parameters that is replaced, taking units in order until the next would exceed it.
    """
    if every < 2:
        raise OptionError("every", every, "would replace a unit next to another replaced unit", "use 2 or more")
    if max_fraction is not None and not 0 < max_fraction <= 1:
        raise OptionError("max_fraction", max_fraction, "is outside (0, 1]", "give a fraction such as 0.25")
    neighbours = {}
    for run in runs:
        for i, member in enumerate(run.members[1:-1], start=1):
            neighbours[member] = (run.members[i - 1], run.members[i + 1], run.params_per_member, i - 1)
    if units:
        chosen = [u for u in neighbours if any(fnmatch.fnmatchcase(u, g) for g in units)]
        if not chosen:
            raise OptionError("units", list(units), "matches no replaceable unit",
                              "replaceable units: " + (", ".join(neighbours) or "none") + " (see `repconv inspect`)")
    else:
        chosen = [u for u, (_, _, _, idx) in neighbours.items() if idx % every == 0]
    chosen = _drop_overlaps(chosen, neighbours)
    steps, replaced = [], 0
    for unit in chosen:
        prev, next, n, _ = neighbours[unit]
        if max_fraction is not None and total_params and (replaced + n) / total_params > max_fraction + 1e-12:
            continue
        replaced += n
        steps.append(ReplaceStep(unit, prev, next, init=init, neighbor_grad=neighbor_grad))
    return steps


def _drop_overlaps(chosen: list[str], neighbours: dict) -> list[str]:
    """Keep units in order, dropping any that would touch or nest in one already kept (outer first)."""
    chosen = sorted(chosen, key=lambda u: (u.count("."), list(neighbours).index(u)))
    kept: list[str] = []

    def overlaps(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    for unit in chosen:
        prev, next, _, _ = neighbours[unit]
        if any(overlaps(unit, k) or overlaps(prev, k) or overlaps(next, k)
               or overlaps(neighbours[k][0], unit) or overlaps(neighbours[k][1], unit) for k in kept):
            continue
        kept.append(unit)
    order = list(neighbours)
    return sorted(kept, key=order.index)


# ---------------------------------------------------------------- initial scalars


def lstsq_scalars(target: Sequence[torch.Tensor], prev: Sequence[torch.Tensor],
                  next: Sequence[torch.Tensor]) -> tuple[float, float, float]:
    """Weight-space least squares ``min ||a*prev + b*next - target||``; returns (a, b, relative error)."""
    t = torch.cat([p.detach().flatten().double() for p in target])
    x = torch.stack([torch.cat([p.detach().flatten().double() for p in ps]) for ps in (prev, next)], dim=1)
    sol = torch.linalg.lstsq(x, t.unsqueeze(1)).solution.squeeze(1)
    err = (x @ sol - t).norm() / t.norm().clamp_min(1e-30)
    return float(sol[0]), float(sol[1]), float(err)


def initial_scalars(model: nn.Module, step: ReplaceStep) -> ReplaceStep:
    """Fill ``step.a``, ``step.b`` (and ``fit_error``) from its init rule, reading the original weights."""
    unit, prev, next = (model.get_submodule(p) for p in (step.unit, step.prev, step.next))
    params = [list(m.parameters()) for m in (unit, prev, next)]
    if step.init == "lstsq":
        step.a, step.b, step.fit_error = lstsq_scalars(*params)
    else:
        if step.init == "half":
            step.a, step.b = 0.5, 0.5
        t = torch.cat([p.detach().flatten() for p in params[0]])
        fit = torch.cat([(step.a * p.detach() + step.b * q.detach()).flatten()
                         for p, q in zip(params[1], params[2], strict=True)])
        step.fit_error = float((fit - t).norm() / t.norm().clamp_min(1e-30))
    return step


# ---------------------------------------------------------------- the fx rewrite


def apply_replacement(gm: fx.GraphModule, steps: Iterable[ReplaceStep]) -> fx.GraphModule:
    """Rewrite ``gm`` in place so each step's unit runs on synthesized weights."""
    for step in steps:
        _replace_unit(gm, step)
    gm.graph.lint()
    gm.recompile()
    return gm


def _replace_unit(gm: fx.GraphModule, step: ReplaceStep) -> None:
    unit = gm.get_submodule(step.unit)
    names = [n for n, _ in unit.named_parameters()]
    scalars_path = f"{step.unit}.{SCALARS_NAME}"
    gm.add_submodule(scalars_path, ReplacementScalars(step.unit, step.prev, step.next, names,
                                                      step.a, step.b, step.neighbor_grad))
    graph = gm.graph
    prefix = step.unit + "."
    cache: dict[str, fx.Node] = {}
    first = next(n for n in graph.nodes if n.op != "placeholder")

    def synthesized(rel: str) -> fx.Node:
        if rel not in cache:
            with graph.inserting_before(first):
                a = graph.get_attr(f"{scalars_path}.a")
                b = graph.get_attr(f"{scalars_path}.b")
                p = graph.get_attr(f"{step.prev}.{rel}")
                q = graph.get_attr(f"{step.next}.{rel}")
                cache[rel] = graph.call_function(synthesize, (a, b, p, q, step.neighbor_grad))
                cache[rel].name = graph._graph_namespace.create_name(f"synth_{step.unit}.{rel}", None)
        return cache[rel]

    for node in list(graph.nodes):
        if node.op == "call_module" and (node.target == step.unit or node.target.startswith(prefix)):
            leaf = gm.get_submodule(node.target)
            rel_leaf = "" if node.target == step.unit else node.target[len(prefix):]
            # the unit's own parameters only: when the unit is itself a leaf (VGG's bare Conv2d units),
            # the scalars module just added under it is a child whose a, b must stay as they are
            rel = {n: f"{rel_leaf}.{n}" if rel_leaf else n for n, _ in leaf.named_parameters()}
            leaf_params = [n for n, r in rel.items() if r in names]
            if not leaf_params:
                continue
            params = {n: synthesized(rel[n]) for n in leaf_params}
            with graph.inserting_before(node):
                module_ref = graph.get_attr(node.target)
                new = graph.call_function(call_with_params, (module_ref, params, *node.args), dict(node.kwargs))
            new.meta = dict(node.meta)
            new.meta["repconv_replaced_leaf"] = node.target
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif node.op == "get_attr" and node.target.startswith(prefix):
            rel = node.target[len(prefix):]
            if rel in names:
                node.replace_all_uses_with(synthesized(rel))
                graph.erase_node(node)

    for name in names:  # empty the unit's parameter slots; buffers stay
        owner_path, _, attr = name.rpartition(".")
        owner = unit.get_submodule(owner_path) if owner_path else unit
        owner._parameters[attr] = None


# ---------------------------------------------------------------- reading a converted model


def replaced_units(model: nn.Module) -> dict[str, ReplacementScalars]:
    """Unit path -> its scalars, for every replaced unit of a converted model."""
    return {m.unit: m for m in model.modules() if isinstance(m, ReplacementScalars)}


def synthesized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The replaced units' weights as the converted model computes them, keyed by full parameter name."""
    out = {}
    with torch.no_grad():
        for unit, s in replaced_units(model).items():
            prev, next = model.get_submodule(s.prev), model.get_submodule(s.next)
            pp, qq = dict(prev.named_parameters()), dict(next.named_parameters())
            for name in s.param_names:
                out[f"{unit}.{name}"] = synthesize(s.a, s.b, pp[name], qq[name]).detach().clone()
    return out


def scalar_names(model: nn.Module) -> list[str]:
    return [f"{u}.{SCALARS_NAME}.{p}" for u in replaced_units(model) for p in ("a", "b")]
