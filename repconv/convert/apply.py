"""Apply a whole plan to a traced model: the one place both passes are put together."""

from __future__ import annotations

from torch import fx, nn

from repconv.convert.plan import Plan
from repconv.convert.replacement import apply_replacement, initial_scalars


def apply_plan(gm: fx.GraphModule, plan: Plan, model_for_init: nn.Module | None = None) -> fx.GraphModule:
    """Rewrite ``gm`` in place: replacement steps first, then parameter-free steps.

    ``model_for_init`` holds the original weights; when given, each replace step's scalars are
    (re)computed from its init rule, otherwise the step's stored ``a``, ``b`` are used.
    """
    plan.validate(gm)
    steps = plan.replace_steps
    if model_for_init is not None:
        steps = [initial_scalars(model_for_init, s) for s in steps]
    if steps:
        apply_replacement(gm, steps)
    if plan.parameter_free_steps:
        from repconv.convert.parameter_free import apply_parameter_free

        apply_parameter_free(gm, plan.parameter_free_steps)
    gm.meta["repconv_plan"] = plan
    return gm
