import json
import os

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from repconv.models import resolve_arch


@pytest.fixture(scope="module")
def r32_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "r32.pt"
    torch.save(resolve_arch("cifar_resnet32").build(num_classes=10).state_dict(), path)
    return path


def test_convert_json_and_file(run_cli, r32_file, tmp_path):
    out = tmp_path / "c.repconv.safetensors"
    code, stdout, stderr = run_cli("convert", r32_file, "--arch", "cifar_resnet32", "-o", out, "--json",
                                   "--plan-out", tmp_path / "plan.json")
    assert code == 0, stderr
    s = json.loads(stdout)
    for key in ("params_before", "params_after", "trainable_params", "flops_before", "flops_after",
                "replaced_units"):
        assert key in s
    assert s["replaced_units"] == ["layer1.1", "layer1.3", "layer2.2", "layer3.2"]
    assert s["params_after"] < s["params_before"] and s["flops_after"] == s["flops_before"]
    assert out.is_file() and json.loads((tmp_path / "plan.json").read_text())["steps"]
    # shapes propagated on the traced graph at the architecture's input size (32px)
    assert {r["container"]: r["output_shape"] for r in s["runs"]}["layer3"] == [1, 64, 8, 8]


def test_inspect_table_writes_nothing(run_cli, r32_file, tmp_path):
    code, stdout, _ = run_cli("inspect", r32_file, "--arch", "cifar_resnet32", "--every", "3")
    assert code == 0
    assert "Repeated units" in stdout and "layer3" in stdout and "MACs" in stdout
    assert not list(tmp_path.iterdir())


def test_inspect_says_when_nothing_is_replaceable(run_cli, tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    code, stdout, stderr = run_cli("inspect", path, "--arch", "resnet18", "--json")
    assert code == 0
    assert "none with an interior member" in json.loads(stdout)["message"]
    code, _, stderr = run_cli("convert", path, "--arch", "resnet18", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "none with an interior member" in stderr
    assert not (tmp_path / "x.safetensors").exists()


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) if x.mean() > 0 else x


def _bad_input_cases(tmp_path, r32_file):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(r32_file.read_bytes()[:5000])
    text = tmp_path / "text.pt"
    text.write_text("hello\n")
    pickled = tmp_path / "module.pt"
    torch.save(resolve_arch("cifar_resnet8").build(), pickled)
    untraceable = tmp_path / "untraceable.pt"
    torch.save(Untraceable(), untraceable)
    return {
        "missing file": ([tmp_path / "nope.pt", "--arch", "cifar_resnet32"], "does not exist"),
        "empty file": ([empty, "--arch", "cifar_resnet32"], "is empty"),
        "truncated file": ([trunc, "--arch", "cifar_resnet32"], "truncated or corrupt"),
        "text file": ([text, "--arch", "cifar_resnet32"], "not a PyTorch checkpoint"),
        "pickled module": ([pickled], "--trust-pickle"),
        "unknown arch": ([r32_file, "--arch", "resnet_nine"], "unknown architecture"),
        "other arch": ([r32_file, "--arch", "cifar_resnet20"], "do not fit repconv:cifar_resnet20"),
        "units naming nothing": ([r32_file, "--arch", "cifar_resnet32", "--units", "layer9.*"],
                                 "matches no replaceable unit"),
        "untraceable": ([untraceable, "--trust-pickle"], "cannot trace"),
    }


@pytest.mark.parametrize("case", ["missing file", "empty file", "truncated file", "text file", "pickled module",
                                  "unknown arch", "other arch", "units naming nothing", "untraceable"])
def test_bad_input_one_line_exit_2_no_file(run_cli, r32_file, tmp_path, case):
    args, expected = _bad_input_cases(tmp_path, r32_file)[case]
    out = tmp_path / "out" / "c.repconv.safetensors"
    out.parent.mkdir()
    code, stdout, stderr = run_cli("convert", *args, "-o", out)
    assert code == 2, (stdout, stderr)
    assert expected in stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: ")
    assert list(out.parent.iterdir()) == []


def test_untraceable_names_line_and_leaf(run_cli, tmp_path, r32_file):
    _bad_input_cases(tmp_path, r32_file)  # writes the untraceable model's file
    code, _, stderr = run_cli("inspect", tmp_path / "untraceable.pt", "--trust-pickle")
    assert code == 2 and "Untraceable.forward" in stderr and "x.mean() > 0" in stderr and "--leaf" in stderr


def test_debug_shows_traceback(run_cli, tmp_path):
    code, _, stderr = run_cli("inspect", tmp_path / "nope.pt", "--arch", "resnet18", "--debug")
    assert code == 2 and "Traceback" in stderr


def test_unwritable_output(run_cli, r32_file, tmp_path):
    code, _, stderr = run_cli("convert", r32_file, "--arch", "cifar_resnet32", "-o", tmp_path / "no" / "x.st")
    assert code == 2 and "does not exist" in stderr


def test_models_lists_all_sources(run_cli):
    code, stdout, _ = run_cli("models", "--json")
    assert code == 0
    names = json.loads(stdout)
    assert "cifar_resnet32" in names["repconv"] and "resnet50" in names["torchvision"]


def test_usage_errors_exit_2_with_typer_usage_message(run_cli, r32_file):
    code, out, err = run_cli("inspect", r32_file, "--no-such-option")
    assert code == 2 and "No such option: --no-such-option" in err and out == ""


def test_cli_does_not_need_click():
    """typer vendors click since 0.26; a fresh `pip install -e .` has no click package."""
    import subprocess
    import sys

    code = "import sys; sys.modules['click'] = None; import repconv.cli"  # any `import click` now fails
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------- a user's first day: each of these was a crash


@pytest.fixture
def jpegs(tmp_path):
    """A flat folder of JPEGs, one of them truncated (PIL's verify() passes it; decoding fails)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (30 * i, 90, 160)).save(folder / f"{i}.jpg", quality=95)
    data = (folder / "0.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 2])
    return folder


def _one_line_exit_2(result, expected: str, folder) -> None:
    code, stdout, stderr = result
    assert code == 2, (stdout, stderr)
    assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
    assert expected in stderr, stderr
    assert not [p for p in folder.iterdir() if p.name.startswith(("o.", "out", "x."))]


@pytest.mark.parametrize("case", ["proc output", "bench json to proc", "negative lr", "missing calib folder",
                                  "top-k above the classes", "pickled module without arch"])
def test_first_day_bad_input(run_cli, r32_file, small_onnx, tmp_path, jpegs, case):
    module = tmp_path / "module.pt"
    torch.save(resolve_arch("cifar_resnet8").build(), module)
    args, expected = {
        "proc output": (["convert", r32_file, "--arch", "cifar_resnet32", "-o", "/proc/x.safetensors"],
                        "cannot write '/proc/x.safetensors'"),
        "bench json to proc": (["bench", small_onnx, "--json-out", "/proc/x.json", "--batch", "1"],
                               "cannot write '/proc/x.json'"),
        "negative lr": (["finetune", r32_file, "--data", "digits", "-o", tmp_path / "o.safetensors", "--lr", "-5"],
                        "--lr -5.0 must not be negative"),
        "missing calib folder": (["export", r32_file, "--arch", "cifar_resnet32", "-o", tmp_path / "o.onnx",
                                  "--dtype", "int8", "--calib", tmp_path / "nowhere"],
                                 "--calib " + str(tmp_path / "nowhere") + " is neither 'digits' nor"),
        "top-k above the classes": (["predict", small_onnx, jpegs / "1.jpg", "--top-k", "5000"],
                                    "--top-k 5000 is more than the model's 10 classes"),
        "pickled module without arch": (["convert", module, "--trust-pickle", "-o", tmp_path / "o.safetensors"],
                                        "--arch is needed to save the conversion"),
    }[case]
    if case == "proc output" and os.geteuid() != 0:
        pytest.skip("root on Linux: /proc passes os.access")
    _one_line_exit_2(run_cli(*args), expected, tmp_path)


def test_a_truncated_image_in_the_data_is_skipped_with_a_warning(jpegs, caplog):
    import logging

    from repconv.data import make_dataset

    with caplog.at_level(logging.WARNING, logger="repconv.data"):
        ds = make_dataset(jpegs, "train", 16, (0.5,) * 3, (0.5,) * 3, labeled=False)
    assert len(ds) == 3 and all(ds[i][0].shape == (3, 16, 16) for i in range(3))
    assert any("broken.jpg" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


def test_tables_piped_to_a_file_are_not_cut(r32_file):
    """rich cuts tables to 80 columns when stdout is not a terminal ("3.58e…"); repconv's are whole."""
    from helpers import run_in_child

    done = run_in_child("inspect", r32_file, "--arch", "cifar_resnet32")
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout and max(len(line) for line in done.stdout.splitlines()) > 80
