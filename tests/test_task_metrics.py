"""Task metrics (jaxft/task_metrics.py) against scikit-learn, sacrebleu and rouge-score on fixed predictions, and
a run that answers its eval rows, scores them, writes them, and keeps the best by one of the scores."""

import json

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, f1_score

from jaxft import task_metrics, trainer
from jaxft.config import validate
from jaxft.errors import ConfigError
from tests.conftest import QUICKSTART
from tests.test_trainer import small_config

PREDICTIONS = ["The cat sat on the mat.", "there are three words", "Paris", "a quick brown fox jumps", ""]
REFERENCES = ["the cat sat on a mat", "There are three words.", "Paris is the capital.", "The quick brown fox jumped",
              "nothing"]


def test_exact_match_normalises_as_squad_does():
    assert task_metrics.normalize_answer("  The  Cat, sat!  ") == "cat sat"
    assert task_metrics.exact_match(PREDICTIONS, REFERENCES) == pytest.approx(2 / 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_and_f1_equal_scikit_learn(seed):
    labels = ["positive", "negative", "neutral"]
    rng = np.random.default_rng(seed)
    gold = [labels[i] for i in rng.integers(0, 3, 40)]
    # Predictions: labels in other spellings, and answers that name no label at all.
    spelled = {"positive": "Positive.", "negative": " negative", "neutral": "NEUTRAL"}
    predicted = [spelled[labels[i]] if i < 3 else "no idea" for i in rng.integers(0, 4, 40)]
    ours = task_metrics.compute(["accuracy", "f1"], predicted, gold, labels)
    as_labels = [task_metrics.as_label(p, labels) or "<none>" for p in predicted]
    assert ours["accuracy"] == pytest.approx(accuracy_score(gold, as_labels))
    assert ours["f1_macro"] == pytest.approx(f1_score(gold, as_labels, labels=labels, average="macro",
                                                      zero_division=0))
    per_label = f1_score(gold, as_labels, labels=labels, average=None, zero_division=0)
    assert [ours[f"f1_{label}"] for label in labels] == pytest.approx(list(per_label))


def test_a_label_never_predicted_nor_present_scores_zero_as_scikit_learn_does():
    ours = task_metrics.classification_scores(["a", "a"], ["a", "a"], ["a", "b"])
    assert ours["f1_b"] == f1_score(["a", "a"], ["a", "a"], labels=["a", "b"], average=None, zero_division=0)[1]


def test_generation_metrics_equal_their_libraries():
    ours = task_metrics.compute(["bleu", "chrf", "rouge"], PREDICTIONS, REFERENCES)
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    assert ours["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = np.mean([scorer.score(r, p)[key].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)])
        assert ours[key] == pytest.approx(expected)
    assert 0 < ours["bleu"] < 100 and 0 < ours["rouge1"] < 1


def test_bad_metric_requests_are_named():
    with pytest.raises(ConfigError, match="unknown metric 'blue'; valid: exact_match, accuracy"):
        task_metrics.parse("exact_match, blue")
    with pytest.raises(ConfigError, match="needs labelled data"):
        task_metrics.compute(["accuracy"], ["a"], ["a"], None)
    config = small_config()
    config.eval.metrics, config.eval.best_metric = "exact_match", "bleu"
    with pytest.raises(ConfigError, match="eval.best_metric='bleu' is not something the evaluation reports"):
        validate(config)
    config.eval.best_metric, config.eval.best_mode = "exact_match", "up"
    with pytest.raises(ConfigError, match="eval.best_mode"):
        validate(config)


def test_accuracy_on_data_without_labels_stops_the_run(tmp_path):
    config = small_config(**{"eval.metrics": "accuracy"})
    with pytest.raises(ConfigError, match="eval.metrics=accuracy needs labelled data"):
        trainer.run(config, tmp_path)


def _classification_rows():
    pairs = [json.loads(line) for line in (QUICKSTART / "train.jsonl").read_text().splitlines()[:96]]
    for p in pairs:
        question = p["prompt"].split("\n")[1]
        yield {"text": question, "label": ["colour", "other"][int("colour" not in question)]}


def test_run_scores_its_answers_and_keeps_the_best_by_a_score(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _classification_rows()))
    config = small_config(**{"data.train": str(data), "data.eval": None, "data.eval_fraction": 0.2,
                             "eval.metrics": "exact_match,accuracy,f1,bleu,chrf,rouge", "eval.generate_rows": 6,
                             "eval.max_new_tokens": 6, "eval.best_metric": "f1_macro", "eval.keep_best": True})
    trainer.run(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    keys = {"eval_exact_match", "eval_accuracy", "eval_f1_macro", "eval_f1_colour", "eval_f1_other", "eval_bleu",
            "eval_chrf", "eval_rouge1", "eval_rouge2", "eval_rougeL"}
    assert [r["step"] for r in evals] == [0, 3, 6] and all(keys <= set(r) for r in evals)
    for r in evals:
        lines = (tmp_path / "run" / "eval" / f"step_{r['step']}.jsonl").read_text().splitlines()
        head, answers = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
        assert head["step"] == r["step"] and head["eval_accuracy"] == r["eval_accuracy"]
        assert len(answers) == 6 and {a["reference"] for a in answers} <= {"colour", "other"}
        assert r["eval_accuracy"] == pytest.approx(np.mean([a["prediction"] == a["reference"] for a in answers]))
    best = max(evals, key=lambda r: r["eval_f1_macro"])  # the first of equals wins, as min_delta=0 asks
    kept = sorted(int(p.name) for p in (tmp_path / "run" / "best").iterdir() if p.name.isdigit())
    assert kept == [best["step"]]
    meta = json.loads(next((tmp_path / "run" / "best" / str(best["step"])).rglob("metadata")).read_text())
    assert meta["metric"] == "eval_f1_macro" and meta["value"] == pytest.approx(best["eval_f1_macro"])
