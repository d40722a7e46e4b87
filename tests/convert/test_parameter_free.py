"""The parameter-free pass: targets, policies, the fx rewrite, counts against the paper, save / load."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torchvision
from helpers import randomize_bn
from torch import nn

import repconv
from repconv import api
from repconv.checkpoint import CheckpointMeta, save
from repconv.cli import main
from repconv.conversion import ConvertOptions, plan_conversion
from repconv.convert.apply import apply_plan
from repconv.convert.graph import count_flops, count_params, trace
from repconv.convert.parameter_free import TokenMixer, apply_parameter_free, find_targets, plan_parameter_free
from repconv.convert.plan import Plan
from repconv.errors import NothingToReplace, OptionError
from repconv.models import resolve_arch

PAPER = {"all": (14.2e6, 2.2e9), "hybrid": (17.3e6, 2.6e9)}  # params, MACs at 224px (Han et al., table)
NATIVE = {"all": "pf_resnet50_max", "hybrid": "pf_resnet50_hybrid"}


def convert_and_reload(arch: str, tmp_path, size: int | None = None, policy: str = "all", op: str = "max",
                       **arch_kwargs):
    """(converted module, module re-loaded from disk, input) for ``arch`` at random init with non-trivial BN."""
    spec = resolve_arch(arch)
    torch.manual_seed(0)
    model = randomize_bn(spec.build(**arch_kwargs).eval())
    plan = Plan.from_json(Plan(plan_parameter_free(model, policy=policy, op=op), spec.name).to_json())
    gm = apply_plan(trace(model), plan).eval()
    size = size or spec.input_size[1]
    meta = CheckpointMeta.for_arch(spec, arch_kwargs, kind="converted", plan=plan)
    meta.input_size = (3, size, size)
    path = tmp_path / f"{spec.short_name}-{policy}.repconv.safetensors"
    save(path, gm, meta)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return gm, repconv.load(path), x


def _calls(gm, target: str) -> int:
    return sum(n.op == "call_module" and n.target == target for n in gm.graph.nodes)


# ---------------------------------------------------------------- ResNet-50: the paper's numbers


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet50().eval())


@pytest.mark.parametrize("policy", ["all", "hybrid"])
def test_resnet50_counts_match_paper_and_native_model(resnet50, policy):
    result = api.convert(resnet50, arch="resnet50", method="parameter-free", pf_policy=policy)
    s = result.summary
    params, macs = PAPER[policy]
    assert abs(s.params_after - params) <= 0.05e6, s.params_after
    assert abs(s.macs_after - macs) <= 0.05e9, s.macs_after
    assert s.params_before == 25_557_032 and s.params_after < s.params_before

    native = resolve_arch(NATIVE[policy]).build().eval()
    assert count_params(native) == s.params_after
    assert count_flops(native, torch.randn(1, 3, 224, 224)) // 2 == s.macs_after
    # same module names: the converted weights load strictly into the native model and compute the same
    native.load_state_dict(result.model.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(native(x), result.model(x), rtol=0, atol=0)


def test_resnet50_all_removes_the_relu_call_not_the_shared_module(resnet50):
    gm = apply_parameter_free(trace(copy.deepcopy(resnet50)), plan_parameter_free(resnet50, "all"))
    block = gm.get_submodule("layer1.0")
    assert isinstance(block.conv2, nn.MaxPool2d) and (block.conv2.kernel_size, block.conv2.stride) == (3, 1)
    strided = gm.get_submodule("layer2.0.conv2")
    assert isinstance(strided, nn.MaxPool2d) and strided.stride == 2
    assert not hasattr(block, "bn2")
    assert isinstance(block.relu, nn.ReLU)  # one module called three times in torchvision's Bottleneck
    assert _calls(gm, "layer1.0.relu") == 2  # after bn1 and after the residual add; the call after bn2 is gone
    assert _calls(gm, "layer1.0.conv2") == 1


def test_resnet50_hybrid_keeps_pretrained_conv_after_avgpool(resnet50):
    steps = plan_parameter_free(resnet50, "hybrid")
    forms = {s.target: s.form for s in steps}
    assert [t for t, f in forms.items() if f == "avgpool_conv"] == ["layer2.0.conv2", "layer3.0.conv2",
                                                                   "layer4.0.conv2"]
    assert sum(f == "pool" for f in forms.values()) == 13
    gm = apply_parameter_free(trace(resnet50), steps)
    conv = gm.get_submodule("layer3.0.conv2")
    assert isinstance(conv, nn.Conv2d) and conv.stride == (1, 1)
    assert torch.equal(conv.weight, resnet50.layer3[0].conv2.weight)  # the pretrained weights, untouched
    assert resnet50.layer3[0].conv2.stride == (2, 2)  # the original model is not modified
    assert _calls(gm, "layer3.0.relu") == 3 and _calls(gm, "layer3.0.bn2") == 1


def test_avg_op_and_explicit_units(resnet50):
    steps = plan_parameter_free(resnet50, "all", op="avg", units=["layer4.*"])
    assert [s.target for s in steps] == ["layer4.0.conv2", "layer4.1.conv2", "layer4.2.conv2"]
    gm = apply_parameter_free(trace(copy.deepcopy(resnet50)), steps)
    assert isinstance(gm.get_submodule("layer4.1.conv2"), nn.AvgPool2d)
    assert isinstance(gm.get_submodule("layer3.1.conv2"), nn.Conv2d)
    with torch.no_grad():
        assert gm(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


# ---------------------------------------------------------------- the CI subset of architectures


SUBSET = [("resnet50", 64, {}), ("mobilenet_v2", 64, {}), ("efficientnet_b0", 64, {}), ("convnext_tiny", 64, {}),
          ("vit_b_16", 32, {"image_size": 32})]


@pytest.mark.parametrize("policy", ["all", "hybrid"])
@pytest.mark.parametrize(("arch", "size", "kwargs"), SUBSET, ids=[a for a, _, _ in SUBSET])
def test_subset_converts_runs_and_round_trips_bit_exactly(arch, size, kwargs, policy, tmp_path):
    gm, reloaded, x = convert_and_reload(arch, tmp_path, size, policy, **kwargs)
    assert count_params(gm) < count_params(resolve_arch(arch).build(**kwargs)) or arch.startswith("vit")
    with torch.no_grad():
        y = gm(x)
        assert y.shape == (1, 1000) and torch.isfinite(y).all()
        assert torch.equal(reloaded(x), y)
    assert reloaded.state_dict().keys() == gm.state_dict().keys()


def test_depthwise_targets_keep_norm_and_activation():
    model = torchvision.models.mobilenet_v2().eval()
    targets = find_targets(model)
    assert targets and all(t.kind == "depthwise" and t.absorbed == [] for t in targets)
    strided = [t.path for t in targets if t.stride == 2]
    hybrid = {s.target: s for s in plan_parameter_free(model, "hybrid")}
    assert all(hybrid[p].form == "avgpool_conv" for p in strided)
    assert {s.form for p, s in hybrid.items() if p not in strided} == {"pool"}


def test_vit_token_mixer_in_every_other_block():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32).eval()
    steps = plan_parameter_free(model, "all")
    expected = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in (1, 3, 5, 7, 9, 11)]
    assert [s.target for s in steps] == expected
    gm = apply_parameter_free(trace(copy.deepcopy(model)), steps)
    mixer = gm.get_submodule("encoder.layers.encoder_layer_1.self_attention")
    attn = model.encoder.layers.encoder_layer_1.self_attention
    assert isinstance(mixer, TokenMixer) and mixer.fc1.out_features == 3 * 768
    assert torch.equal(mixer.fc1.weight, attn.in_proj_weight) and torch.equal(mixer.fc1.bias, attn.in_proj_bias)
    assert isinstance(gm.get_submodule("encoder.layers.encoder_layer_0.self_attention"), nn.MultiheadAttention)


def test_token_mixer_pools_locally_and_class_token_bypasses_pooling():
    torch.manual_seed(0)
    mixer = TokenMixer(8, prefix_tokens=1).eval()
    x = torch.randn(2, 1 + 16, 8)  # class token + a 4x4 grid
    y = mixer(x)
    changed = x.clone()
    changed[:, 1] += 10  # grid cell (0, 0)
    y2 = mixer(changed)
    assert torch.equal(y2[:, 0], y[:, 0])  # the class token sees no patch token
    assert torch.equal(y2[:, 1 + 15], y[:, 1 + 15])  # cell (3, 3) is outside the 3x3 window of (0, 0)
    assert not torch.equal(y2[:, 1 + 5], y[:, 1 + 5])  # cell (1, 1) is inside it


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_vit_round_trips(tmp_path):
    gm, reloaded, x = convert_and_reload("timm:vit_tiny_patch16_224", tmp_path, 32, img_size=32)
    assert sum(isinstance(m, TokenMixer) for m in gm.modules()) == 6
    with torch.no_grad():
        y = gm(x)
        assert y.shape == (1, 1000) and torch.equal(reloaded(x), y)


def test_both_leaves_replaced_units_and_their_neighbours_alone():
    model = resolve_arch("cifar_resnet20").build().eval()
    plan, _ = plan_conversion(model, ConvertOptions(method="both"))
    kept = {p for s in plan.replace_steps for p in (s.unit, s.prev, s.next)}
    assert plan.replace_steps and plan.parameter_free_steps
    assert not any(s.target.startswith(k + ".") for s in plan.parameter_free_steps for k in kept)
    gm = apply_plan(trace(copy.deepcopy(model)), plan, model_for_init=model)
    with torch.no_grad():
        assert gm(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# ---------------------------------------------------------------- bad input


def test_model_without_target_says_so():
    model = torchvision.models.squeezenet1_0().eval()
    with pytest.raises(NothingToReplace, match="no parameter-free target"):
        plan_parameter_free(model)
    s = api.inspect(model, arch="squeezenet1_0", method="parameter-free")
    assert "no parameter-free target" in s.message and s.parameter_free_targets == []


def test_bad_options_are_option_errors():
    model = torchvision.models.mobilenet_v3_small().eval()
    with pytest.raises(OptionError, match=r"pf_units=\['nothing\.\*'\] matches no parameter-free target"):
        plan_parameter_free(model, units=["nothing.*"])
    with pytest.raises(OptionError, match="pf_op='median' is not a known choice; use one of max, avg"):
        plan_parameter_free(model, op="median")
    with pytest.raises(OptionError, match="pf_policy='some' is not a known choice; use one of all, hybrid"):
        plan_parameter_free(model, policy="some")


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pf-cli")
    paths = {}
    for arch in ("mobilenet_v3_small", "squeezenet1_0"):
        paths[arch] = folder / f"{arch}.pt"
        torch.save(resolve_arch(arch).build().state_dict(), paths[arch])
    return paths


@pytest.mark.parametrize(("arch", "extra", "expected"), [
    ("mobilenet_v3_small", ["--pf-units", "nothing.*"], "matches no parameter-free target"),
    ("mobilenet_v3_small", ["--pf-op", "median"], "Invalid value for '--pf-op': 'median' is not one of 'max', 'avg'"),
    ("squeezenet1_0", [], "no parameter-free target"),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(small_checkpoints, tmp_path, capsys, arch, extra,
                                                                 expected):
    out = tmp_path / "out.repconv.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(small_checkpoints[arch]), "--arch", arch, "--method", "parameter-free", "-o", str(out),
              *extra])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and expected in captured.err
    assert list(tmp_path.iterdir()) == []


def test_cli_inspect_json_lists_targets_and_policies(small_checkpoints, capsys):
    import json

    main(["inspect", str(small_checkpoints["mobilenet_v3_small"]), "--arch", "mobilenet_v3_small", "--method",
          "parameter-free", "--json"])
    s = json.loads(capsys.readouterr().out)
    assert len(s["parameter_free_targets"]) == 11 and {t["kind"] for t in s["parameter_free_targets"]} == {"depthwise"}
    policies = {p["policy"]: p for p in s["parameter_free_policies"]}
    assert policies["all"]["params_after"] == s["params_after"] < s["params_before"]
    assert policies["all"]["macs_after"] < policies["hybrid"]["macs_after"] < s["macs_before"]


# ---------------------------------------------------------------- the full sweep


def _sweep_cases():
    names = torchvision.models.list_models(module=torchvision.models)
    return [(n, p) for n in names for p in ("all", "hybrid")]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "policy"), _sweep_cases())
def test_every_torchvision_classifier(arch, policy, tmp_path):
    model = resolve_arch(arch).build().eval()
    try:
        plan_parameter_free(model, policy)
    except NothingToReplace as exc:  # a model without targets must say so, in one line
        assert "no parameter-free target" in str(exc) and "\n" not in str(exc)
        return
    gm, reloaded, x = convert_and_reload(arch, tmp_path, None, policy)
    with torch.no_grad():
        y = gm(x)
        assert y.shape == (1, 1000) and torch.isfinite(y).all()
        assert torch.equal(reloaded(x), y)
