"""Folding: a converted model becomes a plain one that needs no repconv at deployment.

* :func:`folded_state_dict` evaluates every replaced unit's ``a * P_prev + b * P_next`` once and puts it
  under the unit's own parameter names; for a replacement-only plan the result is exactly the original
  architecture's state_dict.
* :func:`fuse_conv_bn` folds BatchNorm into the convolution before it, for ``nn.BatchNorm*`` modules
  and for functional ``F.batch_norm`` calls (timm's ``BatchNormAct2d`` traces to one). Unlike
  ``torch.fx.experimental.optimization.fuse`` it never changes a module in place: a conv called from
  more than one place keeps its original weights for the other call sites.
* :func:`compare` measures how far two models' outputs are apart on the same inputs
  (:class:`repconv.onnx_graph.Parity`, the one parity measure of every check).

The math is ``torch.nn.utils.fusion.fuse_conv_bn_weights``; every fused tensor is a new tensor.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.operator_schemas import normalize_function
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils.fusion import fuse_conv_bn_weights

from repconv.convert.graph import RepconvTracer, trace
from repconv.convert.replacement import SCALARS_NAME, replaced_units, synthesized_state
from repconv.onnx_graph import Parity, parity

# ---------------------------------------------------------------- replacement folding


def folded_state_dict(converted: nn.Module) -> dict[str, torch.Tensor]:
    """The converted model's state_dict with each replaced unit's synthesized weights as plain tensors.

    The ``<unit>.replacement.a`` / ``.b`` scalars are dropped. Keys of a replacement-only plan are then
    exactly the original architecture's.
    """
    units = replaced_units(converted)
    scalar_prefixes = tuple(f"{u}.{SCALARS_NAME}." for u in units)
    state = {k: v.detach().clone() for k, v in converted.state_dict().items() if not k.startswith(scalar_prefixes)}
    state.update(synthesized_state(converted))  # new tensors, computed as the converted model computes them
    return state


# ---------------------------------------------------------------- conv + BN fusion


@dataclass
class FusionReport:
    """Which BatchNorms were folded into a conv, and which were left and why."""

    fused: list[dict] = field(default_factory=list)  # {"bn", "conv", "form": module|functional, "into"}
    unfused: list[dict] = field(default_factory=list)  # {"bn", "reason"}

    @property
    def total(self) -> int:
        return len(self.fused) + len(self.unfused)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


_FUNCTIONAL_BN = (F.batch_norm, torch.batch_norm)


@dataclass
class _BNCall:
    name: str
    form: str
    mean: torch.Tensor | None
    var: torch.Tensor | None
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    training: bool


def _bn_call(node: fx.Node, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> _BNCall | None:
    """A BatchNorm call (module or functional) at ``node``, with its tensors; None for any other node."""
    if node.op == "call_module" and _plain_batch_norm(modules.get(node.target)):
        bn = modules[node.target]
        return _BNCall(node.target, "module", bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias,
                       bn.training or not bn.track_running_stats)
    if node.op != "call_function" or node.target not in _FUNCTIONAL_BN:
        return None
    normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    kw = normalized.kwargs if normalized else {}

    def tensor(key: str) -> torch.Tensor | str | None:
        value = kw.get(key)
        if value is None:
            return None
        if isinstance(value, fx.Node) and value.op == "get_attr":
            return _get_attr(gm, value.target)
        return "dynamic"

    values = {k: tensor(k) for k in ("running_mean", "running_var", "weight", "bias")}
    training = kw.get("training", False)
    if any(isinstance(v, str) for v in values.values()) or not isinstance(training, bool):
        training = True  # computed at run time: cannot be treated as constant statistics
    mean_node = kw.get("running_mean")
    name = _attr_owner(mean_node.target) if isinstance(mean_node, fx.Node) and mean_node.op == "get_attr" \
        else node.name
    return _BNCall(name, "functional", values["running_mean"], values["running_var"], float(kw.get("eps", 1e-5)),
                   values["weight"], values["bias"], training)


def _plain_batch_norm(module: nn.Module | None) -> bool:
    return isinstance(module, _BatchNorm) and type(module).forward is _BatchNorm.forward


def _inline_custom_batch_norms(gm: fx.GraphModule) -> None:
    """Trace into BatchNorm subclasses with a forward of their own (timm's ``BatchNormAct2d``: batch norm,
    dropout, activation) so that their functional ``F.batch_norm`` becomes visible to fusion."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        module = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(module, _BatchNorm) or _plain_batch_norm(module):
            continue
        sub = RepconvTracer().trace(module)
        args = iter(node.args)
        values: dict[fx.Node, object] = {}
        result = None
        with gm.graph.inserting_before(node):
            for inner in sub.nodes:
                if inner.op == "placeholder":
                    values[inner] = next(args, node.kwargs.get(inner.target))
                elif inner.op == "output":
                    result = fx.node.map_arg(inner.args[0], values.__getitem__)
                else:
                    copied = gm.graph.node_copy(inner, values.__getitem__)
                    if copied.op in ("get_attr", "call_module"):
                        copied.target = f"{node.target}.{inner.target}"
                    values[inner] = copied
        node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
    gm.recompile()


def _drop_unused_tensors(gm: fx.GraphModule, owners: Iterable[str]) -> None:
    """Empty the parameter and buffer slots of fused BatchNorms that the graph no longer reads."""
    read = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for owner in owners:
        try:
            module = gm.get_submodule(owner)
        except AttributeError:
            continue
        if owner in read:
            continue
        for slots in (module._parameters, module._buffers):
            for attr in list(slots):
                if f"{owner}.{attr}" not in read:
                    slots[attr] = None


def _get_attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _attr_owner(target: str) -> str:
    return target.rpartition(".")[0] or target


def _why_not(src, bn: _BNCall, modules: dict[str, nn.Module]) -> str | None:
    """Why the BN at ``bn`` cannot fold into its input ``src``; None when it can."""
    if bn.training:
        return "it runs in training mode or has no running statistics"
    if bn.mean is None or bn.var is None:
        return "it has no running statistics"
    if not isinstance(src, fx.Node):
        return "its input is not a graph value"
    if src.op == "call_function" and getattr(src.target, "__name__", "") in ("conv1d", "conv2d", "conv3d"):
        return "its input is a functional convolution (not a module), which this pass does not rewrite"
    if src.op != "call_module" or not isinstance(modules.get(src.target), _ConvNd):
        what = src.target if src.op == "call_module" else getattr(src.target, "__name__", str(src.target))
        kind = type(modules[src.target]).__name__ if src.op == "call_module" else src.op
        return f"its input is not a convolution ({kind} {what})"
    conv = modules[src.target]
    if conv.weight is None:
        return f"conv '{src.target}' has no weight of its own (fold the model first)"
    others = [u for u in src.users if not _reads_metadata_only(u)]
    if len(others) > 1:
        return f"the output of conv '{src.target}' also feeds {len(others) - 1} other node(s)"
    if conv.out_channels != bn.mean.numel():
        return f"conv '{src.target}' has {conv.out_channels} output channels, the BN {bn.mean.numel()}"
    return None


def _reads_metadata_only(node: fx.Node) -> bool:
    """A use that reads only shape-like facts (timm asserts ``x.ndim == 4``), which fusion keeps intact."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("ndim", "shape", "dtype", "device")
    return node.op == "call_method" and node.target in ("size", "dim")


def _fused_conv(conv: _ConvNd, bn: _BNCall) -> _ConvNd:
    """A new conv module computing conv followed by ``bn`` (the input conv is left as it was)."""
    fused = copy.deepcopy(conv)
    weight, bias = fuse_conv_bn_weights(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                                        bn.mean, bn.var, bn.eps, bn.weight, bn.bias,
                                        transpose=isinstance(conv, _ConvTransposeNd))
    fused.weight, fused.bias = weight, bias
    return fused


def _set_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    owner, _, attr = path.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, attr, module)


def _free_name(modules: dict[str, nn.Module], base: str) -> str:
    k = 1
    while f"{base}_fused{k}" in modules:
        k += 1
    return f"{base}_fused{k}"


def fuse_conv_bn(model: nn.Module, leaves: Iterable[str] = ()) -> tuple[fx.GraphModule, FusionReport]:
    """A copy of ``model`` (eval mode) with every BatchNorm that directly follows a conv folded into it.

    ``model`` itself is not changed. A conv called from one place is replaced at its own path; a conv
    called from several places (a shared module) gets a new fused module for each fused call site,
    so its other callers keep the unfused weights.
    """
    if replaced_units(model):
        raise ValueError("fuse_conv_bn needs a folded model: fold the replaced units first")
    source = copy.deepcopy(model).eval()
    gm = source if isinstance(source, fx.GraphModule) else trace(source, leaves)
    gm.eval()
    _inline_custom_batch_norms(gm)
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    report = FusionReport()
    for node in list(gm.graph.nodes):
        bn = _bn_call(node, gm, modules)
        if bn is None:
            continue
        src = node.args[0] if node.args else node.kwargs.get("input")
        reason = _why_not(src, bn, modules)
        if reason:
            report.unfused.append({"bn": bn.name, "form": bn.form, "reason": reason})
            continue
        conv_path = src.target
        fused = _fused_conv(modules[conv_path], bn)
        if calls[src.target] == 1:
            into = src.target
            _set_submodule(gm, into, fused)
        else:  # shared conv: a new module for this call site only
            into = _free_name(modules, src.target)
            gm.add_submodule(into, fused)
            calls[src.target] -= 1
            src.target = into
        modules[into] = fused
        report.fused.append({"bn": bn.name, "conv": conv_path, "form": bn.form, "into": into})
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    _drop_unused_tensors(gm, [f["bn"] for f in report.fused if f["form"] == "functional"])
    report.unfused += _hidden_batch_norms(gm, leaves)
    return gm, report


def _hidden_batch_norms(gm: fx.GraphModule, leaves: Iterable[str]) -> list[dict]:
    """BatchNorms inside opaque (--leaf) modules, which the graph cannot see."""
    out = []
    for leaf in leaves:
        try:
            module = gm.get_submodule(leaf)
        except AttributeError:
            continue
        out += [{"bn": f"{leaf}.{n}", "form": "module", "reason": f"it is inside the opaque module '{leaf}'"}
                for n, m in module.named_modules() if isinstance(m, _BatchNorm)]
    return out


# ---------------------------------------------------------------- parity


def compare(reference: nn.Module, candidate: nn.Module, inputs: Sequence[torch.Tensor]) -> Parity:
    """Run both models (eval mode, no grad) on each input batch; the worst error over all of them."""
    reference.eval()
    candidate.eval()
    with torch.no_grad():
        results = [parity(reference(x), candidate(x)) for x in inputs]
    worst = results[0]
    for r in results[1:]:
        worst = worst.worst(r)
    return worst


def has_trivial_bn_statistics(model: nn.Module) -> bool:
    """True when every BatchNorm still has its initial statistics (mean 0, var 1): a parity check then
    cannot see BN-folding mistakes."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    return bool(bns) and all(bool((m.running_mean == 0).all() and (m.running_var == 1).all()) for m in bns)
