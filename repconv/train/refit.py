"""Least-squares refit: after a parameter-free conversion, each converted unit's nearest linear layer is solved in
closed form so that the unit reproduces the teacher's features (the reconstruction step of channel pruning, He et
al. 2017, and ThiNet, Luo et al. 2017, applied to the layer that reads the new pool).

Where the fit lands, per parameter-free step (found on the converted graph):

* ``pool`` followed by a batch norm (a depthwise conv that became a pool; the norm stays): a per-channel
  affine ``a * pool + b`` fitted to the teacher's conv output, folded exactly into that norm;
* ``pool`` followed by a conv (a bottleneck's 3x3 conv + BN + ReLU that became a pool, read by its 1x1 conv):
  that conv's weights (and its bias, or the following norm's mean) fitted to the teacher's output of the same conv;
* ``avgpool_conv`` (a stride-2 conv now reading a 2x2 average): the kept conv's weights fitted to the teacher's
  stride-2 output.

The fits run in plan order, each on the *student's* current input (so a fit corrects what the units before it
changed) against the teacher's feature at the same place, accumulating Gram matrices over ``batches`` batches;
each solve is a ridge-regularised normal equation. Every 4th image is held out: the ridge is the one of
:data:`RIDGES` with the lowest held-out error, and a layer is changed only if that error is below the layer's
own (a layer with more unknowns than samples, such as resnet50's last stage on 32px images, would otherwise
interpolate the fit batches and generalise badly); the accepted fit is then solved again on all images.
Steps whose op is followed by anything else (a token mixer, a nonlinearity) are left alone and reported.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import fx, nn
from torch.nn import functional as F

from repconv.convert.plan import ParameterFreeStep, Plan
from repconv.errors import DataError, NothingToReplace, PlanError
from repconv.train.local import image_batches, plan_of

FitKind = Literal["norm_affine", "conv"]
FORMS = ("pool", "avgpool_conv")  # the parameter-free forms whose next layer can be refitted
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # tried per layer; the one with the lowest held-out error is used
HOLDOUT_EVERY = 4  # every 4th image of each batch is held out to choose the ridge and to accept the fit
_BN = nn.modules.batchnorm._BatchNorm


@dataclass
class FitSite:
    """One layer to solve: ``module`` (a path of the student) reads the converted op's output."""

    step: str  # the plan step's target
    module: str
    kind: FitKind
    target: Literal["input", "output"]  # which teacher tensor at ``module``'s path is the goal
    bias_into: str | None = None  # a batch norm that absorbs the fitted constant (conv without bias)


@dataclass
class SiteResult:
    step: str
    module: str
    kind: str
    error_before: float  # relative error ||y - t||^2 / ||t||^2 of the layer's output on the fit batches
    error_after: float
    heldout_before: float | None = None  # the same on the held-out images, which chose the ridge
    heldout_after: float | None = None
    ridge: float | None = None  # None: no ridge beat the layer as it was on held-out images (left unchanged)
    samples: int = 0  # positions the fit saw per group (images x output positions)
    unknowns: int = 0  # inputs per group + 1


@dataclass
class RefitResult:
    sites: list[SiteResult]
    skipped: list[str] = field(default_factory=list)  # step targets with no layer to fit
    images: int = 0
    seconds: float = 0.0

    @property
    def mean_error_before(self) -> float:
        return sum(s.error_before for s in self.sites) / max(len(self.sites), 1)

    @property
    def mean_error_after(self) -> float:
        return sum(s.error_after for s in self.sites) / max(len(self.sites), 1)

    def to_dict(self) -> dict:
        return asdict(self) | {"mean_error_before": self.mean_error_before, "mean_error_after": self.mean_error_after}


def has_pools(plan: Plan | None) -> bool:
    """Whether ``plan`` has a parameter-free step the refit can work on."""
    return plan is not None and any(s.form in FORMS for s in plan.parameter_free_steps)


# ---------------------------------------------------------------- where each fit lands


def _sole_module_user(gm: fx.GraphModule, node: fx.Node) -> tuple[str, nn.Module] | None:
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    return users[0].target, gm.get_submodule(users[0].target)


def fit_sites(student: fx.GraphModule, steps: Sequence[ParameterFreeStep]) -> tuple[list[FitSite], list[str]]:
    """The layer each step's fit lands on, and the steps that have none."""
    calls = {n.target: n for n in student.graph.nodes if n.op == "call_module"}
    sites, skipped = [], []
    for step in steps:
        node = calls.get(step.target)
        if node is None or step.form not in FORMS:
            skipped.append(step.target)
            continue
        if step.form == "avgpool_conv":
            sites.append(FitSite(step.target, step.target, "conv", "output", _bias_norm(student, node)))
            continue
        user = _sole_module_user(student, node)
        if user and isinstance(user[1], _BN):
            sites.append(FitSite(step.target, user[0], "norm_affine", "input"))
        elif user and isinstance(user[1], nn.Conv2d):
            sites.append(FitSite(step.target, user[0], "conv", "output", _bias_norm(student, calls[user[0]])))
        else:
            skipped.append(step.target)
    return sites, skipped


def _bias_norm(gm: fx.GraphModule, conv_node: fx.Node) -> str | None:
    if gm.get_submodule(conv_node.target).bias is not None:
        return None
    user = _sole_module_user(gm, conv_node)
    return user[0] if user and isinstance(user[1], _BN) else None


# ---------------------------------------------------------------- features and solves


def _features(site: FitSite, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(groups, positions, inputs per group) features of ``x`` as ``layer`` reads it, and the group count."""
    if site.kind == "norm_affine":
        c = x.shape[1]
        return x.transpose(0, 1).reshape(c, -1, 1), c
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, Cin*k*k, L)
    g = layer.groups
    n, d, positions = cols.shape
    return cols.view(n, g, d // g, positions).permute(1, 0, 3, 2).reshape(g, n * positions, d // g), g


def _targets(y: torch.Tensor, groups: int) -> torch.Tensor:
    n, c = y.shape[:2]
    return y.reshape(n, groups, c // groups, -1).permute(1, 0, 3, 2).reshape(groups, -1, c // groups)


class _Normal:
    """Running ``X^T X`` and ``X^T Y`` per group, with a constant feature appended."""

    def __init__(self):
        self.xtx = self.xty = self.yty = None
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = torch.cat([x, torch.ones_like(x[..., :1])], -1).double()
        y = y.double()
        xtx, xty, yty = x.transpose(1, 2) @ x, x.transpose(1, 2) @ y, (y * y).sum((1, 2))
        if self.xtx is None:
            self.xtx, self.xty, self.yty = xtx, xty, yty
        else:
            self.xtx += xtx
            self.xty += xty
            self.yty += yty
        self.count += x.shape[1]

    def merge(self, other: _Normal) -> None:
        self.xtx, self.xty, self.yty = self.xtx + other.xtx, self.xty + other.xty, self.yty + other.yty
        self.count += other.count

    def error(self, w: torch.Tensor) -> float:
        """Relative residual of ``X w`` against ``Y`` over all groups."""
        resid = self.yty - 2 * (w * self.xty).sum((1, 2)) + (w * (self.xtx @ w)).sum((1, 2))
        return float(resid.sum().clamp_min(0) / self.yty.sum().clamp_min(1e-30))

    def solve(self, ridge: float, with_constant: bool) -> torch.Tensor:
        xtx, xty = self.xtx.clone(), self.xty.clone()
        if not with_constant:  # the constant feature is pinned to 0
            xtx[:, -1, :], xtx[:, :, -1], xty[:, -1, :] = 0, 0, 0
            xtx[:, -1, -1] = 1
        diag = xtx.diagonal(dim1=1, dim2=2)
        lam = ridge * diag[:, :-1].mean(1, keepdim=True).clamp_min(1e-12)
        reg = torch.zeros_like(diag)
        reg[:, :-1] = lam
        return torch.linalg.solve(xtx + torch.diag_embed(reg), xty)


def _current(site: FitSite, layer: nn.Module, groups: int) -> torch.Tensor:
    """The layer's present map as (groups, inputs per group + 1, outputs per group)."""
    if site.kind == "norm_affine":
        return torch.stack([torch.ones(groups), torch.zeros(groups)], 1).view(groups, 2, 1).double()
    w = layer.weight.detach().double()
    cout = w.shape[0]
    w = w.reshape(groups, cout // groups, -1).transpose(1, 2)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(cout, dtype=torch.double,
                                                                                 device=w.device)
    return torch.cat([w, b.reshape(groups, 1, cout // groups)], 1)


def _apply(site: FitSite, student: nn.Module, w: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> None:
    layer = student.get_submodule(site.module)
    with torch.no_grad():
        if site.kind == "norm_affine":
            _fold_affine(layer, w[:, 0, 0], w[:, 1, 0], *stats)
            return
        cout = layer.weight.shape[0]
        weight, bias = w[:, :-1, :], w[:, -1, :].reshape(cout)
        layer.weight.copy_(weight.transpose(1, 2).reshape(layer.weight.shape).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(bias.to(layer.bias.dtype))
        elif site.bias_into:
            bn = student.get_submodule(site.bias_into)
            bn.running_mean.sub_(bias.to(bn.running_mean.dtype))


def _fold_affine(bn: nn.Module, a: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Make ``bn(p)`` equal the old ``bn(a * p + b)``, with running statistics those of ``p`` (so training in
    batch-statistics mode starts from the same function)."""
    old_scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)).double() / (
        bn.running_var.double() + bn.eps).sqrt()
    old_shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)).double() - old_scale * bn.running_mean
    k = old_scale * a  # the whole map is p -> k * p + c
    c = old_shift + old_scale * b
    new_std = (var + bn.eps).sqrt()
    bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
    bn.running_var.copy_(var.to(bn.running_var.dtype))
    if not bn.affine:
        raise PlanError(f"batch norm '{bn}' has no affine parameters to hold the fit", "use affine norms")
    bn.weight.copy_((k * new_std).to(bn.weight.dtype))
    bn.bias.copy_((c + k * mean).to(bn.bias.dtype))


# ---------------------------------------------------------------- the stage


def least_squares_refit(student: fx.GraphModule, teacher: nn.Module, data, *, plan: Plan | None = None,
                        batches: int = 8, batch_size: int = 64,
                        ridges: Sequence[float] = RIDGES) -> RefitResult:
    """Solve, in plan order, the linear layer that reads each converted op (see the module docstring), in place.

    ``data``: unlabeled images (a dataset, a list of batches or a tensor); the first ``batches`` batches are used.
    """
    plan = plan_of(student, plan)
    steps = [s for s in plan.steps if isinstance(s, ParameterFreeStep)]
    if not steps:
        raise NothingToReplace("the plan has no parameter-free step, so there is nothing to refit", "convert first")
    sites, skipped = fit_sites(student, steps)
    xs = list(itertools.islice(image_batches(data, batch_size, shuffle=True), batches))
    if not xs:
        raise DataError("least-squares refit got no images", "give a folder or dataset with images")
    started = time.perf_counter()
    teacher.eval()
    student.eval()
    results = []
    for site in sites:
        results.append(_refit_site(site, student, teacher, xs, ridges))
    return RefitResult(results, skipped, sum(len(x) for x in xs), round(time.perf_counter() - started, 3))


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


def _captured(model: nn.Module, module: nn.Module, which: Literal["input", "output"], x: torch.Tensor) -> torch.Tensor:
    """``module``'s input or output when ``model`` runs on ``x``; the forward stops right after it."""
    got: list[torch.Tensor] = []

    def hook(mod, args, output):
        got.append((args[0] if which == "input" else output).detach())
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise PlanError(f"the model never ran '{module.__class__.__name__}' on its forward", "check the plan")
    return got[0]


def _refit_site(site: FitSite, student: nn.Module, teacher: nn.Module, xs: list[torch.Tensor],
                ridges: Sequence[float]) -> SiteResult:
    layer = student.get_submodule(site.module)
    fit, check = _Normal(), _Normal()
    s_sum = s_sq = None
    count = 0
    for x in xs:
        p = _captured(student, layer, "input", x)
        t = _captured(teacher, teacher.get_submodule(site.module), site.target, x)
        held = torch.arange(len(x), device=p.device) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        for normal, rows in ((fit, ~held), (check, held)):
            if rows.any():
                feats, groups = _features(site, layer, p[rows])
                normal.add(feats, _targets(t[rows], groups))
        if site.kind == "norm_affine":
            p = p.double()
            s_sum = p.sum((0, 2, 3)) if s_sum is None else s_sum + p.sum((0, 2, 3))
            s_sq = (p * p).sum((0, 2, 3)) if s_sq is None else s_sq + (p * p).sum((0, 2, 3))
            count += p.numel() // p.shape[1]
    if fit.xtx is None or check.xtx is None:
        raise DataError(f"least-squares refit needs at least {HOLDOUT_EVERY} images (every {HOLDOUT_EVERY}th is held "
                        "out)", "give more images")
    with_constant = site.kind == "norm_affine" or layer.bias is not None or site.bias_into is not None
    current = _current(site, layer, fit.xtx.shape[0]).to(fit.xtx.device)
    fit_before, held_before = fit.error(current), check.error(current)
    best = min(((check.error(w), r, w) for r in ridges for w in [fit.solve(r, with_constant)]),
               key=lambda item: item[0])
    result = SiteResult(site.step, site.module, site.kind, fit_before, fit_before, held_before, held_before,
                        samples=fit.count, unknowns=fit.xtx.shape[1])
    if best[0] < held_before:  # better on images the fit did not see: solve again on all of them
        fit.merge(check)
        w = fit.solve(best[1], with_constant)
        stats = (s_sum / count, (s_sq / count - (s_sum / count) ** 2).clamp_min(0)) if count else (None, None)
        _apply(site, student, w, stats)
        result.error_after, result.heldout_after, result.ridge = fit.error(w), best[0], best[1]
        result.error_before = fit.error(current)
    return result
