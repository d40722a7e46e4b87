import pytest
import torch
from torch import nn

from repconv.convert.graph import find_runs, propagate_shapes, trace
from repconv.errors import OptionError, TraceError


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.lin(x)
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.body = DataDependent()

    def forward(self, x):
        return self.body(self.pre(x))


def test_trace_error_names_module_line_and_leaf():
    with pytest.raises(TraceError) as info:
        trace(Outer())
    msg = str(info.value)
    assert "module 'body'" in msg and "DataDependent.forward" in msg
    assert "if x.sum() > 0" in msg and "opaque with leaves PATH" in msg and "\n" not in msg
    assert "opaque with --leaf PATH" in info.value.render("--leaf")  # the CLI's words


def test_leaf_makes_it_traceable_and_opaque():
    model = Outer().eval()
    gm = trace(model, leaves=["body"])
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), model(x))
    assert any(n.op == "call_module" and n.target == "body" for n in gm.graph.nodes)
    with pytest.raises(OptionError, match="leaves='nope' names no module"):
        trace(model, leaves=["nope"])


def test_trace_keeps_every_state_dict_key():
    import torchvision

    model = torchvision.models.googlenet(aux_logits=True, init_weights=False).eval()
    gm = trace(model)  # the aux heads are not called in eval mode
    assert set(gm.state_dict()) == set(model.state_dict())


def test_runs_skip_parameter_free_siblings(chain):
    runs = find_runs(chain)
    assert [r.members for r in runs] == [tuple(f"blocks.{i}" for i in range(5))]
    assert runs[0].interior == ("blocks.1", "blocks.2", "blocks.3")
    seq = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.Dropout(), nn.Linear(3, 3), nn.Linear(3, 2))
    assert [r.members for r in find_runs(seq)] == [("0", "2", "4")]


def test_runs_of_resnet50_and_vit():
    import torchvision

    with torch.device("meta"):
        r50 = torchvision.models.resnet50()
        vit = torchvision.models.vit_b_16()
    runs = {r.container: r.members for r in find_runs(r50)}
    assert runs["layer3"] == tuple(f"layer3.{i}" for i in range(1, 6))  # layer3.0 has the downsample
    vit_runs = find_runs(vit)
    assert len(vit_runs[0].members) == 12


def test_shape_propagation(chain):
    gm = propagate_shapes(trace(chain), torch.randn(3, 4))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["tensor_meta"].shape) == (3, 3)


class _ConstantInForward(nn.Module):
    """Creates a tensor in forward, as torchvision's maxvit_t does: fx stores it as _tensor_constant{i}."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + torch.arange(4.0).view(1, 4, 1, 1)


def test_tracing_twice_names_constants_alike_and_leaves_the_model_alone():
    model = _ConstantInForward()
    first, second = trace(model), trace(model)
    assert not any(name.startswith("_tensor_constant") for name in vars(model))
    assert list(first.state_dict()) == list(second.state_dict())  # a saved trace fits a later one
    assert any(k.startswith("_tensor_constant") for k in first.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(first(x), model(x))
