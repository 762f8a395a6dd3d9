r"""Generate text with a Hugging Face model, a fine-tuned adapter, or what a jaxft run exported.

    python -m jaxft.generate --workdir runs/demo --prompt "Question: what is the capital of France?"
    python -m jaxft.generate --model /models/SmolLM2-135M-Instruct --adapter runs/x/export/adapter \
        --chat --prompt "Summarise: ..." --max-new-tokens 128
    python -m jaxft.generate --workdir runs/x --data eval.jsonl --out preds.jsonl --batch-size 16
    python -m jaxft.generate --model /models/base --adapter sql=runs/sql/export/adapter \
        --adapter chat=runs/chat/export/adapter --data rows.jsonl --out preds.jsonl

A single prompt streams its answer to the terminal. A file of JSON lines (each with a `prompt` text or a
`messages` chat; a trailing assistant turn is taken as the reference, not the prompt) is answered in
batches behind a progress bar, each row written back with `prediction` and `finish_reason` added.
`--chat` renders a prompt as a user turn of the tokenizer's chat template; with `--workdir` it is on
when the run trained on chats. Greedy by default; `--temperature`, `--top-k`, `--top-p`, `--seed` sample.
Several LoRA adapters (`--adapter NAME=DIR`, repeated) share one loaded base: a row's `adapter` field
names the one that answers it (default: the first), `--use NAME` the one for `--prompt`; the base is
read once and the adapters switched (jaxft/peft/adapter_set.py).
"""

import argparse
import json
import logging
import pathlib
import sys

from jaxft.cli import fail
from jaxft.errors import ConfigError, DataError, JaxftError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxft.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a Hugging Face model directory (or, with --workdir, instead of the run's base)")
    p.add_argument("--adapter", action="append", default=[],
                   help="a PEFT LoRA/DoRA or prompt-tuning adapter directory (or jaxft's adapters); NAME=DIR, "
                        "repeated, keeps several LoRA adapters on one base")
    p.add_argument("--use", help="with several --adapter NAME=DIR: the adapter that answers --prompt")
    p.add_argument("--workdir", help="a jaxft run directory: its exported model or adapter, its chat settings")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt to answer, streamed to the terminal")
    source.add_argument("--data", help="a JSONL file of rows to answer (needs --out)")
    p.add_argument("--out", help="where --data's answers go (JSONL)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts with the chat template (default: as the --workdir run trained)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together (--data)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    a = p.parse_args(argv)
    if a.data and not a.out:
        p.error("--data needs --out (the JSONL file the answers go to)")
    if a.batch_size < 1:
        p.error("--batch-size must be at least 1")
    a.adapters = named_adapters(p, a.adapter)
    if a.use is not None and a.use not in (a.adapters or {}):
        p.error(f"--use {a.use!r} names none of the adapters given ({sorted(a.adapters or {})})")
    a.adapter = a.adapter[0] if len(a.adapter) == 1 and a.adapters is None else None
    return a


def named_adapters(p, given: list[str]) -> dict[str, str] | None:
    """`--adapter NAME=DIR` options as {name: directory} (in order), or None for at most one plain `--adapter`."""
    if len(given) <= 1 and not any("=" in g for g in given):
        return None
    named = {}
    for item in given:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            p.error(f"with several adapters each --adapter is NAME=DIR, not {item!r}")
        if name in named:
            p.error(f"--adapter name {name!r} is given twice")
        named[name] = directory
    return named


def read_rows(path) -> list[dict]:
    """The JSON objects of a JSONL file; DataError names the file and line of the first that is not a usable row
    (the checks the training data gets: jaxft/data/sources.py)."""
    from jaxft.data.sources import diagnose_json_lines
    try:
        diagnose_json_lines(str(path))
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None


def stream_one(model, tokenizer, ids, config) -> None:
    from jaxft.generate import generate
    printed = [""]

    def show(rows):
        text = tokenizer.decode(rows[0], skip_special_tokens=True)
        for stop in config.stop_strings:  # never print past a stop string
            text = text.split(stop)[0]
        if text.startswith(printed[0]):
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    out = generate(model, [ids], config, tokenizer=tokenizer, on_chunk=show)
    if out.texts[0].startswith(printed[0]):
        sys.stdout.write(out.texts[0][len(printed[0]):])
    sys.stdout.write("\n")


def answered(model, tokenizer, rows, prompts, config, batch_size: int, bar):
    """Each row with its `prediction` and `finish_reason`, in order, decoded in batches; `bar` counts them."""
    from jaxft.generate import generate_in_batches
    for start, result in generate_in_batches(model, prompts, config, batch_size, tokenizer=tokenizer):
        for row, text, reason in zip(rows[start:], result.texts, result.finish_reasons):
            yield {**row, "prediction": text, "finish_reason": reason}
        bar.update(len(result.texts))


def write_rows(out_path, rows) -> None:
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def answer_file(model, tokenizer, rows, prompts, config, batch_size: int, out_path) -> None:
    from tqdm import tqdm
    with tqdm(total=len(rows), unit="row", desc="generating") as bar:
        write_rows(out_path, answered(model, tokenizer, rows, prompts, config, batch_size, bar))


def run(a) -> None:
    from jaxft.generate import GenerationConfig
    from jaxft.generate.load import load_model, sources, stop_token_ids, trained_format
    from jaxft.generate.prompts import row_prompt, text_prompt
    if a.adapters is not None and a.workdir is not None:
        raise ConfigError("give several --adapter NAME=DIR with --model (their base), not with --workdir")
    model, tokenizer, run_config = load_model(a.model, adapter=a.adapter, workdir=a.workdir, dtype=a.dtype)
    adapters = _adapter_set(model, a.adapters)
    data_cfg = (run_config or {}).get("data", {})
    chat = a.chat if a.chat is not None else trained_format(a.workdir, data_cfg) == "messages"
    template = data_cfg.get("chat_template") or None
    model_dir = sources(a.model, adapter=a.adapter, workdir=a.workdir)[1]
    config = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                              top_p=a.top_p, seed=a.seed, eos_token_ids=stop_token_ids(tokenizer, model_dir),
                              stop_strings=tuple(a.stop), pad_token_id=tokenizer.pad_token_id or 0)
    if a.prompt is not None:
        if adapters is not None:
            _activate(model, adapters, a.use or next(iter(a.adapters)))
        return stream_one(model, tokenizer, text_prompt(tokenizer, a.prompt, chat=chat, template=template), config)
    rows = read_rows(a.data)
    prompts = []
    for number, row in enumerate(rows, 1):
        try:
            prompts.append(row_prompt(tokenizer, row, chat=chat, template=template)[0])
        except DataError as e:
            raise DataError(f"{a.data}: row {number}: {e}") from None
    if adapters is None:
        return answer_file(model, tokenizer, rows, prompts, config, a.batch_size, a.out)
    answer_file_by_adapter(model, adapters, tokenizer, rows, prompts, config, a)


def _adapter_set(model, named):
    """The named adapters, read once, on the loaded base; None without any."""
    if named is None:
        return None
    from jaxft.peft.adapter_set import AdapterSet
    adapters = AdapterSet(model)
    for name, directory in named.items():
        adapters.add(name, directory)
    return adapters


def _activate(model, adapters, name: str) -> None:
    from jaxft.models import stack
    adapters.activate(name)
    stack.layout_for_loop(model)  # wrapping may have regrouped the blocks


def answer_file_by_adapter(model, adapters, tokenizer, rows, prompts, config, a) -> None:
    """Rows answered by the adapter each names (`adapter` field; default the first given), one adapter at a
    time over one loaded base, written in the file's order with the adapter's name."""
    default = next(iter(a.adapters))
    chosen = [row.get("adapter", default) for row in rows]
    unknown = sorted({c for c in chosen if c not in a.adapters}, key=str)
    if unknown:
        raise DataError(f"{a.data}: rows name adapters {unknown} that no --adapter NAME=DIR gives "
                        f"({sorted(a.adapters)}).")
    from tqdm import tqdm
    answers: dict[int, dict] = {}
    with tqdm(total=len(rows), unit="row", desc="generating") as bar:
        for name in a.adapters:
            picked = [i for i, c in enumerate(chosen) if c == name]
            if not picked:
                continue
            _activate(model, adapters, name)
            done = answered(model, tokenizer, [rows[i] for i in picked], [prompts[i] for i in picked], config,
                            a.batch_size, bar)
            answers.update((i, dict(row, adapter=name)) for i, row in zip(picked, done))
    write_rows(a.out, (answers[i] for i in range(len(rows))))


def main(argv=None) -> None:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", force=True)
    try:
        run(a)
    except JaxftError as e:
        fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
