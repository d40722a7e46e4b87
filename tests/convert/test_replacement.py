import copy

import pytest
import torch
from helpers import randomize_bn
from torch import nn

import repconv
from repconv.convert.graph import find_runs, trace
from repconv.convert.plan import ReplaceStep
from repconv.convert.replacement import (
    apply_replacement,
    initial_scalars,
    replaced_units,
    select_units,
    synthesized_state,
)
from repconv.errors import OptionError
from repconv.models import resolve_arch


def convert_chain(model, units, **kw):
    steps = select_units(find_runs(model), units=units, **kw)
    gm = trace(copy.deepcopy(model))  # the rewrite empties parameter slots: never on the caller's modules
    return apply_replacement(gm, [initial_scalars(model, s) for s in steps]), steps


def test_every_units_and_max_fraction():
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(9)])  # interior 1..7
    runs = find_runs(model)
    assert [s.unit for s in select_units(runs)] == ["1", "3", "5", "7"]
    assert [s.unit for s in select_units(runs, every=3)] == ["1", "4", "7"]
    assert [s.unit for s in select_units(runs, units=["[35]"])] == ["3", "5"]
    # 2 and 3 touch: the later one is dropped, never both
    assert [s.unit for s in select_units(runs, units=["2", "3"])] == ["2"]
    assert len(select_units(runs, max_fraction=2.5 / 9, total_params=9 * 42)) == 2
    with pytest.raises(OptionError, match="every=1"):
        select_units(runs, every=1)
    with pytest.raises(OptionError, match=r"matches no replaceable unit.*replaceable units: 1, 2"):
        select_units(runs, units=["blocks.*"])
    with pytest.raises(OptionError, match="outside"):
        select_units(runs, max_fraction=1.5)


def test_parameters_leave_buffers_stay_and_scalars_are_named():
    spec = resolve_arch("cifar_resnet32")
    model = randomize_bn(spec.build()).eval()
    gm, _ = convert_chain(model, ["layer2.2"])
    keys = set(gm.state_dict())
    assert "layer2.2.conv1.weight" not in keys and "layer2.2.bn1.weight" not in keys
    assert "layer2.2.bn1.running_mean" in keys  # statistics, not weights
    assert {"layer2.2.replacement.a", "layer2.2.replacement.b"} <= keys
    removed = sum(p.numel() for p in model.layer2[2].parameters())
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters()) - removed + 2


def test_lstsq_recovers_an_exact_linear_combination():
    spec = resolve_arch("cifar_resnet20")
    torch.manual_seed(0)
    model = randomize_bn(spec.build()).eval()
    a, b = 0.3, 0.7
    prev, unit, nxt = model.layer1[0], model.layer1[1], model.layer1[2]
    with torch.no_grad():
        for p, q, t in zip(prev.parameters(), nxt.parameters(), unit.parameters(), strict=True):
            t.copy_(a * p + b * q)
    gm, steps = convert_chain(model, ["layer1.1"], init="lstsq")
    assert steps[0].a == pytest.approx(a, abs=1e-6) and steps[0].b == pytest.approx(b, abs=1e-6)
    assert steps[0].fit_error < 1e-6
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (gm(x) - model(x)).abs().max() < 1e-5
    half, _ = convert_chain(model, ["layer1.1"], init="half")
    with torch.no_grad():
        assert (half(x) - model(x)).abs().max() > 1e-3  # the check above can fail


def test_gradients_reach_scalars_and_neighbours_only_on_request(chain):
    x = torch.randn(5, 4)
    grads = {}
    for neighbor_grad in (False, True):
        gm, _ = convert_chain(chain, ["blocks.2"], neighbor_grad=neighbor_grad)
        gm.train()
        gm(x).sum().backward()
        scal = replaced_units(gm)["blocks.2"]
        assert scal.a.grad is not None and scal.a.grad.abs() > 0
        grads[neighbor_grad] = gm.get_submodule("blocks.1.0").weight.grad
    # detached (default): the neighbour's gradient comes only from its own use, so the two differ
    assert not torch.allclose(grads[False], grads[True])


def test_synthesized_state_matches_forward(chain):
    gm, _ = convert_chain(chain, ["blocks.2"])
    with torch.no_grad():
        replaced_units(gm)["blocks.2"].a.fill_(0.2)
    state = synthesized_state(gm)
    expected = 0.2 * chain.blocks[1][0].weight + 0.5 * chain.blocks[3][0].weight
    assert torch.allclose(state["blocks.2.0.weight"], expected)


class WithOwnParam(nn.Module):
    """A unit that reads a parameter directly (fx get_attr), like timm's LayerScale."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gamma = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.lin(x) * self.gamma


def test_get_attr_parameters_are_synthesized():
    torch.manual_seed(0)
    model = nn.Sequential(*[WithOwnParam() for _ in range(3)]).eval()
    gm, _ = convert_chain(model, ["1"])
    assert not any(n.op == "get_attr" and n.target == "1.gamma" for n in gm.graph.nodes)
    with torch.no_grad():
        mid = nn.Sequential(model[0], WithOwnParam(), model[2])
        mid[1].lin.weight.copy_(0.5 * model[0].lin.weight + 0.5 * model[2].lin.weight)
        mid[1].lin.bias.copy_(0.5 * model[0].lin.bias + 0.5 * model[2].lin.bias)
        mid[1].gamma.copy_(0.5 * model[0].gamma + 0.5 * model[2].gamma)
        x = torch.randn(2, 4)
        assert torch.allclose(gm(x), mid(x), atol=1e-6)


def test_multihead_attention_units_round_trip(tmp_path):
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=5, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=4).eval()
    gm, steps = convert_chain(model, None, init="lstsq")
    assert [s.unit for s in steps] == ["encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_3"]
    folded = model.__class__(image_size=32, patch_size=8, num_layers=5, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=4).eval()
    sd = {k: v for k, v in gm.state_dict().items() if ".replacement." not in k} | synthesized_state(gm)
    folded.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gm(x), folded(x), atol=1e-5)


def test_convert_api_save_load_bit_exact(tmp_path):
    spec = resolve_arch("cifar_resnet32")
    torch.manual_seed(1)
    model = randomize_bn(spec.build(num_classes=10)).eval()
    path = tmp_path / "orig.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "conv.repconv.safetensors"
    result = repconv.convert(path, arch="cifar_resnet32", init="lstsq", output=out)
    assert result.summary.replaced_units == ["layer1.1", "layer1.3", "layer2.2", "layer3.2"]
    again = repconv.load(out)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), result.model(x))
    assert [s.a for s in again.meta["repconv_plan"].replace_steps] == [s.a for s in result.plan.replace_steps]
    assert set(again.state_dict()) == set(result.model.state_dict())


def test_plan_file_reproduces_conversion(tmp_path):
    spec = resolve_arch("cifar_resnet32")
    model = spec.build().eval()
    first = repconv.convert(model, arch="cifar_resnet32", units=["layer2.3"])
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(first.plan.to_json())
    second = repconv.convert(model, arch="cifar_resnet32", plan=plan_path)
    assert second.summary.replaced_units == ["layer2.3"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(first.model(x), second.model(x))
    assert isinstance(second.plan.steps[0], ReplaceStep)


def test_units_that_are_bare_leaf_modules_round_trip(tmp_path):
    """VGG without BN: the repeated units are the Conv2d leaves of a Sequential, so the scalars module is
    added under a leaf; its own a, b must not be synthesized like the conv's weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *[m for _ in range(4) for m in
                                                            (nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())],
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    gm = trace(copy.deepcopy(model))  # fx shares leaf modules with the traced model
    steps = [ReplaceStep(unit="3", prev="1", next="5", a=0.25, b=0.75)]
    apply_replacement(gm, steps)
    x = torch.randn(2, 3, 8, 8)
    expected = copy.deepcopy(model)
    with torch.no_grad():
        expected[3].weight.copy_(0.25 * model[1].weight + 0.75 * model[5].weight)
        expected[3].bias.copy_(0.25 * model[1].bias + 0.75 * model[5].bias)
        torch.testing.assert_close(gm(x), expected(x))
    assert {k for k in gm.state_dict() if k.startswith("3.")} == {"3.replacement.a", "3.replacement.b"}
