"""search() end to end on the digits model in a quick mode: table, selection, conversion, local + global recovery,
verification; the local stage skipped; the cache reused and invalidated; the result folds, exports and passes ONNX
parity; bad input. The quick search itself is the session fixture ``searched`` (conftest.py)."""

from __future__ import annotations

import json

import pytest
from helpers import quick_search_options as quick

import repconv
from repconv.errors import DataError, DependencyError, InputFileError, OptionError, PlanError
from repconv.search.damage import DamageOptions
from repconv.search.run import search
from repconv.train.local import LocalOptions


def test_search_end_to_end(searched):
    out, res = searched
    assert res.selection.choice and not res.table_reused
    assert set(res.seconds) >= {"table", "select", "local", "global", "verify"}
    assert not res.local_skipped and res.local is not None and res.agreement_after_local is not None
    assert res.start is None  # with a local stage the refit is not raced: it runs ("auto" -> "on")
    for name in ("candidates.json", "search.json", "searched.repconv.safetensors", "pareto.png"):
        assert (out / name).is_file(), name
    assert not (out / "searched.repconv.safetensors.state.pt").exists()
    saved = json.loads((out / "search.json").read_text())
    assert saved["selection"]["choice"] == res.selection.choice
    assert 0 <= saved["measured_drop"] <= 100 and saved["latency_error"] == pytest.approx(res.latency_error)
    assert saved["local_skipped"] is False and 0 <= saved["measured_drop_after_local"] <= 100
    assert res.measured_latency_ms > 0 and res.base_latency_ms > 0
    pools = [s for s in res.plan["steps"] if s.get("form") in ("pool", "avgpool_conv")]
    if pools:  # the refit saw every pool: fitted, or reported as read by no linear layer
        assert len(res.refit["sites"]) + len(res.refit["skipped"]) == len(pools)
        assert saved["refit"]["mean_error_after"] <= saved["refit"]["mean_error_before"]
    loaded = repconv.load_checkpoint(out / "searched.repconv.safetensors")
    assert loaded.meta.kind == "converted" and loaded.meta.extra["search"]["phase"] == "done"
    assert len(loaded.meta.plan.steps) == len(res.plan["steps"])


def test_cache_reused_and_invalidated(searched, digits_checkpoint, tmp_path):
    out, _ = searched
    cache = out / "candidates.json"
    again = search(digits_checkpoint, "digits", tmp_path / "b", max_drop=0.0, options=quick(global_epochs=0),
                   cache=cache)
    assert again.table_reused and again.selection.predicted_drop == 0.0
    stamp = cache.stat().st_mtime_ns
    with pytest.raises(InputFileError, match="another model, data, target or settings"):
        search(digits_checkpoint, "digits", tmp_path / "c", max_drop=1.0,
               options=quick(damage=DamageOptions(steps=3, batch_size=32)), cache=cache)
    assert cache.stat().st_mtime_ns == stamp and not (tmp_path / "c" / "searched.repconv.safetensors").exists()


def test_local_stage_skipped_and_the_refit_raced(searched, digits_checkpoint, tmp_path):
    """The defaults: no local stage; ``refit="auto"``: the refitted and the converted model race through the first
    global epoch and the better one goes on (``--refit off``: no refit, nothing raced)."""
    out, _ = searched
    res = search(digits_checkpoint, "digits", tmp_path / "s", max_drop=100.0, cache=out / "candidates.json",
                 options=quick(local=LocalOptions(epochs=0, batch_size=32), refit="auto", global_epochs=2))
    assert res.table_reused and res.selection.choice and res.checkpoint is not None
    assert res.local_skipped and res.local is None and res.agreement_after_local is None
    assert "local" not in res.seconds and "global" in res.seconds and 0 <= res.agreement <= 1
    assert res.refit["mode"] == "auto" and set(res.start["scores"]) == {"converted", "refit"}
    assert res.start["chosen"] in ("converted", "refit") and res.start["epochs"] == 1
    assert len(res.global_history) == 2 and not list((tmp_path / "s").glob("*.start-*"))
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert saved["local_skipped"] is True and saved["local"] is None and saved["measured_drop_after_local"] is None
    assert saved["start"] == res.start
    info = repconv.load_checkpoint(res.checkpoint).meta.extra["search"]
    assert info["phase"] == "done" and info["local_skipped"] is True and info["start"] == res.start
    off = search(digits_checkpoint, "digits", tmp_path / "off", max_drop=100.0, cache=out / "candidates.json",
                 options=quick(local=LocalOptions(epochs=0, batch_size=32), refit="off"))
    assert off.refit is None and off.start is None


def test_stage_epochs_are_not_negative():
    with pytest.raises(OptionError, match="local_epochs=-1 must not be negative"):
        quick(local=LocalOptions(epochs=-1))
    with pytest.raises(OptionError, match="global_epochs=-2 must not be negative"):
        quick(global_epochs=-2)
    with pytest.raises(OptionError, match="global_objective='labels' is not a known choice"):
        quick(global_objective="labels")
    with pytest.raises(OptionError, match="global_lr=0 is not positive"):
        quick(global_lr=0)
    with pytest.raises(OptionError, match="refit_images=2 is too few"):
        quick(refit_images=2)
    with pytest.raises(OptionError, match="refit=True is not a known choice"):
        quick(refit=True)
    with pytest.raises(OptionError, match="race_epochs=0 must be at least 1"):
        quick(race_epochs=0)


def test_searched_checkpoint_folds_and_exports(searched, tmp_path):
    out, _ = searched
    ckpt = out / "searched.repconv.safetensors"
    folded = repconv.fold(ckpt, output=tmp_path / "folded.repconv.safetensors")
    assert folded.output.is_file() and folded.parity.max_rel < 1e-5
    exported = repconv.export(ckpt, tmp_path / "searched.onnx", exporter="legacy")
    assert exported.path.is_file() and exported.verified
    assert exported.checks and all(c.passed for c in exported.checks)


def test_bad_input(digits_checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError):
        search(digits_checkpoint, empty, tmp_path / "o1", max_drop=1.0, options=quick())
    with pytest.raises(DependencyError, match="CUDAExecutionProvider"):
        search(digits_checkpoint, "digits", tmp_path / "o2", max_drop=1.0, options=quick(target="ort-cuda"))
    with pytest.raises(OptionError):
        search(digits_checkpoint, "digits", tmp_path / "o3", options=quick())
    for o in ("o1", "o2", "o3"):
        assert not (tmp_path / o).exists()


def test_infeasible_budget(searched, digits_checkpoint, tmp_path):
    out, _ = searched
    with pytest.raises(PlanError, match=r"fastest plan .* predicted drop"):
        search(digits_checkpoint, "digits", tmp_path / "o", latency_budget=0.01, options=quick(),
               cache=out / "candidates.json")
    assert not (tmp_path / "o" / "searched.repconv.safetensors").exists()


def test_latency_budget_is_checked_on_the_assembled_model_and_resume_keeps_what_was_done(searched,
                                                                                        digits_checkpoint, tmp_path):
    import torch

    from repconv.checkpoint import save
    from repconv.search.select import fastest
    from repconv.search.table import load_table

    out, _ = searched
    table = load_table(out / "candidates.json")
    budget = round(1 - (1 - fastest(table).predicted_ratio) / 2, 3)  # half the table's largest saving
    # a wide tolerance: this checks the plumbing; test_measured checks the loop on known latencies
    opts = quick(global_epochs=0, latency_tolerance=0.9)
    said: list[str] = []
    res = search(digits_checkpoint, "digits", tmp_path / "o", latency_budget=budget, options=opts,
                 cache=out / "candidates.json", progress=said.append)
    assert res.table_reused and len(res.latency_probes) == 1
    probe = res.latency_probes[0]
    assert probe["choice"] == res.selection.choice and probe["predicted_ratio"] == probe["table_ratio"]
    assert probe["predicted_ratio"] == pytest.approx(res.selection.predicted_ratio)
    assert probe["measured_ratio"] <= budget * 1.9 and any("assembled plan" in m for m in said)
    assert json.loads((tmp_path / "o" / "search.json").read_text())["latency_probes"] == res.latency_probes
    # interrupted during the global stage: the weights have moved on since the local stage ended
    ckpt = tmp_path / "o" / "searched.repconv.safetensors"
    loaded = repconv.load_checkpoint(ckpt)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn_like(p))
    loaded.meta.extra["search"] |= {"phase": "global"}
    save(ckpt, loaded.model, loaded.meta)
    said.clear()  # resuming on the same table and budget keeps the choice and does not time it again
    again = search(digits_checkpoint, "digits", tmp_path / "o", latency_budget=budget, options=opts,
                   cache=out / "candidates.json", progress=said.append, resume=True)
    assert again.selection.choice == res.selection.choice and again.latency_probes == res.latency_probes
    assert not any("assembled plan" in m for m in said) and any("resuming after the local stage" in m for m in said)
    assert again.agreement_after_local == res.agreement_after_local  # as measured then, not on the moved weights
    assert again.agreement != res.agreement



def test_a_refit_its_own_check_undid_is_not_raced(digits_checkpoint, monkeypatch):
    """``refit="auto"`` races only two different starts: when the refit's KL check kept its input, the refitted
    model is the converted one and the global stage starts once."""
    import repconv.search.recover as recover
    from repconv.conversion import convert
    from repconv.search.data import load_data
    from repconv.search.recover import prepare_starts

    loaded = repconv.load_checkpoint(digits_checkpoint)
    teacher, (train, _) = loaded.model.eval(), load_data("digits", None, loaded.meta)
    conv = convert(teacher, method="parameter-free", pf_policy="all")
    real = recover.refit_layers

    def undone(model, teacher, batches, heldout=None):
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        cal = real(model, teacher, batches, heldout)
        model.load_state_dict(saved)  # as _judged does when the fit does not lower the KL
        cal.kept_input = True
        return cal

    options = quick(local=LocalOptions(epochs=0), refit="auto", global_epochs=2)
    raced = prepare_starts(conv.model, teacher, train, conv.plan, options, [])
    assert set(raced.models) == {"converted", "refit"} and raced.refit["mode"] == "auto"
    monkeypatch.setattr(recover, "refit_layers", undone)
    alone = prepare_starts(convert(teacher, method="parameter-free", pf_policy="all").model, teacher, train,
                           conv.plan, options, [])
    assert set(alone.models) == {"converted"} and alone.refit["kept_input"] is True


def test_plans_race_under_a_latency_budget_and_what_is_written_is_the_winner(searched, digits_checkpoint, tmp_path,
                                                                            capsys):
    """Under a latency budget the table's plan races each uniform policy that meets the budget when timed (here
    pf-all, which the table's plan cannot be: every pf-max is made costly in the table) through the first global
    epoch; the checkpoint, search.json and a resumed search all hold the plan that won."""
    import shutil

    import torch

    from repconv.checkpoint import save
    from repconv.search.candidates import assemble_plan
    from repconv.search.select import fastest
    from repconv.search.table import load_table

    opts = quick(local=LocalOptions(epochs=0, batch_size=32), refit="off", global_epochs=2, latency_tolerance=0.9,
                 rivals=("pf-all",))  # a tolerance of 0.9: every plan meets the budget
    cache = tmp_path / "candidates.json"
    shutil.copy(searched[0] / "candidates.json", cache)
    table = load_table(cache)
    for key, figures in table.figures.items():
        if key.endswith(":pf-max"):
            figures.damage = 50.0
    table.save(cache)
    budget = round(1 - (1 - fastest(table).predicted_ratio) / 2, 3)
    said: list[str] = []
    res = search(digits_checkpoint, "digits", tmp_path / "o", latency_budget=budget, options=opts, cache=cache,
                 progress=said.append)
    assert [c["name"] for c in res.contenders] == ["searched", "pf-all"] and any("racing 2 plans" in m for m in said)
    assert res.contenders[1]["choice"] == {u.unit: "pf-max" for u in table.units}
    assert "pf-max" not in res.contenders[0]["choice"].values()
    assert set(res.start["scores"]) == {"searched", "pf-all"} and res.kept == res.start["chosen"]
    kept = next(c for c in res.contenders if c["name"] == res.kept)
    assert res.selection.choice == kept["choice"] and len(res.global_history) == 2
    loaded = repconv.load_checkpoint(tmp_path / "o" / "searched.repconv.safetensors")
    plan = assemble_plan(table.units, kept["choice"], arch=loaded.meta.arch, leaves=loaded.meta.plan.leaves)
    info = loaded.meta.extra["search"]
    assert loaded.meta.plan.digest() == plan.digest() and info["kept"] == res.kept and info["phase"] == "done"
    assert any(p["choice"] == kept["choice"] for p in res.latency_probes)  # its timing is among the probes
    assert res.predicted_ratio == pytest.approx(
        next(p for p in res.latency_probes if p["choice"] == kept["choice"])["predicted_ratio"])
    saved = json.loads((tmp_path / "o" / "search.json").read_text())
    assert saved["kept"] == res.kept and saved["contenders"] == res.contenders
    assert not list((tmp_path / "o").glob("*.start-*"))
    from repconv.cli import render_run

    capsys.readouterr()
    render_run.searched(res)  # what `repconv search` prints: the plans raced and the one kept
    printed = capsys.readouterr().out
    assert "Plans raced" in printed and f"{res.kept} kept" in printed and "pf-all" in printed
    with torch.no_grad():  # interrupted during the global stage: a resumed search goes on with the winner
        for p in loaded.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    loaded.meta.extra["search"] |= {"phase": "global"}
    save(tmp_path / "o" / "searched.repconv.safetensors", loaded.model, loaded.meta)
    said.clear()
    again = search(digits_checkpoint, "digits", tmp_path / "o", latency_budget=budget, options=opts, cache=cache,
                   progress=said.append, resume=True)
    assert again.kept == res.kept and again.selection.choice == res.selection.choice
    assert again.contenders == res.contenders and not any("racing" in m or "assembled plan" in m for m in said)
