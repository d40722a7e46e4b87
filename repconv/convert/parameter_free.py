"""Parameter-free layers (Han et al., ICLR 2022): spatial convolutions and attention become built-in pooling.

Targets are found on the traced graph:

* ``regular``: a Conv2d with a square kernel > 1, ``groups == 1`` (``grouped``: ``1 < groups < channels``),
  in == out channels and "same" padding ``k // 2``; the norm that directly follows it and the activation
  module that directly follows that norm are absorbed (the paper's R50-max: the pool replaces conv + BN + ReLU).
  The absorbed activation is a graph *node*: torchvision's Bottleneck calls one ``relu`` module three
  times, and only the call after ``bn2`` goes away.
* ``depthwise``: a Conv2d with ``groups == in == out`` channels; only the conv is replaced, its norm and
  activation stay (our choice: they are the block's only per-channel scaling around the pool).
* ``attention``: the self-attention of a torchvision ``VisionTransformer`` block (``nn.MultiheadAttention``)
  or a timm ``VisionTransformer`` block (``Attention``), replaced in every other block by :class:`TokenMixer`.

Each change is a :class:`ParameterFreeStep`, so a plan alone rebuilds the converted structure on a
freshly built model (the pass never reads weights except to initialise a token mixer's expansion).
"""

from __future__ import annotations

import copy
import fnmatch
import math
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn import functional as F

from repconv.convert.graph import trace
from repconv.convert.plan import ParameterFreeStep
from repconv.errors import NothingToReplace, OptionError, PlanError
from repconv.options import PfOp, PfPolicy, check_choice

POLICIES = typing.get_args(PfPolicy)
FORMS = ("pool", "avgpool_conv", "token_mixer")

_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm2d)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.Mish, nn.ELU, nn.PReLU)


@dataclass
class Target:
    """One place the pass can change."""

    path: str
    kind: str  # regular | grouped | depthwise | attention
    kernel: int = 3
    stride: int = 1
    absorbed: list[str] = field(default_factory=list)
    params: int = 0  # parameters the pool form removes (target + absorbed modules)
    options: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the operations


def make_pool(op: PfOp, kernel: int, stride: int, padding: int) -> nn.Module:
    check_choice("pf_op", op, PfOp)
    if op == "max":
        return nn.MaxPool2d(kernel, stride, padding)
    return nn.AvgPool2d(kernel, stride, padding, count_include_pad=False)


class TokenMixer(nn.Module):
    """``Linear(d, e*d) -> GELU -> tokens to an HxW grid -> pool(3, 1, 1) -> GELU -> Linear(e*d, d)``.

    Takes and returns ``(batch, tokens, d)``. The first ``prefix_tokens`` tokens (class / register
    tokens) bypass the pooling; the others must form a square grid.
    """

    def __init__(self, dim: int, expansion: int = 3, op: str = "max", prefix_tokens: int = 1):
        super().__init__()
        hidden = dim * expansion
        self.prefix_tokens = prefix_tokens
        self.fc1 = nn.Linear(dim, hidden)
        self.act1 = nn.GELU()
        self.pool = make_pool(op, 3, 1, 1)
        self.act2 = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.fc1(x))
        prefix, tokens = y[:, : self.prefix_tokens], y[:, self.prefix_tokens:]
        side = math.isqrt(tokens.shape[1])
        grid = self.pool(tokens.transpose(1, 2).unflatten(2, (side, side)))
        y = torch.cat([prefix, grid.flatten(2).transpose(1, 2)], dim=1)
        return self.fc2(self.act2(y))

    @torch.no_grad()
    def init_from(self, in_weight: torch.Tensor, in_bias: torch.Tensor | None,
                  out_weight: torch.Tensor, out_bias: torch.Tensor | None) -> None:
        """Expansion = the attention's input projection; contraction reads the value part through out_proj."""
        if in_weight.shape == self.fc1.weight.shape:
            self.fc1.weight.copy_(in_weight)
            self.fc1.bias.copy_(in_bias if in_bias is not None else torch.zeros_like(self.fc1.bias))
        dim = self.fc2.out_features
        if out_weight.shape == (dim, dim) and self.fc2.in_features == 3 * dim:
            self.fc2.weight.zero_()
            self.fc2.weight[:, 2 * dim:] = out_weight
            self.fc2.bias.copy_(out_bias if out_bias is not None else torch.zeros_like(self.fc2.bias))


# ---------------------------------------------------------------- finding targets


def _within(path: str, ancestors: Iterable[str]) -> bool:
    return any(path == a or path.startswith(a + ".") for a in ancestors)


def _calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def _conv_kind(conv: nn.Conv2d) -> str | None:
    k, s = conv.kernel_size, conv.stride
    if k[0] != k[1] or k[0] < 2 or s[0] != s[1] or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return None
    if conv.padding != (k[0] // 2, k[0] // 2) or conv.in_channels != conv.out_channels:
        return None
    if conv.groups == 1:
        return "regular"
    if conv.groups == conv.in_channels:
        return "depthwise"
    return "grouped"


def _sole_user_module(gm: fx.GraphModule, node: fx.Node, types: tuple[type, ...]) -> fx.Node | None:
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op == "call_module" and isinstance(gm.get_submodule(user.target), types) and user.args[:1] == (node,):
        return user
    return None


def _absorbed_chain(gm: fx.GraphModule, conv_node: fx.Node) -> list[str]:
    norm = _sole_user_module(gm, conv_node, _NORMS)
    if norm is None:
        return []
    act = _sole_user_module(gm, norm, _ACTIVATIONS)
    return [norm.target] + ([act.target] if act is not None else [])


def _attention_modules(model: nn.Module) -> tuple[str, int, type] | None:
    """(module path pattern, prefix tokens, attention type) when ``model`` is a known vision transformer."""
    from torchvision.models.vision_transformer import VisionTransformer as TvViT

    if isinstance(model, TvViT):
        return "encoder.layers.*.self_attention", 1, nn.MultiheadAttention
    try:
        from timm.layers import Attention
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError:
        return None
    if isinstance(model, TimmViT):
        return "blocks.*.attn", int(getattr(model, "num_prefix_tokens", 1)), Attention
    return None


def find_targets(model: nn.Module, *, exclude: Sequence[str] = (), leaves: Sequence[str] = (),
                 gm: fx.GraphModule | None = None) -> list[Target]:
    """Every parameter-free target of ``model``, in graph order."""
    gm = gm if gm is not None else trace(model, leaves)
    calls = _calls(gm)
    targets: list[Target] = []
    for path, nodes in calls.items():
        module = gm.get_submodule(path)
        if not isinstance(module, nn.Conv2d) or len(nodes) != 1 or _within(path, exclude):
            continue
        kind = _conv_kind(module)
        if kind is None:
            continue
        absorbed = [] if kind == "depthwise" else _absorbed_chain(gm, nodes[0])
        if _within_any(absorbed, exclude) or any(len(calls[a]) != 1 for a in absorbed[:1]):
            absorbed = []
        params = _params(gm, [path, *absorbed], calls)
        targets.append(Target(path, kind, module.kernel_size[0], module.stride[0], absorbed, params))
    targets += _attention_targets(model, gm, exclude)
    return targets


def _within_any(paths: Iterable[str], ancestors: Sequence[str]) -> bool:
    return any(_within(p, ancestors) for p in paths)


def _params(gm: fx.GraphModule, paths: Sequence[str], calls: dict[str, list[fx.Node]]) -> int:
    """Parameters of the modules at ``paths`` that the change removes (shared modules are kept)."""
    n = 0
    for i, path in enumerate(paths):
        if i > 0 and len(calls.get(path, [])) > 1:
            continue
        n += sum(p.numel() for p in gm.get_submodule(path).parameters())
    return n


def _attention_targets(model: nn.Module, gm: fx.GraphModule, exclude: Sequence[str]) -> list[Target]:
    found = _attention_modules(model)
    if found is None:
        return []
    pattern, prefix, attn_type = found
    targets = []
    for path, module in model.named_modules():  # gm holds plain containers for traced-through modules
        if isinstance(module, attn_type) and fnmatch.fnmatchcase(path, pattern) and not _within(path, exclude):
            try:
                _attention_region(gm, path)
            except PlanError:
                continue
            params = sum(p.numel() for p in module.parameters())
            targets.append(Target(path, "attention", 3, 1, [], params, {"prefix_tokens": prefix, "expansion": 3}))
    return targets


# ---------------------------------------------------------------- planning


def plan_parameter_free(model: nn.Module, policy: PfPolicy = "all", op: PfOp = "max",
                        units: Sequence[str] | None = None, exclude: Sequence[str] = (),
                        leaves: Sequence[str] = ()) -> list[ParameterFreeStep]:
    """The steps of a parameter-free conversion.

    ``policy`` says what each target becomes: ``all`` -> a pool with the conv's kernel and stride;
    ``hybrid`` -> stride-1 targets become pools, stride-s targets become AvgPool2d(s, s) before the
    pretrained conv at stride 1. Without ``units`` the policy takes every conv target and the attention
    of every other transformer block (1, 3, 5, ...); ``units`` (globs) picks targets explicitly.
    """
    check_choice("pf_policy", policy, PfPolicy)
    check_choice("pf_op", op, PfOp)
    targets = find_targets(model, exclude=exclude, leaves=leaves)
    if not targets:
        raise NothingToReplace(f"{type(model).__name__} has no parameter-free target (no spatial conv with in == out "
                               "channels and 'same' padding, no depthwise conv, no vision-transformer attention)",
                               "choose another model or the replacement method")
    if units:
        chosen = [t for t in targets if any(fnmatch.fnmatchcase(t.path, g) for g in units)]
        if not chosen:
            shown = ", ".join(t.path for t in targets[:6]) + (", ..." if len(targets) > 6 else "")
            raise OptionError("pf_units", list(units), "matches no parameter-free target",
                              f"targets are: {shown} (see `repconv inspect --method parameter-free`)")
    else:
        attention = [t for t in targets if t.kind == "attention"]
        chosen = [t for t in targets if t.kind != "attention" or attention.index(t) % 2 == 1]
    return [_step(t, policy, op) for t in chosen]


def _step(t: Target, policy: PfPolicy, op: PfOp) -> ParameterFreeStep:
    if t.kind == "attention":
        return ParameterFreeStep(t.path, "token_mixer", op, 3, 1, 1, [], dict(t.options))
    if policy == "hybrid" and t.stride > 1:
        return ParameterFreeStep(t.path, "avgpool_conv", "avg", t.stride, t.stride, 0, [], {"kind": t.kind})
    return ParameterFreeStep(t.path, "pool", op, t.kernel, t.stride, t.kernel // 2, list(t.absorbed),
                             {"kind": t.kind})


def describe_step(step: ParameterFreeStep | None) -> str:
    """Short text for what a step does (for `inspect`); ``-`` when there is no step."""
    if step is None:
        return "-"
    if step.form == "pool":
        return f"{step.op}pool{step.kernel}/s{step.stride}"
    if step.form == "avgpool_conv":
        return f"avgpool{step.kernel}/s{step.stride}+conv/s1"
    return f"token mixer ({step.op}pool3)"


# ---------------------------------------------------------------- the fx rewrite


def apply_parameter_free(gm: fx.GraphModule, steps: Iterable[ParameterFreeStep]) -> fx.GraphModule:
    """Rewrite ``gm`` in place, one step at a time."""
    for step in steps:
        if step.form not in FORMS:
            raise PlanError(f"parameter-free step for '{step.target}': unknown form '{step.form}'",
                            f"use one of {', '.join(FORMS)}")
        {"pool": _apply_pool, "avgpool_conv": _apply_avgpool_conv, "token_mixer": _apply_token_mixer}[step.form](
            gm, step)
    gm.graph.lint()
    gm.recompile()
    return gm


def _single_call(gm: fx.GraphModule, step: ParameterFreeStep) -> fx.Node:
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == step.target]
    if len(nodes) != 1:
        raise PlanError(f"parameter-free step: '{step.target}' is called {len(nodes)} times in the graph, not once",
                        "only a module called exactly once can be replaced")
    if not isinstance(gm.get_submodule(step.target), nn.Conv2d):
        raise PlanError(f"parameter-free step: '{step.target}' is a {type(gm.get_submodule(step.target)).__name__}, "
                        f"not a Conv2d", "fix the plan or regenerate it")
    return nodes[0]


def _apply_pool(gm: fx.GraphModule, step: ParameterFreeStep) -> None:
    node = _single_call(gm, step)
    chain, last = [], node
    for path in step.absorbed:
        users = list(last.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].target != path:
            raise PlanError(f"parameter-free step for '{step.target}': '{path}' does not directly follow "
                            f"'{last.target}' in the graph", "fix the plan's absorbed list or regenerate the plan")
        last = users[0]
        chain.append(last)
    gm.set_submodule(step.target, make_pool(step.op, step.kernel, step.stride, step.padding))
    if chain:
        chain[-1].replace_all_uses_with(node)
        for n in reversed(chain):
            gm.graph.erase_node(n)
    _delete_unused(gm, step.absorbed)


def _delete_unused(gm: fx.GraphModule, paths: Iterable[str]) -> None:
    """Delete modules no node refers to any more (a shared activation stays)."""
    used = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for path in paths:
        if not any(u == path or u.startswith(path + ".") for u in used):
            gm.delete_submodule(path)


def _apply_avgpool_conv(gm: fx.GraphModule, step: ParameterFreeStep) -> None:
    node = _single_call(gm, step)
    # count_include_pad=False: same values (no padding), and ONNX Runtime keeps the NCHWc layout around it
    with gm.graph.inserting_before(node):
        pooled = gm.graph.call_function(F.avg_pool2d, (node.args[0], step.kernel, step.stride, step.padding),
                                        {"ceil_mode": True, "count_include_pad": False})
    node.args = (pooled, *node.args[1:])
    conv = copy.copy(gm.get_submodule(step.target))  # shares the weights; the traced model's conv keeps its stride
    conv._parameters, conv._buffers = dict(conv._parameters), dict(conv._buffers)
    conv.stride = (1, 1)
    gm.set_submodule(step.target, conv)


def _attention_region(gm: fx.GraphModule, path: str) -> tuple[list[fx.Node], fx.Node, list[fx.Node]]:
    """(nodes of the attention, its one input node, the nodes whose uses become the mixer's output)."""
    region = [n for n in gm.graph.nodes
              if (n.op == "call_module" and _within(n.target, [path]))
              or (n.op == "get_attr" and _within(n.target, [path]))
              or (n.op != "call_module" and path in (n.meta.get("nn_module_stack") or {}))]
    members = set(region)
    if len(region) == 1 and isinstance(gm.get_submodule(path), nn.MultiheadAttention):
        # torchvision: attn(x, x, x, need_weights=False)[0]; the tuple's getitems are the outputs
        getters = list(region[0].users)
        if not all(g.op == "call_function" and g.target.__name__ == "getitem" for g in getters) or \
                any(g.args[1] != 0 and g.users for g in getters):
            raise PlanError(f"'{path}': the attention weights are used", "this attention cannot become a token mixer")
        region += getters
        members.update(getters)
        outputs = [g for g in getters if g.args[1] == 0]
    else:
        outputs = [n for n in region if any(u not in members for u in n.users)]
    # optional graph inputs such as timm's attn_mask / is_causal are not data: the mixer ignores them
    first_input = next(n for n in gm.graph.nodes if n.op == "placeholder")
    inputs = {a for n in region for a in n.all_input_nodes
              if a not in members and (a.op != "placeholder" or a is first_input)}
    if len(inputs) != 1 or len(outputs) != 1:
        raise PlanError(f"'{path}': the attention has {len(inputs)} inputs and {len(outputs)} outputs in the graph",
                        "only self-attention with one input and one output can become a token mixer")
    return region, next(iter(inputs)), outputs


def _apply_token_mixer(gm: fx.GraphModule, step: ParameterFreeStep) -> None:
    attn = gm.get_submodule(step.target)
    region, source, outputs = _attention_region(gm, step.target)
    if isinstance(attn, nn.MultiheadAttention):
        dim, weights = attn.embed_dim, (attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight,
                                        attn.out_proj.bias)
    else:  # timm Attention
        dim, weights = attn.qkv.in_features, (attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias)
    mixer = TokenMixer(dim, int(step.options.get("expansion", 3)), step.op, int(step.options.get("prefix_tokens", 1)))
    if weights[0] is not None:
        mixer.init_from(*weights)
    last = region[-1] if len(outputs) != 1 else outputs[0]
    with gm.graph.inserting_after(last):
        new = gm.graph.call_module(step.target, (source,))
    outputs[0].replace_all_uses_with(new)
    for n in reversed(region):
        gm.graph.erase_node(n)
    gm.set_submodule(step.target, mixer)
