"""Numbers as people read them, shared by the CLI's tables and the HTML report."""

from __future__ import annotations

from repconv.formatting import human, pct, race_summary


def test_numbers():
    assert human(1234567) == "1.23M" and human(None) == "-" and pct(0.9123) == "91.23%" and pct(None) == "-"


def test_a_race_in_one_line_with_its_rungs_and_without():
    race = {"chosen": "b", "metric": "val_acc", "epochs": 3, "scores": {"a": 0.5, "b": 0.75, "c": 0.25},
            "rounds": [{"epochs": 1, "scores": {"a": 0.5, "b": 0.25, "c": 0.25}},
                       {"epochs": 3, "scores": {"a": 0.5, "b": 0.75}}]}
    assert race_summary(race) == ("val_acc after 1 epoch: a 50.00%, b 25.00%, c 25.00%; "
                                  "after 3 epochs: a 50.00%, b 75.00%")
    older = {k: v for k, v in race.items() if k != "rounds"}  # search.json written before rungs
    assert race_summary(older) == "val_acc after 3 epochs: a 50.00%, b 75.00%, c 25.00%"
