"""jaxft from Python: what the notebooks use, and what the command lines do.

    import jaxft
    config = jaxft.from_recipe("configs/quickstart.py", **{"train.steps": 100})
    run = jaxft.finetune(config, "runs/demo")            # python -m jaxft.train
    run.metrics[-1], run.exports, run.plot()
    tuned = jaxft.load(workdir="runs/demo")              # or jaxft.load("base/dir", adapter="adapter/dir")
    tuned.generate(["What is three plus four?"])         # python -m jaxft.generate
    tuned.evaluate("eval.jsonl", metrics="exact_match")
    jaxft.sweep.run(config, "optim.lr=loguniform(1e-4, 1e-2)", "runs/sweep", trials=4)   # python -m jaxft.sweep

Each function's docstring has an example that the tests run (tests/test_api.py).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys

from jaxft.config import from_recipe

__all__ = ["DataPreview", "RunResult", "Tuned", "finetune", "from_recipe", "load", "preview_data", "setup_logging"]

log = logging.getLogger("jaxft")


def setup_logging(level=logging.INFO) -> None:
    """jaxft's progress on stdout, once: calling it again (a notebook cell run twice) adds no second handler.

    >>> setup_logging()
    >>> setup_logging()
    >>> sum(getattr(h, "_jaxft", False) for h in logging.getLogger("jaxft").handlers)
    1
    """
    logger = logging.getLogger("jaxft")
    logger.setLevel(level)
    if not any(getattr(h, "_jaxft", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._jaxft = True
        logger.addHandler(handler)
    logger.propagate = False  # a root handler (absl's, a notebook's) would print each line twice


@dataclasses.dataclass
class DataPreview:
    """What a config's data becomes: the first examples as the model sees them, and the data report."""

    examples: list[str]  # each: a header (file, row, tokens, tokens in the loss), then the text, loss tokens in « »
    report: dict  # rows read, kept, dropped and why, truncated, token lengths (also <workdir>/data_report.json)

    def __repr__(self):
        import json
        return "\n".join([*self.examples, "--- data report", json.dumps(self.report, indent=2)])


def preview_data(config, count: int = 3, split: str = "train") -> DataPreview:
    """The data `config` trains on, read, cleaned and tokenised as a run would (only the tokenizer is loaded), as
    `python -m jaxft.data --show` prints it.

    >>> preview = preview_data(from_recipe("configs/quickstart.py"), count=1)
    >>> print(preview.examples[0])  # doctest: +ELLIPSIS
    --- train example 0  (.../train.jsonl:1; 30 tokens, 8 in the loss)
    <s>### Instruction:
    What colour does Krilania fly on its flag?
    <BLANKLINE>
    ### Response:
    «...»
    >>> preview.report["train"]["rows_read"]
    2581
    """
    from jaxft import data as data_lib
    from jaxft.config import validate
    from jaxft.data.preview import rendered_examples
    from jaxft.models import hf
    validate(config)
    tokenizer = hf.load_tokenizer(config.model.path)
    data = data_lib.load(config, tokenizer)
    return DataPreview(rendered_examples(data, tokenizer, split, count), data.report)


@dataclasses.dataclass
class RunResult:
    """A finished run: its directory, every row it logged, and what it exported."""

    workdir: pathlib.Path
    metrics: list[dict]  # metrics.jsonl: one dict per logged step and per evaluation
    exports: dict[str, pathlib.Path]  # "adapter" and/or "model": the export directories that exist

    def history(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric.

        >>> steps, losses = run.history("eval_loss")
        >>> steps, losses[-1] < losses[0]
        ([0, 4], True)
        """
        from jaxft.plot import series
        return series(self.metrics, key)

    @property
    def last(self) -> dict:
        """The last value of every metric the run logged."""
        out = {}
        for row in self.metrics:
            out.update(row)
        return out

    def plot(self, *others, labels=None):
        """The run's curves (loss, learning rate, tokens/s, task scores), with other runs' (RunResults or run
        directories) overlaid: a matplotlib figure (jaxft/plot.py).

        >>> figure = run.plot(run, labels=["this", "again"])
        >>> [line.get_label() for line in figure.axes[0].get_lines()]
        ['this loss', 'this eval_loss', 'again loss', 'again eval_loss']
        """
        from jaxft.plot import figure
        return figure([self.workdir, *[getattr(o, "workdir", o) for o in others]], labels)

    def load(self, dtype: str = "float32") -> Tuned:
        """The trained model, ready to generate (`load(workdir=...)`).

        >>> run.load().generate("### Instruction:\\nWhat is three plus four?\\n\\n### Response:\\n",
        ...                     max_new_tokens=3)  # doctest: +ELLIPSIS
        ['...']
        """
        return load(workdir=self.workdir, dtype=dtype)


def finetune(config, workdir) -> RunResult:
    """Train as `config` says in `workdir` (resuming if it holds a checkpoint), as `python -m jaxft.train` does.

    >>> config = from_recipe("configs/quickstart.py", **{"train.steps": 4, "eval.every_steps": 0,
    ...                      "eval.metrics": "", "train.progress_bar": False})
    >>> run = finetune(config, tmp / "run")
    >>> run.history("eval_loss")[0], sorted(run.exports)
    ([0, 4], ['adapter'])
    """
    from jaxft import trainer
    from jaxft.config import check_known_keys
    from jaxft.plot import read_metrics
    check_known_keys(config)
    trainer.run(config, workdir)
    workdir = pathlib.Path(workdir)
    export = workdir / "export"
    exports = {name: export / name for name in ("adapter", "model") if (export / name).is_dir()}
    return RunResult(workdir, read_metrics(workdir), exports)


@dataclasses.dataclass
class Tuned:
    """A model ready for inference: a base, with an adapter, or what a run exported (`load`)."""

    model: object  # the flax NNX model
    tokenizer: object
    run_config: dict | None  # the run's resolved config, when loaded from a run directory
    model_path: str
    workdir: pathlib.Path | None = None  # the run directory it was loaded from

    def generate(self, prompts, *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, chat: bool | None = None, batch_size: int = 8) -> list[str]:
        """Answers to `prompts` (strings, or chats as lists of {"role", "content"}): greedy unless
        `temperature` > 0. `chat` renders a string as a user turn of the chat template (default: as the run
        trained, else no).

        >>> tuned = load(workdir=tmp / "run")
        >>> [type(a) for a in tuned.generate(["What is three plus four?"], max_new_tokens=4)]
        [<class 'str'>]
        """
        from jaxft.generate import GenerationConfig, generate_in_batches
        from jaxft.generate.load import stop_token_ids, trained_format
        from jaxft.generate.prompts import chat_prompt, text_prompt
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        data = (self.run_config or {}).get("data", {})
        chat = chat if chat is not None else trained_format(self.workdir, data) == "messages"
        template = data.get("chat_template") or None
        ids = [chat_prompt(self.tokenizer, p, template=template) if isinstance(p, list) else
               text_prompt(self.tokenizer, p, chat=chat, template=template) for p in prompts]
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed, eos_token_ids=stop_token_ids(self.tokenizer, self.model_path),
                                  pad_token_id=self.tokenizer.pad_token_id or 0)
        texts = []
        for _, out in generate_in_batches(self.model, ids, config, batch_size, tokenizer=self.tokenizer):
            texts.extend(t.strip() for t in out.texts)
        return texts

    def evaluate(self, data, *, metrics: str = "", rows: int | None = None, max_new_tokens: int = 64,
                 seq_len: int | None = None, batch_size: int = 8, **data_settings) -> dict:
        """Eval loss and perplexity over the rows of `data` (a file or hub dataset, read and encoded as the run
        read its data, or as `data.*` defaults say; `data_settings` override, e.g. `format="messages"`), and the
        `metrics` ("exact_match", "bleu,chrf", ...) of greedy answers to the first `rows` of them.

        >>> tuned = load(workdir=tmp / "run")
        >>> scores = tuned.evaluate("jaxft/assets/quickstart/eval.jsonl", metrics="exact_match", rows=4,
        ...                         max_new_tokens=8)
        >>> sorted(scores)
        ['eval_exact_match', 'eval_loss', 'eval_perplexity', 'eval_tokens']
        """
        from jaxft import data as data_lib
        from jaxft import evaluate, task_metrics
        from jaxft.generate.load import stop_token_ids
        config = self._data_config(data, seq_len, batch_size, data_settings)
        examples = data_lib.load(config, self.tokenizer).train.examples
        pad_id = data_lib.pad_token_id(self.tokenizer)
        batches = data_lib.eval_batches(examples, batch_size, config.train.seq_len, pad_id)
        scores = evaluate.loss_and_perplexity(_loss_sums_fn(self.model), batches)
        names = task_metrics.parse(metrics)
        if names:
            task_metrics.check_available(names)
            records = evaluate.answer_eval_rows(self.model, examples, self.tokenizer, rows=rows,
                                                max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                stop_ids=stop_token_ids(self.tokenizer, self.model_path),
                                                pad_id=pad_id)
            scores.update(evaluate.task_scores(records, names))
        return scores

    def _data_config(self, data, seq_len, batch_size, data_settings):
        """A config that reads `data` as the run read its training data (its data.* keys, seq_len and seed)."""
        from jaxft.config import from_overrides
        from jaxft.resume import flat
        values = {k: v for k, v in flat(self.run_config or {}).items()
                  if k.startswith("data.") or k in ("train.seq_len", "seed")}
        values.update({"model.path": self.model_path, "data.train": str(data), "data.eval": None,
                       "data.eval_fraction": 0.0, "data.streaming": False, "train.batch_size": batch_size,
                       **{f"data.{k}": v for k, v in data_settings.items()}})
        if seq_len is not None:
            values["train.seq_len"] = seq_len
        return from_overrides(values)


def _loss_sums_fn(model):
    """(loss sum, target tokens) of a batch under `model`, compiled once per shape."""
    import jax
    from flax import nnx

    from jaxft.trainer import loss_sums
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, batch: loss_sums(nnx.merge(graphdef, state), batch))
    return lambda batch: step(state, batch)


def load(model_path=None, *, adapter=None, workdir=None, dtype: str = "float32") -> Tuned:
    """A model for inference: the Hugging Face checkpoint at `model_path` (a directory or `.gguf`), with the PEFT
    adapter in `adapter`, or what the jaxft run in `workdir` exported.

    >>> tuned = load("jaxft/assets/quickstart/model")
    >>> tuned.model.config.num_layers
    3
    """
    from jaxft.generate.load import load_model, sources
    model, tokenizer, run_config = load_model(model_path, adapter=adapter, workdir=workdir, dtype=dtype)
    return Tuned(model, tokenizer, run_config, str(sources(model_path, adapter=adapter, workdir=workdir)[1]),
                 pathlib.Path(workdir) if workdir is not None else None)
