"""Evaluators: loss and perplexity over target tokens, and task metrics over answers the model generates
for the eval rows (`eval.metrics`, jaxft/task_metrics.py), per group with `eval.group_field`
(jaxft/group_metrics.py)."""

import functools
import json
import logging
import math
import pathlib

import jax
import numpy as np
from flax import nnx

from jaxft import data as data_lib
from jaxft import group_metrics, task_metrics
from jaxft.errors import ConfigError
from jaxft.generate import GenerationConfig, generate_in_batches
from jaxft.generate.load import stop_token_ids
from jaxft.generate.prompts import split_example

log = logging.getLogger("jaxft")


def loss_and_perplexity(loss_sums_fn, batches) -> dict:
    """Token-weighted mean loss over all `batches` and its perplexity.

    `loss_sums_fn(batch)` returns (sum of token losses, number of target tokens); summing
    both before dividing weights every token equally, however the tokens fall into batches.
    """
    sums = [loss_sums_fn(batch) for batch in batches]  # dispatch all before reading any back
    total, count = (float(sum(x)) for x in zip(*jax.device_get(sums)))
    loss = total / max(count, 1.0)
    return dict(eval_loss=loss, eval_perplexity=math.exp(min(loss, 700.0)), eval_tokens=int(count))


def answer_eval_rows(model, examples, tokenizer, *, rows: int | None, max_new_tokens: int, batch_size: int,
                     stop_ids, pad_id: int, mesh=None) -> list[dict]:
    """Greedy answers to the first `rows` eval examples (all by default). Each example's prompt is everything
    before its last trained span (the completion, the last assistant turn, the label), the reference that span.
    Returns one record per example: prompt, reference, prediction (texts), finish_reason, its source row."""
    n = len(examples) if rows is None else min(rows, len(examples))
    prompts, references = [], []
    for i in range(n):
        prompt, answer = split_example(*examples.get(i), stop_ids=stop_ids)
        prompts.append(prompt)
        references.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_ids=tuple(stop_ids), pad_token_id=pad_id)
    records = []
    for start, out in generate_in_batches(model, prompts, config, batch_size, tokenizer=tokenizer, mesh=mesh):
        for j, (text, reason) in enumerate(zip(out.texts, out.finish_reasons)):
            i = start + j
            records.append(dict(prompt=tokenizer.decode(prompts[i]), reference=references[i], prediction=text.strip(),
                                finish_reason=reason,
                                source=dict(file=int(examples.origin[i][0]), row=int(examples.origin[i][1]))))
    return records


def classify_eval_rows(label_logits, examples, tokenizer, label_names, *, rows: int | None) -> list[dict]:
    """A sequence classifier's labels for the first `rows` eval examples (all by default), from
    `label_logits(examples, n)` (`[n, num_labels]` logits of the first n). One record per example, as
    `answer_eval_rows` gives: prompt (the text), reference and prediction (label names), the predicted label's
    probability, the label logits, its source row."""
    n = len(examples) if rows is None else min(rows, len(examples))
    logits = np.asarray(label_logits(examples, n), np.float64)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    records = []
    for i, k in enumerate(np.argmax(logits, axis=1)):
        records.append(dict(prompt=tokenizer.decode(examples.get(i)[0], skip_special_tokens=True),
                            reference=label_names[int(examples.labels[i])], prediction=label_names[int(k)],
                            probability=round(float(probabilities[i, k]), 6),
                            logits=[round(float(x), 6) for x in logits[i]],
                            source=dict(file=int(examples.origin[i][0]), row=int(examples.origin[i][1]))))
    return records


def task_scores(records: list[dict], names, label_names=None) -> dict:
    """`eval_<score>` for every metric in `names` over the records' predictions and references."""
    scores = task_metrics.compute(names, [r["prediction"] for r in records], [r["reference"] for r in records],
                                  label_names)
    return {f"eval_{k}": v for k, v in scores.items()}


def write_answers(path, step: int, records: list[dict], scores: dict) -> pathlib.Path:
    """The answers of one evaluation as JSON lines, after a first line with the step and its scores."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        f.write(json.dumps(dict(step=step, **scores)) + "\n")
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def read_answers(path) -> tuple[dict, list[dict]]:
    """`(scores, records)` of a file `write_answers` wrote."""
    lines = pathlib.Path(path).read_text().splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def check_requests(config, data) -> list | None:
    """Before any training: the task metrics fit the data (labels where they need them); the group of each eval
    example (`eval.group_field`), None without one."""
    names = task_metrics.parse(config.eval.metrics)
    needing = [n for n in names if n in task_metrics.NEEDS_LABELS]
    if needing and data.label_names is None:
        raise ConfigError(f"eval.metrics={','.join(needing)} needs labelled data (data.format=classification, "
                          f"with a {config.data.label_field!r} field); this data has no labels.")
    if not (names and config.eval.group_field and data.eval is not None):
        return None
    return data_lib.eval_column(config, data.eval, config.eval.group_field)


def answerer(config, eval_graphdef, frozen, eval_set, tokenizer, label_names, groups, pad_id, batch_size, mesh,
             workdir, label_logits=None):
    """`answer(step, params) -> scores`: the eval rows answered by the model with `params` and scored by
    `eval.metrics`, the answers written to <workdir>/eval/step_<N>.jsonl; no scores when none are asked for.
    A language model generates its answers; a sequence classifier's are its head's labels
    (`label_logits(params, examples, n)` gives their logits)."""
    names = task_metrics.parse(config.eval.metrics)
    if not names or eval_set is None:
        return lambda step, params: {}
    stop_ids = stop_token_ids(tokenizer, config.model.path)
    field = config.eval.group_field

    def records_for(params):
        if label_logits is not None:
            return classify_eval_rows(functools.partial(label_logits, params), eval_set, tokenizer, label_names,
                                      rows=config.eval.generate_rows)
        model = nnx.merge(eval_graphdef, params, frozen)
        return answer_eval_rows(model, eval_set, tokenizer, rows=config.eval.generate_rows,
                                max_new_tokens=config.eval.max_new_tokens, batch_size=batch_size,
                                stop_ids=stop_ids, pad_id=pad_id, mesh=mesh)

    def answer(step, params):
        records = records_for(params)
        scores = task_scores(records, names, label_names)
        report = None
        if groups is not None:
            for record, group in zip(records, groups):
                record[field] = group
            report = group_metrics.by_group(names, [r["prediction"] for r in records],
                                            [r["reference"] for r in records], groups[:len(records)], label_names)
            scores.update(group_metrics.flat_scores(report))
        if jax.process_index() == 0:
            write_answers(workdir / "eval" / f"step_{step}.jsonl", step, records, scores)
            if report is not None:
                report = dict(step=step, group_field=field, overall={k[5:]: v for k, v in scores.items()}, **report)
                (workdir / "eval" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return scores

    return answer


def show_answers_before_and_after(workdir, count: int = 3) -> None:
    """Log the first eval answers of the first and the last evaluation side by side, with their scores: did
    fine-tuning change what the model says?"""
    steps = sorted(int(p.stem.split("_")[1]) for p in (workdir / "eval").glob("step_*.jsonl"))
    if len(steps) < 2:
        return
    first, last = (read_answers(workdir / "eval" / f"step_{s}.jsonl") for s in (steps[0], steps[-1]))
    scores = lambda head: " ".join(f"{k}={v:.4g}" for k, v in head.items() if k != "step")  # noqa: E731
    lines = [f"Answers at step {steps[0]} ({scores(first[0])}) and step {steps[-1]} ({scores(last[0])}):"]
    for before, after in list(zip(first[1], last[1]))[:count]:
        lines += [f"  prompt:    {before['prompt']!r}", f"  reference: {before['reference']!r}",
                  f"  step {steps[0]:<5}: {before['prediction']!r}", f"  step {steps[-1]:<5}: {after['prediction']!r}"]
    log.info("\n".join(lines))


def show_group_report(workdir) -> None:
    """Log the latest evaluation's scores by group (eval/report.json) as a table, if there is one."""
    path = pathlib.Path(workdir) / "eval" / "report.json"
    if path.is_file():
        report = json.loads(path.read_text())
        log.info("Scores by %s at step %d (also in eval/report.json):\n%s", report["group_field"], report["step"],
                 group_metrics.table(report))
