"""Row formats: what a row's fields mean, and which of its text the model is trained on.

Each format renders a row into text segments, each marked trained or not:

- `text`: one trained segment (continued pretraining);
- `prompt_completion`: the prompt untrained, the completion trained;
- `messages`: a chat (`[{"role", "content"}, ...]`) rendered with the tokenizer's
  chat template (or `data.chat_template`); only the assistant turns are trained,
  each up to and including the template's end-of-turn marker, so the model
  learns to stop;
- `classification`: `data.classification_prompt` around the text, untrained,
  then the label's name, trained. For a classification head
  (`peft.task=sequence_classification`) the row is the text alone, as
  `tokenizer(text)` gives it at inference, and its label id is the target.

Segments are tokenised separately (encode.py), the way a prompt is tokenised
alone at inference and the answer generated after it.
"""

import dataclasses
import pathlib

from jaxft.errors import DataError

FORMATS = ("text", "prompt_completion", "messages", "classification")


class RowError(Exception):
    """One row cannot be used. `reason` keys the report's drop counts; the message says what is wrong."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class Rendered:
    segments: list[tuple[str, bool]]  # (text, trained)
    label: int | None = None
    bos_eos: bool = True  # False where a chat template already places the special tokens
    head: bool = False  # the label id is the target (a classification head), not any of the tokens


def detect_format(columns, cfg) -> str:
    """`data.format`, or the format the column names imply."""
    if cfg.format != "auto":
        return cfg.format
    columns = set(columns)
    if cfg.messages_field in columns:
        return "messages"
    if cfg.prompt_field in columns and cfg.completion_field in columns:
        return "prompt_completion"
    if cfg.text_field in columns and cfg.label_field in columns:
        return "classification"
    if cfg.text_field in columns:
        return "text"
    raise DataError(
        f"Cannot tell the data format from columns {sorted(c for c in columns if not c.startswith('_'))}; "
        f"expected '{cfg.text_field}', '{cfg.prompt_field}'+'{cfg.completion_field}', '{cfg.messages_field}' "
        f"or '{cfg.text_field}'+'{cfg.label_field}' (rename them with data.*_field, or set data.format).")


def classification_head(config, fmt: str) -> bool:
    """Whether rows are encoded for a classification head (`peft.task=sequence_classification`); DataError when
    the data has no labels to train one on."""
    if config.peft.task != "sequence_classification":
        return False
    if fmt != "classification":
        raise DataError(f"peft.task=sequence_classification trains a head on labels, but the data is in {fmt!r} "
                        f"format; give rows with '{config.data.text_field}' and '{config.data.label_field}' "
                        f"fields (data.format=classification).")
    return True


def make_renderer(fmt: str, cfg, tokenizer, label_names: list[str] | None = None, head: bool = False):
    """A function row -> Rendered for `fmt`; it raises RowError for a row it cannot use. `head`: classification
    rows for a classification head (their text alone, the label as the target)."""
    if fmt == "text":
        return lambda row: _render_text(row, cfg)
    if fmt == "prompt_completion":
        return lambda row: _render_prompt_completion(row, cfg)
    if fmt == "messages":
        template = chat_template(cfg, tokenizer)
        return lambda row: _render_messages(row, cfg, tokenizer, template)
    if fmt == "classification":
        label_ids = {name: i for i, name in enumerate(label_names)}
        render = _render_classification_input if head else _render_classification
        return lambda row: render(row, cfg, label_ids)
    raise DataError(f"data.format={fmt!r} is not one of {FORMATS}.")


def _string(row, name) -> str:
    if name not in row or row[name] is None:
        fields = sorted(k for k in row if not k.startswith("_") and row[k] is not None)
        raise RowError("missing_field", f"missing field '{name}' (row has {fields})")
    value = row[name]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _nonempty(text: str, what: str, cfg) -> str:
    if cfg.drop_empty and not text.strip():
        raise RowError("empty", f"{what} is empty")
    return text


def _render_text(row, cfg) -> Rendered:
    text = _string(row, cfg.text_field)
    text = text.strip() if cfg.strip else text
    return Rendered([(_nonempty(text, f"'{cfg.text_field}'", cfg), True)])


def _render_prompt_completion(row, cfg) -> Rendered:
    prompt, completion = _string(row, cfg.prompt_field), _string(row, cfg.completion_field)
    if cfg.strip:  # only the outer ends: the completion's leading space is part of its first token
        prompt, completion = prompt.lstrip(), completion.rstrip()
    return Rendered([(prompt, False), (_nonempty(completion, f"'{cfg.completion_field}'", cfg), True)])


def _text_and_label(row, cfg, label_ids) -> tuple[str, str]:
    text = _string(row, cfg.text_field)
    text = text.strip() if cfg.strip else text
    name = label_name(row.get(cfg.label_field))
    if name is None:
        raise RowError("missing_field", f"missing field '{cfg.label_field}'")
    if name not in label_ids:
        raise RowError("unknown_label", f"label {name!r} is not in the label set {sorted(label_ids)}; add it to "
                                        f"data.labels or fix the row")
    return _nonempty(text, f"'{cfg.text_field}'", cfg), name


def _render_classification(row, cfg, label_ids) -> Rendered:
    text, name = _text_and_label(row, cfg, label_ids)
    prompt = cfg.classification_prompt.format(text=text)
    return Rendered([(prompt, False), (" " + name, True)], label=label_ids[name])


def _render_classification_input(row, cfg, label_ids) -> Rendered:
    text, name = _text_and_label(row, cfg, label_ids)
    return Rendered([(text, False)], label=label_ids[name], head=True)


def configured_labels(cfg) -> list[str] | None:
    """`data.labels` as a list in id order, or None when it is not set."""
    if not cfg.labels:
        return None
    return [name.strip() for name in cfg.labels.split(",") if name.strip()]


def label_name(value) -> str | None:
    """A label as the name it is trained and saved under (ints and bools as their text)."""
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def chat_template(cfg, tokenizer) -> str:
    """`data.chat_template` (Jinja text, or a path to a file holding it), else the tokenizer's own."""
    given = cfg.chat_template
    if given:
        if "{{" in given or "{%" in given:
            return given
        path = pathlib.Path(given)
        if not path.is_file():
            raise DataError(f"data.chat_template={given!r} is neither a Jinja template nor an existing file; give "
                            f"the template text itself or the path of a file holding it.")
        return path.read_text()
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("The data is in 'messages' format but the tokenizer has no chat template; set "
                        "data.chat_template to a Jinja template or a file holding one.")
    return tokenizer.chat_template


def _render_messages(row, cfg, tokenizer, template) -> Rendered:
    messages = row.get(cfg.messages_field)
    if messages is None:
        raise RowError("missing_field", f"missing field '{cfg.messages_field}'")
    if not isinstance(messages, list) or not messages:
        raise RowError("wrong_type", f"field '{cfg.messages_field}' must be a non-empty list of "
                                     f"{{'role', 'content'}} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError("bad_message", f"message {i} must be an object with string 'role' and 'content'")
        clean.append({"role": m["role"], "content": m["content"].strip() if cfg.strip else m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
        raise RowError("no_assistant_turn", "the chat has no assistant turn with content to train on")

    def render(msgs, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    # The text before assistant turn i is the template's rendering of the turns before
    # it plus the generation prompt; the turn ends where rendering turns [:i+1] ends.
    full = render(clean)
    segments, done = [], 0
    for i, m in enumerate(clean):
        if m["role"] != "assistant":
            continue
        before = render(clean[:i], True) if i else ""
        through = render(clean[: i + 1])
        if not (full.startswith(before) and full.startswith(through)):
            raise DataError("The chat template renders earlier turns differently once later turns follow, so "
                            "the assistant turns cannot be located for loss masking; set data.chat_template "
                            "to a template whose rendering of a chat prefix is a prefix of the whole.")
        start, end = len(before), len(through)
        segments += [(full[done:start], False), (full[start:end], True)]
        done = end
    segments.append((full[done:], False))
    return Rendered([s for s in segments if s[0]], bos_eos=False)
