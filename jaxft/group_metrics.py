"""Does the model do equally well for every group? Task metrics per group of the eval rows (`eval.group_field`:
a column such as dialect, gender or language), the largest gap between groups, and for classification the two
fairness gaps fairlearn defines, one label at a time against the rest:

- demographic parity difference: max minus min over groups of the selection rate, P(predicted = label);
- equal opportunity difference: max minus min over groups of the true positive rate,
  P(predicted = label | gold = label) (groups without a gold `label` row have none and are left out).

Rows whose group value is missing (None or "") form the group "(missing)", so no row is silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxft import task_metrics

MISSING = "(missing)"


def group_name(value) -> str:
    return MISSING if value is None or value == "" else str(value)


def by_group(names: Sequence[str], predictions: Sequence[str], references: Sequence[str], groups: Sequence,
             label_names: Sequence[str] | None = None) -> dict:
    """`{"groups": {group: {"count", <score>...}}, "gaps": {<score>: max - min}, "fairness": {...}}`."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(group_name(g), []).append(i)
    per_group = {}
    for g, rows in sorted(members.items()):
        scores = task_metrics.compute(names, [predictions[i] for i in rows], [references[i] for i in rows],
                                      label_names)
        per_group[g] = dict(count=len(rows), **scores)
    keys = [k for k in next(iter(per_group.values())) if k != "count"] if per_group else []
    gaps = {k: max(s[k] for s in per_group.values()) - min(s[k] for s in per_group.values()) for k in keys}
    out = dict(groups=per_group, gaps=gaps)
    if label_names:
        predicted = [task_metrics.as_label(p, label_names) for p in predictions]
        gold = [task_metrics.as_label(r, label_names) for r in references]
        out["fairness"] = fairness_gaps(predicted, gold, [group_name(g) for g in groups], label_names)
    return out


def fairness_gaps(predicted: Sequence, gold: Sequence, groups: Sequence[str], label_names: Sequence[str]) -> dict:
    """Per label: `demographic_parity_difference` and `equal_opportunity_difference` over the groups, and
    each group's selection rate and true positive rate behind them; plus the largest of each over labels."""
    out = {}
    for label in label_names:
        selection, tpr = {}, {}
        for g in sorted(set(groups)):
            rows = [i for i, x in enumerate(groups) if x == g]
            selection[g] = sum(predicted[i] == label for i in rows) / len(rows)
            positives = [i for i in rows if gold[i] == label]
            if positives:
                tpr[g] = sum(predicted[i] == label for i in positives) / len(positives)
        out[label] = dict(selection_rate=selection, true_positive_rate=tpr,
                          demographic_parity_difference=max(selection.values()) - min(selection.values()),
                          equal_opportunity_difference=(max(tpr.values()) - min(tpr.values())) if tpr else 0.0)
    out["demographic_parity_difference"] = max(v["demographic_parity_difference"] for v in out.values())
    out["equal_opportunity_difference"] = max(out[label]["equal_opportunity_difference"] for label in label_names)
    return out


def flat_scores(report: dict) -> dict:
    """The headline numbers as `eval_*` scalars for metrics.jsonl: each score's gap and the fairness gaps."""
    out = {f"eval_gap_{k}": v for k, v in report["gaps"].items()}
    for key in ("demographic_parity_difference", "equal_opportunity_difference"):
        if "fairness" in report:
            out[f"eval_{key}"] = report["fairness"][key]
    return out


def table(report: dict) -> str:
    """The per-group scores as a text table: a row per group, a column per score, then the gaps."""
    groups = report["groups"]
    keys = ["count", *report["gaps"]]
    width = max([len("largest gap"), *(len(g) for g in groups)])
    lines = [" ".join([f"{'group':<{width}}", *(f"{k:>12}" for k in keys)])]
    for g, scores in groups.items():
        lines.append(" ".join([f"{g:<{width}}", *(_cell(scores[k]) for k in keys)]))
    lines.append(" ".join([f"{'largest gap':<{width}}", f"{'':>12}", *(_cell(report["gaps"][k]) for k in keys[1:])]))
    if "fairness" in report:
        for key in ("demographic_parity_difference", "equal_opportunity_difference"):
            lines.append(f"{key.replace('_', ' ')} (largest over labels): {report['fairness'][key]:.4g}")
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:>12}" if isinstance(value, int) else f"{value:>12.4g}"
