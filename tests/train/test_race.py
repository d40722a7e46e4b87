"""The race of recovery starts: the better start wins after the first epoch, a larger field is halved at each rung,
and the winner's run continues exactly where it stopped (the same weights as an uninterrupted run); ties go to the
start listed first."""

from __future__ import annotations

import copy

import pytest
import torch

import repconv
from repconv.errors import OptionError
from repconv.train.loop import TrainConfig, fit, metrics_path_for, state_path_for
from repconv.train.race import race, race_output

CFG = TrainConfig(epochs=3, batch_size=32, batches_per_epoch=2, lr=1e-4, objective="distill", trainable="all",
                  keep="best", bn_stats="freeze")


@pytest.fixture
def teacher_and_data(digits_checkpoint):
    from repconv.data import digits

    loaded = repconv.load_checkpoint(digits_checkpoint)
    m = loaded.meta
    return loaded.model.eval(), digits("train", m.input_size[-1], m.mean, m.std)


def test_the_better_start_wins_and_continues(teacher_and_data, tmp_path):
    teacher, train = teacher_and_data
    broken = copy.deepcopy(teacher)
    with torch.no_grad():  # a start that agrees with the teacher by chance only
        broken.fc.weight.normal_(generator=torch.Generator().manual_seed(0))
    output = tmp_path / "model.repconv.safetensors"
    said: list[str] = []
    winner, result = race({"broken": broken, "good": copy.deepcopy(teacher)}, train, CFG, teacher=teacher,
                          output=output, say=said.append)
    assert said == ["race to epoch 1, 1/2: the broken model", "race to epoch 1, 2/2: the good model"]
    # digits are labeled, so the hold-out of the training images scores accuracy (unlabeled: agreement)
    assert result.chosen == "good" and result.metric == "val_acc" and result.epochs == 1
    assert [r["epochs"] for r in result.rounds] == [1]  # the half of two is one: no second rung
    assert result.scores["good"] > result.scores["broken"]
    assert state_path_for(output).is_file() and metrics_path_for(output).is_file()
    for name in ("broken", "good"):
        assert not state_path_for(race_output(output, name)).exists()
        assert not metrics_path_for(race_output(output, name)).exists()
    done = fit(winner, train, CFG, teacher=teacher, output=output, resume=True)
    assert done.resumed_from_epoch == 1 and len(done.history) == CFG.epochs


def test_a_continued_start_ends_as_an_uninterrupted_run_and_ties_go_first(teacher_and_data, tmp_path):
    teacher, train = teacher_and_data
    start = copy.deepcopy(teacher)
    with torch.no_grad():
        start.fc.weight.mul_(0.5)
    straight = copy.deepcopy(start)
    fit(straight, train, CFG, teacher=teacher, output=tmp_path / "straight")
    output = tmp_path / "raced"
    winner, result = race({"first": copy.deepcopy(start), "second": copy.deepcopy(start)}, train, CFG,
                          teacher=teacher, output=output)
    assert result.chosen == "first" and result.scores["first"] == result.scores["second"]
    fit(winner, train, CFG, teacher=teacher, output=output, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), winner.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_larger_field_is_halved_at_each_rung_and_the_winner_continues_exactly(teacher_and_data, tmp_path):
    teacher, train = teacher_and_data
    broken, half = copy.deepcopy(teacher), copy.deepcopy(teacher)
    with torch.no_grad():
        broken.fc.weight.normal_(generator=torch.Generator().manual_seed(0))
        half.fc.weight.mul_(0.5)
    starts = {"broken": broken, "good": copy.deepcopy(teacher), "half": half}
    untouched = copy.deepcopy(starts)
    output = tmp_path / "raced"
    said: list[str] = []
    winner, result = race(starts, train, CFG, teacher=teacher, output=output, epochs=(1, 2), say=said.append)
    first, second = result.rounds
    assert first["epochs"] == 1 and list(first["scores"]) == ["broken", "good", "half"]
    # ceil(3 / 2) = 2 go on; the broken start (chance agreement) is the one dropped
    assert second["epochs"] == 2 and set(second["scores"]) == {"good", "half"}
    assert len(said) == 5 and said[-1].startswith("race to epoch 2, 2/2")
    assert result.chosen in second["scores"] and result.epochs == 2
    assert result.scores[result.chosen] == max(second["scores"].values())
    assert not any(tmp_path.glob("raced.start-*"))
    done = fit(winner, train, CFG, teacher=teacher, output=output, resume=True)
    assert done.resumed_from_epoch == 2
    straight = untouched[result.chosen]
    fit(straight, train, CFG, teacher=teacher, output=tmp_path / "straight")
    for (name, a), b in zip(straight.state_dict().items(), winner.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_one_start_is_not_raced_and_bad_options_say_so(teacher_and_data, tmp_path):
    teacher, train = teacher_and_data
    model, result = race({"only": teacher}, train, CFG, teacher=teacher, output=tmp_path / "o")
    assert model is teacher and result.chosen == "only" and result.epochs == 0
    assert not state_path_for(tmp_path / "o").exists()
    with pytest.raises(OptionError, match="race_epochs=0 must be at least 1"):
        race({"a": teacher, "b": teacher}, train, CFG, teacher=teacher, output=tmp_path / "o", epochs=0)
    with pytest.raises(OptionError, match="race_epochs='3,1' must be at least 1 and increasing"):
        race({"a": teacher, "b": teacher}, train, CFG, teacher=teacher, output=tmp_path / "o", epochs=(3, 1))
    with pytest.raises(OptionError, match="starts"):
        race({}, train, CFG, teacher=teacher, output=tmp_path / "o")
