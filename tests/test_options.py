"""Options and their errors: one error type for a bad value, API words vs CLI flags, CLI defaults = API defaults."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from repconv import api
from repconv.cli.app import app
from repconv.errors import OptionError, PlanError, RepconvError
from repconv.options import check_choices
from repconv.train.recover import FINETUNE_DEFAULTS, TRAIN_DEFAULTS


def test_option_error_speaks_api_or_flag():
    exc = OptionError("every", 1, "would replace a unit next to another replaced unit", "use 2 or more")
    assert str(exc) == "every=1 would replace a unit next to another replaced unit; use 2 or more."
    assert exc.for_flag("--every") == "--every 1 would replace a unit next to another replaced unit; use 2 or more."
    assert OptionError("units", ["a.*", "b"], "matches nothing").for_flag("--units") == "--units a.* b matches nothing."


def test_the_base_error_is_never_raised_itself():
    with pytest.raises(TypeError, match="subclass"):
        RepconvError("anything")
    assert str(PlanError("x", "y")) == "x; y."


def test_literal_choices_are_checked_in_every_options_dataclass():
    for cls, field, bad in ((api.ConvertOptions, "method", "sideways"), (api.ExportOptions, "dtype", "fp8"),
                            (api.TrainConfig, "objective", "magic"), (api.CalibrateOptions, "select", "some")):
        with pytest.raises(OptionError, match=f"{field}='{bad}' is not a known choice"):
            cls(**{field: bad})
    check_choices(api.ConvertOptions())  # the defaults are valid


@pytest.mark.parametrize("bad, match", [({"lr": -5}, "lr=-5 must not be negative"),
                                        ({"epochs": 0}, "epochs=0 must be at least 1"),
                                        ({"alpha": 2.0}, "alpha=2.0 is outside")])
def test_train_config_values(bad, match):
    with pytest.raises(OptionError, match=match):
        dataclasses.replace(FINETUNE_DEFAULTS, **bad)


def _cli_defaults(command: str) -> dict:
    click_command = typer.main.get_command(app).commands[command]
    return {p.name: p.default for p in click_command.params}


@pytest.mark.parametrize("command, defaults", [
    ("convert", api.ConvertOptions()), ("inspect", api.ConvertOptions()), ("export", api.ExportOptions()),
    ("calibrate", api.CalibrateOptions()), ("finetune", FINETUNE_DEFAULTS), ("train", TRAIN_DEFAULTS),
    ("bench", api.BenchOptions()),
])
def test_cli_defaults_are_the_api_defaults(command, defaults):
    cli = _cli_defaults(command)
    cli["trainable"] = cli.get("train")  # --train sets TrainConfig.trainable
    shared = [f.name for f in dataclasses.fields(defaults) if f.name in cli and cli[f.name] is not None]
    assert len(shared) >= 4, shared
    for name in shared:
        value = getattr(defaults, name)
        if name == "batches" and isinstance(value, tuple):  # bench: --batch is a comma list
            assert cli[name] == ",".join(map(str, value))
        elif name == "external_data":  # the flag forces it; without it, None: only above 2 GiB
            assert (cli[name] or None) == value
        elif name in ("units", "pf_units", "leaves"):
            assert not cli[name] and not value
        else:
            assert cli[name] == value, (command, name)


def test_cli_names_the_flag_of_a_bad_option(run_cli, tmp_path):
    import torch

    from repconv.models import resolve_arch

    path = tmp_path / "model.pt"
    torch.save(resolve_arch("cifar_resnet20").build().state_dict(), path)
    code, _, err = run_cli("convert", path, "--arch", "cifar_resnet20", "--every", "1",
                           "-o", tmp_path / "o.safetensors")
    assert code == 2 and err.startswith("error: --every 1 would replace") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_mean_and_std_take_three_numbers_after_one_flag(run_cli, tmp_path):
    """The documented form (docs/train.md, docs/finetune.md): parsing succeeds, the next error is the file's."""
    code, _, err = run_cli("finetune", tmp_path / "missing.pt", "--data", "digits", "-o", tmp_path / "o.safetensors",
                           "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5")
    assert code == 2 and "missing.pt' does not exist" in err, err


def test_usage_errors_are_one_line(run_cli):
    code, out, err = run_cli("export", "x.pt", "-o", "x.onnx", "--dtype", "fp8")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "Invalid value for '--dtype': 'fp8' is not one of" in err


def test_version(run_cli):
    code, out, _ = run_cli("--version")
    import repconv

    assert code == 0 and out.strip() == f"repconv {repconv.__version__}"
