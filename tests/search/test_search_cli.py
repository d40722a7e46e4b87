"""`repconv search` from the command line: bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("extra, expected", [
    ([], "--latency-budget and the maximum drop: give exactly one of the two"),
    (["--latency-budget", "0.8", "--max-drop", "1"], "give exactly one"),
    (["--latency-budget", "-1"], "--latency-budget -1.0 is not a positive fraction"),
    (["--latency-budget", "0.8", "--target", "gpu-magic"], "--target gpu-magic is not a known target"),
    (["--latency-budget", "0.8", "--local-epochs", "-1"], "--local-epochs -1 must not be negative"),
    (["--latency-budget", "0.8", "--rivals", "pf-hybrid,pf-most"], "--rivals pf-most is not a known choice"),
    (["--latency-budget", "0.8", "--race-plans", "0"], "--race-plans 0 must be at least 1"),
    (["--latency-budget", "0.8", "--race-epochs", "3,1"], "--race-epochs 3,1 must be at least 1 and increasing"),
    (["--latency-budget", "0.8", "--race-epochs", "1,x"], "--race-epochs 1,x does not parse as a list of positive"),
])
def test_search_bad_input(run_cli, small_checkpoint, tmp_path, extra, expected):
    code, out, err = run_cli("search", small_checkpoint, "--data", "digits", "-o", tmp_path / "out", *extra)
    assert code == 2 and out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_search_empty_data_folder(run_cli, small_checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("search", small_checkpoint, "--data", tmp_path / "empty", "-o", tmp_path / "out",
                           "--latency-budget", "0.8")
    assert code == 2 and "no usable image" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_inspect_shows_a_candidate_table(run_cli, small_checkpoint, tmp_path):
    from helpers import make_table

    path = make_table().save(tmp_path / "table.json")
    code, out, err = run_cli("inspect", small_checkpoint, "--candidates", path)
    assert code == 0, err
    assert "Candidate table (ort-cpu, original 20.00 ms)" in out and "pf-avg" in out and "-2.500" in out
    code, _, err = run_cli("inspect", small_checkpoint, "--candidates", tmp_path / "missing.json")
    assert code == 2 and "does not exist" in err


def test_recovery_flag_defaults_are_the_api_defaults():
    import typer

    from repconv.cli.app import app
    from repconv.cli.options import parse_ints
    from repconv.search.run import SearchOptions

    params = {p.name: p for p in typer.main.get_command(app).commands["search"].params}
    assert params["local_epochs"].default == SearchOptions().local.epochs == 0
    assert params["refit"].default == SearchOptions().refit == "auto"
    assert params["race_plans"].default == SearchOptions().race_plans == 3
    assert parse_ints(params["race_epochs"].default, "race_epochs", "1,3") == SearchOptions().race_epochs == (1,)
    assert params["rivals"].help.endswith(f"(default: {','.join(SearchOptions().rivals)})")
    assert "skips it" in params["local_epochs"].help and "race" in params["refit"].help
