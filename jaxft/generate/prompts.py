"""Prompts as token ids, tokenised the way training tokenised them (jaxft/data/encode.py): BOS where the
tokenizer adds one and then the text without special tokens; a chat rendered by its template (which places its
own special tokens) up to the assistant's turn."""

from __future__ import annotations

from jaxft.data.encode import tokenizer_adds_bos
from jaxft.errors import DataError


def text_prompt(tokenizer, text: str, *, chat: bool = False, template: str | None = None) -> list[int]:
    """`text` as prompt ids; with `chat`, as one user turn of the chat template, ending where the assistant's
    answer begins."""
    if chat:
        return chat_prompt(tokenizer, [{"role": "user", "content": text}], template=template)
    bos = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prompt(tokenizer, messages: list[dict], *, template: str | None = None) -> list[int]:
    """The chat `messages` rendered by the template with the generation prompt (the assistant's turn opened)."""
    if not (template or getattr(tokenizer, "chat_template", None)):
        raise DataError("A chat prompt needs a chat template: this tokenizer has none (set data.chat_template in "
                        "the run, or drop --chat).")
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def row_prompt(tokenizer, row: dict, *, chat: bool = False, template: str | None = None,
               prompt_field: str = "prompt", messages_field: str = "messages") -> tuple[list[int], str | None]:
    """`(prompt ids, reference answer or None)` of a dataset row: a chat (`messages`, a trailing assistant turn
    being the reference) or a `prompt` field (with `completion` as the reference, if present)."""
    if messages_field in row:
        messages = list(row[messages_field])
        reference = None
        if messages and messages[-1].get("role") == "assistant":
            reference = messages.pop()["content"]
        if not messages:
            raise DataError(f"row's '{messages_field}' has no turn before the assistant's to answer")
        return chat_prompt(tokenizer, messages, template=template), reference
    if prompt_field in row and isinstance(row[prompt_field], str):
        return text_prompt(tokenizer, row[prompt_field], chat=chat, template=template), row.get("completion")
    fields = sorted(k for k in row if not k.startswith("_"))
    raise DataError(f"row has no '{prompt_field}' text or '{messages_field}' chat to answer (fields: {fields})")


def split_example(ids, loss_mask, stop_ids=()) -> tuple[list[int], list[int]]:
    """`(prompt, answer)` of an encoded training example: the answer is its last run of loss tokens (the
    completion, the last assistant turn, the label) without a final stop token, the prompt everything before."""
    ids, mask = list(ids), list(loss_mask)
    end = max((i + 1 for i, m in enumerate(mask) if m), default=0)
    if end == 0:
        raise DataError("an example with no loss tokens has no answer to generate")
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    if start == 0:
        raise DataError("an example trained on all its tokens (text format) has no prompt to answer")
    answer = ids[start:end]
    if answer and answer[-1] in stop_ids:
        answer = answer[:-1]
    return ids[:start], answer
