"""torch.fx tracing, shape propagation and repeated-unit discovery."""

from __future__ import annotations

import copy
import importlib.util
import linecache
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from repconv.errors import OptionError, TraceError

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
# What fx names the tensors a forward creates (stored on the traced root); they belong to the graph, not the weights
FX_CONSTANT = re.compile(r"_tensor_constant\d+")


def _timm_leaves() -> tuple[set[type], set]:
    """timm's own no-trace modules and autowrapped functions, when timm is installed."""
    if importlib.util.find_spec("timm") is None:
        return set(), set()
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return set(), set()
    return set(getattr(timm_fx, "_leaf_modules", ())), set(getattr(timm_fx, "_autowrap_functions", ()))


class RepconvTracer(fx.Tracer):
    """fx tracer whose leaves are standard torch.nn modules, timm's no-trace modules and user paths."""

    def __init__(self, leaves: Iterable[str] = ()):
        leaf_types, autowrap = _timm_leaves()
        super().__init__(autowrap_functions=tuple(autowrap))
        self.leaf_paths = set(leaves)
        self.leaf_types = tuple(leaf_types)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths:
            return True
        if isinstance(m, _CONTAINERS):
            return False
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)


def _trace_location(model: nn.Module, tb) -> str:
    """Name the innermost module whose forward was running when tracing failed, and its line."""
    names = {id(m): n for n, m in model.named_modules()}
    found = ""
    while tb is not None:
        frame = tb.tb_frame
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            line = linecache.getline(frame.f_code.co_filename, tb.tb_lineno).strip()
            path = names[id(owner)] or "<root>"
            found = (f"in module '{path}' ({type(owner).__name__}.{frame.f_code.co_name}, "
                     f"{frame.f_code.co_filename}:{tb.tb_lineno}: {line})")
        tb = tb.tb_next
    return found


def trace(model: nn.Module, leaves: Iterable[str] = ()) -> fx.GraphModule:
    """Trace ``model`` (in eval mode) into a GraphModule that keeps every submodule of the original.

    fx drops modules the graph never calls (inception's aux head in eval mode, for one); they are
    re-attached so that the state_dict keys stay those of the original architecture.
    """
    leaves = list(leaves)
    known = dict(model.named_modules())
    for path in leaves:
        if path not in known:
            raise OptionError("leaves", path, "names no module of this model",
                              "use a dotted module path as shown by `repconv inspect`")
    was_training = model.training
    model.eval()
    tracer = RepconvTracer(leaves)
    attributes = set(vars(model))
    try:
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # fx raises many kinds: TraceError, TypeError, RuntimeError...
        where = _trace_location(model, sys.exc_info()[2])
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}: {first} {where}",
                         "mark that module opaque with {option} PATH (it will then not be rewritten)",
                         option="leaves") from exc
    finally:
        model.train(was_training)
        # fx parks tensors created in forward on the traced module as _tensor_constant{i}, numbered past the
        # ones already there: left in place, a second trace of the same model names them differently, and a
        # saved conversion no longer fits the model rebuilt at load time (torchvision maxvit_t)
        for name in set(vars(model)) - attributes:
            if FX_CONSTANT.fullmatch(name):
                delattr(model, name)
    _reattach_unused(gm, model)
    gm.train(was_training)
    gm.meta["repconv_leaves"] = leaves
    return gm


def _reattach_unused(gm: fx.GraphModule, model: nn.Module) -> None:
    present = dict(gm.named_modules())
    for path, module in model.named_modules():
        if not path or path in present:
            continue
        parent = path.rpartition(".")[0]
        if parent == "" or parent in present:
            gm.add_submodule(path, module)
            present.update({f"{path}.{n}" if n else path: m for n, m in module.named_modules()})
    have = set(gm.state_dict())
    for name, _tensor in model.state_dict().items():
        if name not in have:  # a parameter or buffer of a non-leaf module that the graph never read
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            source = model.get_submodule(owner_path) if owner_path else model
            if attr in source._parameters:
                owner.register_parameter(attr, source._parameters[attr])
            else:
                owner.register_buffer(attr, source._buffers[attr])


def example_input(input_size: Sequence[int], batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_size, generator=g)


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """Record ``tensor_meta`` (shape, dtype) on every node."""
    was_training = gm.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    gm.train(was_training)
    return gm


def module_output_shapes(gm: fx.GraphModule, paths: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """The output shape of each module path, read from the last node inside it (after propagate_shapes)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.op != "call_module" or meta is None or not hasattr(meta, "shape"):
            continue
        for path in paths:
            if node.target == path or node.target.startswith(path + "."):
                shapes[path] = tuple(meta.shape)
    return shapes


# ---------------------------------------------------------------- repeated units


@dataclass(frozen=True)
class Run:
    """Consecutive siblings of one container with identical parameter names and shapes."""

    container: str
    members: tuple[str, ...]
    params_per_member: int

    @property
    def interior(self) -> tuple[str, ...]:
        return self.members[1:-1]


def param_signature(module: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def find_runs(model: nn.Module, opaque: Iterable[str] = ()) -> list[Run]:
    """Every run of at least two repeated units, at every depth of the module tree.

    Parameter-free siblings (activations, pooling, dropout) do not break a run. Children of an
    opaque module (a ``--leaf``) are not looked into: they cannot be rewritten.
    """
    opaque = tuple(opaque)
    runs: list[Run] = []
    for path, container in model.named_modules():
        if any(path == o or path.startswith(o + ".") for o in opaque):
            continue
        current: list[str] = []
        signature = None
        for name, child in container.named_children():
            sig = param_signature(child)
            if not sig:
                continue
            child_path = f"{path}.{name}" if path else name
            if sig == signature:
                current.append(child_path)
                continue
            if len(current) >= 2:
                runs.append(Run(path, tuple(current), _count(model, current[0])))
            current, signature = [child_path], sig
        if len(current) >= 2:
            runs.append(Run(path, tuple(current), _count(model, current[0])))
    return runs


def _count(model: nn.Module, path: str) -> int:
    return sum(p.numel() for p in model.get_submodule(path).parameters())


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (CPU for a model without parameters): batches read from a dataset on the
    CPU are moved there before a forward."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward (torch.utils.flop_counter; a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example)
    model.train(was_training)
    return int(counter.get_total_flops())


def clone_module(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
