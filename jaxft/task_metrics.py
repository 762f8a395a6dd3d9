"""Task metrics over generated answers: did the fine-tuned model answer what the data says?

`eval.metrics` names them (comma-separated):

- `exact_match`: answer == reference after SQuAD's normalisation (lower case; punctuation, the
  articles a/an/the and extra spaces dropped); 0-1.
- `accuracy`: predicted label == gold label, on classification data, the answer read as a label name; 0-1.
- `f1`: F1 per label (`f1_<label>`) and their unweighted mean (`f1_macro`), as scikit-learn's
  `f1_score(labels=..., zero_division=0)` computes them (tested against it); 0-1.
- `bleu`, `chrf`: corpus BLEU and chrF by sacrebleu, with its defaults; 0-100.
- `rouge`: ROUGE-1, ROUGE-2 and ROUGE-L F-measure by rouge-score (stemmed), averaged over rows; 0-1.

An answer that names no label counts as wrong for accuracy and as a miss of its gold label for F1.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from jaxft.errors import ConfigError

METRICS = ("exact_match", "accuracy", "f1", "bleu", "chrf", "rouge")
NEEDS_LABELS = ("accuracy", "f1")  # classification data only
LIBRARIES = {"bleu": "sacrebleu", "chrf": "sacrebleu", "rouge": "rouge_score"}
LOWER_IS_BETTER = ("loss", "perplexity")


def parse(spec: str | None) -> tuple[str, ...]:
    """`eval.metrics` as a tuple of names; ConfigError names an unknown one and the valid ones."""
    names = tuple(n.strip() for n in (spec or "").split(",") if n.strip())
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown metric {unknown[0]!r}; valid: {', '.join(METRICS)}.")
    return names


def score_keys(names: Sequence[str], label_names: Sequence[str] | None = None) -> list[str]:
    """The keys `compute` returns for `names` (without the `eval_` prefix)."""
    keys = []
    for name in names:
        if name == "f1":
            keys += ["f1_macro"] + [f"f1_{label}" for label in (label_names or [])]
        elif name == "rouge":
            keys += ["rouge1", "rouge2", "rougeL"]
        else:
            keys.append(name)
    return keys


def check_available(names: Sequence[str]) -> None:
    """ConfigError if a metric's library is not installed (before any training)."""
    import importlib.util
    for name in names:
        module = LIBRARIES.get(name)
        if module and importlib.util.find_spec(module) is None:
            package = {"sacrebleu": "sacrebleu", "rouge_score": "rouge-score"}[module]
            raise ConfigError(f"eval.metrics={name!r} is computed by {package}, which is not installed: "
                              f"pip install {package} (or pip install 'jaxft[metrics]').")


def compute(names: Sequence[str], predictions: Sequence[str], references: Sequence[str],
            label_names: Sequence[str] | None = None) -> dict[str, float]:
    """Every metric in `names` over aligned predictions and references (label names for classification)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    out = {}
    for name in names:
        if name == "exact_match":
            out[name] = exact_match(predictions, references)
        elif name in NEEDS_LABELS:
            if not label_names:
                raise ConfigError(f"eval.metrics={name!r} needs labelled data (data.format=classification); "
                                  "this eval set has no labels.")
            scores = classification_scores([as_label(p, label_names) for p in predictions],
                                           [as_label(r, label_names) for r in references], label_names)
            out.update({k: v for k, v in scores.items() if k in score_keys([name], label_names)})
        elif name == "bleu":
            import sacrebleu
            out[name] = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
        elif name == "chrf":
            import sacrebleu
            out[name] = sacrebleu.corpus_chrf(list(predictions), [list(references)]).score
        elif name == "rouge":
            out.update(rouge(predictions, references))
    return out


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and the articles a/an/the dropped, spaces collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    if not predictions:
        return 0.0
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(predictions)


def as_label(text: str, label_names: Sequence[str]) -> str | None:
    """The label an answer names (compared after normalisation), or None."""
    wanted = normalize_answer(text)
    for name in label_names:
        if normalize_answer(name) == wanted:
            return name
    return None


def classification_scores(predicted: Sequence[str | None], gold: Sequence[str | None],
                          label_names: Sequence[str]) -> dict[str, float]:
    """accuracy, f1_macro and f1_<label>: per label F1 = 2 TP / (2 TP + FP + FN) (0 where that is 0/0)."""
    n = len(gold)
    out = {"accuracy": sum(p == g for p, g in zip(predicted, gold)) / n if n else 0.0}
    f1s = []
    for label in label_names:
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        out[f"f1_{label}"] = f1
        f1s.append(f1)
    out["f1_macro"] = sum(f1s) / len(f1s) if f1s else 0.0
    return out


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer
    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    sums = dict.fromkeys(keys, 0.0)
    for p, r in zip(predictions, references):
        scores = scorer.score(r, p)  # (target, prediction)
        for k in keys:
            sums[k] += scores[k].fmeasure
    return {k: v / max(len(predictions), 1) for k, v in sums.items()}


def better_is_higher(metric: str) -> bool:
    """Whether a larger value of `metric` (an eval key without `eval_`) is better."""
    return metric not in LOWER_IS_BETTER
