import os
import pickle
import zipfile

import pytest
import torch
import torchvision

import repconv
from repconv.checkpoint import CheckpointMeta, load_checkpoint, save
from repconv.errors import ArchError, InputFileError, OptionError
from repconv.models import resolve_arch


@pytest.fixture(scope="module")
def r18_sd():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).state_dict()


def same_weights(model, sd):
    own = model.state_dict()
    return set(own) == set(sd) and all(torch.equal(own[k], sd[k]) for k in sd)


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "ddp"])
def test_torch_save_state_dict_variants(tmp_path, r18_sd, wrap):
    obj = {"bare": r18_sd, "state_dict": {"state_dict": r18_sd, "epoch": 3},
           "model": {"model": r18_sd, "optimizer": {}},
           "ddp": {f"module.{k}": v for k, v in r18_sd.items()}}[wrap]
    path = tmp_path / "m.pt"
    torch.save(obj, path)
    loaded = load_checkpoint(path, arch="resnet18")
    assert same_weights(loaded.model, r18_sd)
    assert loaded.meta.arch == "torchvision:resnet18"
    assert loaded.meta.arch_kwargs == {"num_classes": 10}  # inferred from the classifier weights


def test_safetensors_and_prefixes(tmp_path, r18_sd):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in r18_sd.items()}, str(path))
    assert same_weights(load_checkpoint(path, arch="torchvision:resnet18").model, r18_sd)
    with pytest.raises(ArchError, match="timm"):
        load_checkpoint(path, arch="timm:no_such_model_xyz")


def test_repconv_container_round_trip(tmp_path):
    torch.manual_seed(0)
    spec = resolve_arch("cifar_resnet8")
    model = spec.build(num_classes=7)
    path = save(tmp_path / "c.repconv.safetensors", model, CheckpointMeta.for_arch(spec, {"num_classes": 7}))
    loaded = load_checkpoint(path)  # no --arch needed
    assert loaded.meta.arch == "repconv:cifar_resnet8" and loaded.meta.input_size == (3, 32, 32)
    assert same_weights(loaded.model, model.state_dict())
    assert not list(tmp_path.glob("*.part"))


def test_num_classes_override_must_fit(tmp_path, r18_sd):
    path = tmp_path / "m.pt"
    torch.save(r18_sd, path)
    with pytest.raises(ArchError, match=r"wrong shape: fc.weight \(10, 512\) vs \(5, 512\)"):
        load_checkpoint(path, arch="resnet18", num_classes=5)


def test_other_architecture_is_a_readable_error(tmp_path, r18_sd):
    path = tmp_path / "m.pt"
    torch.save(r18_sd, path)
    with pytest.raises(ArchError) as info:
        load_checkpoint(path, arch="resnet34")
    msg = str(info.value)
    assert "do not fit torchvision:resnet34" in msg and "missing" in msg and "check arch (and the class count)" in msg
    assert "\n" not in msg


def test_unknown_arch(tmp_path, r18_sd):
    path = tmp_path / "m.pt"
    torch.save(r18_sd, path)
    with pytest.raises(ArchError, match="unknown architecture 'resnet_nine'"):
        load_checkpoint(path, arch="resnet_nine")


def test_weights_without_arch(tmp_path, r18_sd):
    path = tmp_path / "m.pt"
    torch.save(r18_sd, path)
    with pytest.raises(OptionError, match=r"arch is needed: .* holds only weights"):
        load_checkpoint(path)


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "text", "folder"])
def test_broken_files(tmp_path, r18_sd, case):
    path = tmp_path / "m.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        torch.save(r18_sd, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "text":
        path.write_text("these are not the weights you are looking for\n")
    elif case == "folder":
        path.mkdir()
    expected = {"missing": "does not exist", "empty": "is empty", "truncated": "truncated or corrupt",
                "text": "not a PyTorch checkpoint", "folder": "is a folder"}[case]
    with pytest.raises(InputFileError, match=expected):
        load_checkpoint(path, arch="resnet18")


def test_truncated_safetensors(tmp_path, r18_sd):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in r18_sd.items()}, str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InputFileError, match="not a readable safetensors file"):
        load_checkpoint(path, arch="resnet18")


class _Evil:
    """Pickles to a call of os.system: loading it must never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil(marker)}, path)
    with pytest.raises(OptionError, match="trust_pickle is needed"):
        load_checkpoint(path, arch="resnet18")
    assert not marker.exists()


def test_pickled_module_needs_trust(tmp_path):
    model = torchvision.models.resnet18(num_classes=3)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(OptionError, match=r"trust_pickle is needed.*pickled Python object"):
        load_checkpoint(path)
    trusted = load_checkpoint(path, trust_pickle=True)
    assert same_weights(trusted.model, model.state_dict())
    assert same_weights(load_checkpoint(path, arch="resnet18", trust_pickle=True).model, model.state_dict())


def test_torchscript_archive(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    assert zipfile.is_zipfile(path)
    with pytest.raises(InputFileError, match="TorchScript archive"):
        load_checkpoint(path, arch="resnet18")


def test_plain_pickle_file(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(OptionError, match="trust_pickle is needed"):  # never unpickled without trust
        load_checkpoint(path, arch="resnet18")


def test_api_load_returns_module(tmp_path, r18_sd):
    path = tmp_path / "m.pt"
    torch.save(r18_sd, path)
    model = repconv.load(path, arch="resnet18")
    assert isinstance(model, torch.nn.Module) and same_weights(model, r18_sd)


def test_fit_state_dict_supplies_module_versions():
    """torchvision's MNASNet refuses a state_dict without its version metadata (safetensors has none)."""
    from repconv.checkpoint import fit_state_dict

    source = torchvision.models.mnasnet0_5().eval()
    plain = {k: v.clone() for k, v in source.state_dict().items()}  # a plain dict: no _metadata
    target = torchvision.models.mnasnet0_5().eval()
    fit_state_dict(target, plain, "mnasnet0_5", None)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in plain.items())


def test_fit_state_dict_leaves_fx_tensor_constants_to_each_side():
    from repconv.checkpoint import fit_state_dict
    from repconv.convert.graph import trace

    class WithConstant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x) + torch.arange(4.0).view(1, 4, 1, 1)

    model = WithConstant().eval()
    traced = trace(model)
    assert any(k.startswith("_tensor_constant") for k in traced.state_dict())
    fit_state_dict(WithConstant(), traced.state_dict(), "with_constant", None)  # folded back: constants dropped
    fit_state_dict(trace(WithConstant()), model.state_dict(), "with_constant", None)  # traced: keeps its own
    with pytest.raises(ArchError, match="1 unexpected: stray"):
        fit_state_dict(WithConstant(), {**model.state_dict(), "stray": torch.zeros(1)}, "with_constant", None)


def test_atomic_files_get_the_mode_a_plain_write_would(tmp_path):
    from repconv.io import write_text_atomic

    old = os.umask(0o022)
    try:
        fresh = write_text_atomic(tmp_path / "fresh.json", "{}")
        kept = tmp_path / "kept.json"
        kept.write_text("old")
        kept.chmod(0o640)
        write_text_atomic(kept, "new")
    finally:
        os.umask(old)
    assert fresh.stat().st_mode & 0o777 == 0o644  # mkstemp alone would leave 0600
    assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_text() == "new"
    assert not list(tmp_path.glob(".*.part"))
