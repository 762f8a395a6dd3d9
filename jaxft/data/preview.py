"""The data a config trains on, as the model sees it: examples with their loss tokens marked, and the report.
`python -m jaxft.data --show N` prints it; `jaxft.preview_data(config)` returns it (jaxft/api.py)."""

import json

TRAINED_OPEN, TRAINED_CLOSE = "«", "»"


def render_example(tokenizer, ids, mask) -> str:
    """The example's text with each run of loss tokens wrapped in « »."""
    parts, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tokenizer.decode(ids[start:i])
            parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if mask[start] else text)
            start = i
    return "".join(parts)


def describe(data, tokenizer, split: str, count: int) -> str:
    """The first `count` examples of `split`, rendered, then the report as JSON."""
    return "\n".join([*rendered_examples(data, tokenizer, split, count), "--- data report",
                      json.dumps(data.report, indent=2)])


def rendered_examples(data, tokenizer, split: str, count: int) -> list[str]:
    """The first `count` examples of `split` ("train" or "eval"): a header line (source file and row, tokens,
    tokens in the loss, the label) and the text with its loss tokens between « »."""
    from jaxft.data.sources import resolve

    examples = data.train.examples if split == "train" else data.eval
    if examples is None:
        return ["(no eval set: set data.eval or data.eval_fraction)"]
    out = []
    for i in range(min(count, len(examples))):
        ids, mask = examples.get(i)
        file_index, row = examples.origin[i]
        where = resolve(examples.report["source"]).where(int(file_index), int(row))
        lines = [f"--- {split} example {i}  ({where}; {len(ids)} tokens, {int(mask.sum())} in the loss)"]
        if examples.labels is not None:
            lines.append(f"label id {int(examples.labels[i])} = {data.label_names[int(examples.labels[i])]!r}")
        lines.append(render_example(tokenizer, ids, mask))
        out.append("\n".join(lines))
    return out
