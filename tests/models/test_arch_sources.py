"""--arch module.path:callable (a user's builder), the registry's duplicate check, timm's class names."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from repconv.errors import ArchError
from repconv.models import _OWN, default_num_classes, is_python_arch, register_model, resolve_arch

BUILDER = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def build(num_classes: int = 4):
    return Net(num_classes)


build.repconv_spec = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                      "num_classes": 4, "class_names": ["a", "b", "c", "d"]}
NOT_CALLABLE = 3
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package ``userpkg_<n>.models`` in a fresh current directory (not on sys.path); its name is returned."""
    name = f"userpkg_{tmp_path.name.replace('-', '_')}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(textwrap.dedent(BUILDER))
    (pkg / "broken.py").write_text("raise RuntimeError('this module cannot be imported\\nsecond line')\n")
    (pkg / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def test_python_builder_resolves_from_cwd_and_restores_sys_path(user_package):
    before = list(sys.path)
    spec = resolve_arch(f"{user_package}.models:build")
    assert sys.path == before
    assert spec.source == "python" and spec.name == f"{user_package}.models:build"
    assert spec.input_size == (3, 16, 16) and spec.mean == (0.5,) * 3 and spec.class_names == ("a", "b", "c", "d")
    assert default_num_classes(spec) == 4
    assert spec.build(num_classes=2)(torch.zeros(1, 3, 16, 16)).shape == (1, 2)
    cls = resolve_arch(f"{user_package}.models:Net")  # a class is a callable too; defaults without repconv_spec
    assert cls.input_size == (3, 224, 224) and cls.class_names is None


@pytest.mark.parametrize(("suffix", "match"), [
    ("nosuchmodule:build", r"cannot import '.*nosuchmodule'.*no module named '.*nosuchmodule'"),
    ("needs_dep:build", "no module named 'no_such_dependency_xyz'"),
    ("broken:build", "importing '.*broken' for arch .* failed: RuntimeError: this module cannot be imported;"),
    ("models:missing", "has no attribute 'missing'; its callables are: .*build"),
    ("models:NOT_CALLABLE", "is a int, not a callable"),
])
def test_python_builder_errors_are_clear(user_package, suffix, match):
    with pytest.raises(ArchError, match=match):
        resolve_arch(f"{user_package}.{suffix}")
    assert "" not in sys.path and not any(p.endswith(user_package) for p in sys.path)


def test_arch_syntax_is_disambiguated():
    assert not is_python_arch("resnet18") and not is_python_arch("timm:resnet18")
    assert not is_python_arch("torchvision:resnet18") and not is_python_arch("repconv:cifar_resnet20")
    assert is_python_arch("my.models:build") and is_python_arch("mymodels:build")
    with pytest.raises(ArchError, match=r"neither a known architecture nor module\.path:callable"):
        resolve_arch("my-models:build")
    with pytest.raises(ArchError, match="cannot import 'nosuch_top'"):
        resolve_arch("nosuch_top:build")
    assert resolve_arch("repconv:cifar_resnet20").source == "repconv"


def test_names_read_from_files_do_not_import_unless_allowed(user_package):
    with pytest.raises(ArchError, match="runs that module's code"):
        resolve_arch(f"{user_package}.models:build", import_builders=False)
    assert f"{user_package}.models" not in sys.modules


def test_saved_file_rebuilds_the_same_builder(user_package, tmp_path):
    from repconv.checkpoint import CheckpointMeta, save
    from repconv.checkpoint import load_checkpoint as load

    spec = resolve_arch(f"{user_package}.models:build")
    torch.manual_seed(0)
    model = spec.build().eval()
    path = save(tmp_path / "user.repconv.safetensors", model, CheckpointMeta.for_arch(spec))
    for mod in [m for m in sys.modules if m.startswith(user_package)]:
        del sys.modules[mod]  # as in a new process: the load imports it again
    with pytest.raises(ArchError, match="import"):  # a file's header alone never imports code
        load(path)
    loaded = load(path, arch=spec.name)  # naming the architecture is the user's consent
    assert loaded.meta.arch == spec.name and loaded.meta.class_names == ["a", "b", "c", "d"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_registry_refuses_a_duplicate_name():
    resolve_arch("cifar_resnet20")  # the own models are registered
    with pytest.raises(ValueError, match="already registered under the name 'cifar_resnet20'"):
        register_model("cifar_resnet20")(lambda: None)
    register_model("test_only_unique_name")(lambda: torch.nn.Identity())
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_model("test_only_unique_name")(lambda: torch.nn.Identity())
    finally:
        del _OWN["test_only_unique_name"]


needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm")


@needs_timm
def test_timm_imagenet_models_get_class_names():
    names = resolve_arch("timm:resnet18").class_names
    assert names is not None and len(names) == 1000 and names[:2] == ("tench", "goldfish")
    assert resolve_arch("timm:vit_base_patch16_224.augreg_in21k").class_names is None  # 21k classes: none


@needs_timm
def test_predict_prints_timm_class_names(tmp_path):
    from repconv.checkpoint import CheckpointMeta, save
    from repconv.runtime.predict import predict_images
    from repconv.runtime.session import open_session

    spec = resolve_arch("timm:test_resnet")
    torch.manual_seed(0)
    path = save(tmp_path / "t.repconv.safetensors", spec.build().eval(), CheckpointMeta.for_arch(spec))
    image = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    with open_session(path, device="cpu") as session:
        result = predict_images(session, [image], top_k=2)
    assert all(score.label in spec.class_names for score in result.predictions[0].top)
