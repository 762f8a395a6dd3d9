"""Group (fairness) metrics on hand-computed cases, and a run that reports them per group."""

import json

import pytest

from jaxft import group_metrics, trainer
from jaxft.errors import DataError
from tests.test_task_metrics import _classification_rows
from tests.test_trainer import small_config

GROUPS = ["A", "A", "B", "B", "B", None]
GOLD = ["pos", "neg", "pos", "pos", "neg", "pos"]
PREDICTED = ["pos", "pos", "neg", "pos", "neg", "pos"]


def test_scores_gaps_and_fairness_by_hand():
    report = group_metrics.by_group(["accuracy", "exact_match"], PREDICTED, GOLD, GROUPS, ["pos", "neg"])
    groups = report["groups"]
    assert list(groups) == ["(missing)", "A", "B"]  # a row without a group is counted, not dropped
    assert [groups[g]["count"] for g in groups] == [1, 2, 3]
    assert [groups[g]["accuracy"] for g in groups] == pytest.approx([1.0, 0.5, 2 / 3])
    assert report["gaps"]["accuracy"] == pytest.approx(0.5)
    fair = report["fairness"]
    # Selection rate of "pos": A 2/2, B 1/3, (missing) 1/1; of "neg": A 0, B 2/3, (missing) 0.
    assert fair["pos"]["selection_rate"] == pytest.approx({"(missing)": 1.0, "A": 1.0, "B": 1 / 3})
    assert fair["pos"]["demographic_parity_difference"] == pytest.approx(2 / 3)
    assert fair["neg"]["demographic_parity_difference"] == pytest.approx(2 / 3)
    # True positive rate of "pos": A 1/1, B 1/2, (missing) 1/1; of "neg": A 0/1, B 1/1 ((missing) has no neg row).
    assert fair["pos"]["true_positive_rate"] == pytest.approx({"(missing)": 1.0, "A": 1.0, "B": 0.5})
    assert fair["neg"]["true_positive_rate"] == pytest.approx({"A": 0.0, "B": 1.0})
    assert fair["pos"]["equal_opportunity_difference"] == pytest.approx(0.5)
    assert fair["equal_opportunity_difference"] == pytest.approx(1.0)
    assert fair["demographic_parity_difference"] == pytest.approx(2 / 3)
    flat = group_metrics.flat_scores(report)
    assert flat["eval_gap_accuracy"] == pytest.approx(0.5) and flat["eval_equal_opportunity_difference"] == 1.0
    text = group_metrics.table(report)
    assert "largest gap" in text and "(missing)" in text and "equal opportunity difference" in text


def test_equal_groups_have_no_gaps():
    report = group_metrics.by_group(["accuracy"], ["a", "b", "a", "b"], ["a", "b", "a", "b"], ["x", "x", "y", "y"],
                                    ["a", "b"])
    assert report["gaps"] == {"accuracy": 0.0}
    assert report["fairness"]["demographic_parity_difference"] == 0.0


def _rows_with_groups(tmp_path):
    data = tmp_path / "rows.jsonl"
    rows = [dict(r, length="short" if len(r["text"]) < 50 else "long") for r in _classification_rows()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_run_reports_every_score_per_group(tmp_path):
    config = small_config(**{"data.train": str(_rows_with_groups(tmp_path)), "data.eval": None,
                             "data.eval_fraction": 0.2, "eval.metrics": "exact_match,accuracy,f1,bleu,rouge",
                             "eval.generate_rows": 8, "eval.max_new_tokens": 4, "eval.group_field": "length",
                             "eval.every_steps": 0})
    trainer.run(config, tmp_path / "run")
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6]
    for r in evals:
        assert {"eval_gap_accuracy", "eval_gap_f1_macro", "eval_gap_bleu", "eval_gap_rougeL",
                "eval_demographic_parity_difference", "eval_equal_opportunity_difference"} <= set(r)
        answers = [json.loads(x) for x in (tmp_path / "run" / "eval" / f"step_{r['step']}.jsonl").read_text()
                   .splitlines()[1:]]
        assert {a["length"] for a in answers} <= {"short", "long"}
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["step"] == 6 and report["group_field"] == "length"
    assert sum(g["count"] for g in report["groups"].values()) == 8
    assert set(next(iter(report["groups"].values()))) >= {"count", "accuracy", "f1_macro", "exact_match", "bleu"}
    assert report["overall"]["accuracy"] == evals[-1]["eval_accuracy"]


def test_a_group_field_missing_from_the_eval_data_stops_the_run_before_training(tmp_path):
    config = small_config(**{"data.train": str(_rows_with_groups(tmp_path)), "data.eval": None,
                             "data.eval_fraction": 0.2, "eval.metrics": "accuracy", "eval.group_field": "dialect"})
    with pytest.raises(DataError, match="eval.group_field='dialect' is not a column of the eval data .*length"):
        trainer.run(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
