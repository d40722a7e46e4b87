"""The hand-written synthesis backward (``Synthesis``) against plain autograd (``synthesize_autograd``)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from repconv.convert.replacement import Synthesis, synthesize, synthesize_autograd


def _inputs(shape, dtype=torch.float64, neighbours=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    b = torch.tensor(-1.7, dtype=dtype, requires_grad=True)
    prev = torch.randn(shape, generator=g, dtype=dtype, requires_grad=neighbours)
    nxt = torch.randn(shape, generator=g, dtype=dtype, requires_grad=neighbours)
    return a, b, prev, nxt


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (5, 7), (6,)])
def test_gradcheck_double(shape):
    inputs = _inputs(shape)
    assert torch.autograd.gradcheck(Synthesis.apply, inputs)
    a, b, prev, nxt = _inputs(shape, neighbours=False)
    assert torch.autograd.gradcheck(lambda a, b: Synthesis.apply(a, b, prev, nxt), (a, b))


@pytest.mark.parametrize("neighbor_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_same_values_and_gradients_as_autograd(neighbor_grad, dtype):
    shape = (16, 8, 3, 3)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    results = []
    for fn in (lambda *t: synthesize(*t, neighbor_grad=neighbor_grad),
               lambda a, b, p, q: synthesize_autograd(a, b, *((p, q) if neighbor_grad else (p.detach(), q.detach())))):
        a, b, prev, nxt = _inputs(shape, dtype=dtype, neighbours=True)
        w = fn(a, b, prev, nxt)
        (w * upstream).sum().backward()
        results.append((w.detach(), a.grad, b.grad, prev.grad, nxt.grad))
    (w1, ga1, gb1, gp1, gn1), (w2, ga2, gb2, gp2, gn2) = results
    assert torch.equal(w1, w2)  # the forward is bit-identical
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(ga1, ga2, **tol)
    torch.testing.assert_close(gb1, gb2, **tol)
    if neighbor_grad:
        torch.testing.assert_close(gp1, gp2, **tol)
        torch.testing.assert_close(gn1, gn2, **tol)
    else:  # detached neighbours get nothing in either implementation
        assert gp1 is gp2 is gn1 is gn2 is None


def test_synthesize_uses_the_function_only_for_gradients():
    a, b, prev, nxt = _inputs((3, 3))
    assert synthesize(a, b, prev, nxt).grad_fn.name().endswith("SynthesisBackward")
    with torch.no_grad():
        assert synthesize(a, b, prev, nxt).grad_fn is None
    plain = synthesize(a.detach(), b.detach(), prev, nxt)
    assert plain.grad_fn is None


class _CountAllocations(TorchDispatchMode):
    """Counts the non-scalar tensors aten ops allocate (views and in-place results share an input's storage)."""

    def __init__(self):
        super().__init__()
        self.big = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        storages = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > 1 and t.untyped_storage().data_ptr() not in storages:
                self.big += 1
        return out


def test_function_allocates_fewer_weight_shaped_tensors():
    counts = {}
    for name, fn in (("function", Synthesis.apply), ("autograd", synthesize_autograd)):
        a, b, prev, nxt = _inputs((64, 32, 3, 3), dtype=torch.float32, neighbours=False)
        upstream = torch.ones(64, 32, 3, 3)
        with _CountAllocations() as mode:
            fn(a, b, prev, nxt).backward(upstream)
        counts[name] = mode.big
    assert counts["function"] == 2 and counts["autograd"] >= 5, counts


def test_scalar_gradients_keep_the_scalars_dtype():
    a = torch.tensor(0.5, requires_grad=True)  # float32 scalars, float64 weights
    b = torch.tensor(0.25, requires_grad=True)
    prev, nxt = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    w = synthesize(a, b, prev, nxt)
    assert w.dtype == torch.float64
    w.sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32 and a.grad.shape == ()
    torch.testing.assert_close(a.grad, prev.sum().float())
    torch.testing.assert_close(b.grad, nxt.sum().float())
