"""The config schema every recipe starts from, and its validation.

A recipe in `configs/` calls `base_config()` and overrides values; it never adds
keys. Every key is declared here (optional ones as typed placeholders), so a
locked config turns a typo on the command line into an error, and `validate`
checks values before any work starts.
"""

import difflib

import ml_collections
from ml_collections import config_dict

from jaxft.errors import ConfigError

PEFT_METHODS = ("lora", "qlora", "adapter", "prompt_tuning", "bitfit", "partial", "full")
TASKS = ("causal_lm", "sequence_classification")
# The methods that can train a classification head: PEFT's modules_to_save beside LoRA, or the whole model.
HEAD_METHODS = ("lora", "qlora", "full", "partial", "bitfit")
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "lion", "rmsprop", "adagrad")
SCHEDULES = ("warmup_cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
DATA_FORMATS = ("auto", "text", "prompt_completion", "messages", "classification")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload")
LAYER_LOOPS = ("auto", "scan", "unroll")
ATTENTION_BACKENDS = ("auto", "xla", "chunked", "splash", "cudnn")


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with its default."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict(
        dict(
            path=config_dict.placeholder(str),  # local HF directory or hub id
            dtype="float32",  # compute dtype
            param_dtype="float32",  # storage dtype of the frozen pretrained weights
            # What each decoder block's backward pass recomputes instead of keeping: "none", "full",
            # "dots_saveable", "dots_with_no_batch_dims_saveable", "offload" (host memory). README,
            # "Memory and speed on accelerators", says what each trades.
            remat="none",
            # "scan": the decoder blocks under one lax.scan (compile time independent of depth);
            # "unroll": a Python loop over them; "auto": unroll on CPU (measured faster), scan elsewhere.
            layer_loop="auto",
            # The attention kernel: "auto" (TPU: Pallas splash attention; NVIDIA GPU: cuDNN where it takes the
            # case; CPU: "chunked"), "xla", "chunked", "splash", "cudnn" (jaxft/models/attention.py).
            attention="auto",
            # Positions per chunk of the output head and loss, so the [batch, seq, vocab] logits never exist
            # whole (jaxft/losses.py); 0: whole rows in one chunk.
            loss_chunk=1024,
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            # A .jsonl/.json/.csv/.parquet/.arrow file, a glob of them, a `save_to_disk`
            # directory, or a hub dataset id (with hub_config and the splits below).
            train=config_dict.placeholder(str),
            train_split="train",  # hub ids and save_to_disk dataset dicts
            eval=config_dict.placeholder(str),  # same kinds as train; else eval_fraction of train
            eval_split="validation",
            eval_fraction=0.0,
            hub_config=config_dict.placeholder(str),  # the hub dataset's config (subset) name
            streaming=False,  # read train while training (larger than memory); needs train.steps
            shuffle_buffer=10_000,  # examples in the streaming shuffle buffer
            format="auto",  # text, prompt_completion, messages, classification; auto: from the columns
            text_field="text",
            prompt_field="prompt",
            completion_field="completion",
            messages_field="messages",  # a list of {"role", "content"}; loss on assistant turns
            label_field="label",
            labels=config_dict.placeholder(str),  # comma-separated label set in id order; default: sorted found
            classification_prompt="{text}\nLabel:",  # then " <label>" is trained
            chat_template=config_dict.placeholder(str),  # Jinja text or a file; default: the tokenizer's
            add_bos=config_dict.placeholder(bool),  # default: as the tokenizer does (Llama yes, Qwen no)
            add_eos=True,  # append EOS so the model learns to stop (text, prompt_completion, classification)
            too_long="truncate",  # rows over train.seq_len: "truncate" or "drop" (counted either way)
            packing=False,  # several examples per row, attention kept within each
            strip=True,  # trim outer whitespace (a completion keeps its leading space)
            drop_empty=True,
            dedup=True,  # drop exact duplicate rows
            min_tokens=0,
            max_tokens=config_dict.placeholder(int),  # drop longer rows (before the seq_len cap)
            on_bad_row="error",  # malformed rows: "error" (naming file and row) or "skip" (counted)
            prefetch=2,  # batches prepared ahead of the step
            cache=True,  # keep tokenised sets under <workdir>/data_cache
        )
    )

    c.peft = ml_collections.ConfigDict(
        dict(
            method="lora",
            # "causal_lm": the model learns to write the targets (a classification label as text);
            # "sequence_classification": a `score` head maps the last real token of each classification row to
            # its label (transformers' *ForSequenceClassification), trained with the method.
            task="causal_lm",
            rank=8,
            alpha=16.0,
            dropout=0.0,
            # "all-linear", a comma-separated list of module names ("q_proj,v_proj"),
            # or a regex over module paths ("re:.*self_attn\.(q|v)_proj").
            targets="all-linear",
            use_rslora=False,  # scale alpha/sqrt(rank) instead of alpha/rank
            use_dora=False,  # lora/qlora: DoRA, a trained magnitude per output feature
            # lora: the fused Pallas matmul x W + s x A B ("pallas"), XLA's ("xla"), or "auto": Pallas on the
            # backends where bench/lora_kernel.py measured it faster (none yet), else XLA
            kernel="auto",
            quant="nf4",  # qlora: the frozen base's storage, "nf4" (4-bit, block absmax) or "int8" (per channel)
            quant_block_size=64,  # qlora nf4: weights per absmax scale
            quant_embeddings=False,  # qlora: also store the token embeddings and the output head quantised
            adapter_kind="houlsby",  # adapter: "houlsby" (after attention and MLP) or "pfeiffer" (after MLP)
            adapter_size=64,  # adapter: bottleneck width
            adapter_activation="relu",
            num_virtual_tokens=20,  # prompt_tuning
            prompt_init="random",  # prompt_tuning: "random" or "text" (embeddings of prompt_init_text)
            prompt_init_text=config_dict.placeholder(str),
            # partial: which pretrained weights train. Switches, or ';'-separated regexes over
            # parameter paths (first match wins; a leading '!' freezes; the rest stays frozen).
            train_top_blocks=0,
            train_embeddings=False,
            train_lm_head=False,
            patterns=config_dict.placeholder(str),
            unfreeze_every_steps=0,  # partial: gradual unfreezing, one more block from the top every K steps
        )
    )

    c.optim = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=2e-4,
            schedule="warmup_cosine",
            warmup_steps=0,
            end_lr_ratio=0.0,  # final lr as a fraction of lr (cosine and linear)
            weight_decay=0.0,  # never applied to norms and biases
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            momentum=0.0,  # sgd
            clip_norm=1.0,  # global-norm clipping; 0 turns it off
            grad_accum_steps=1,
        )
    )

    c.train = ml_collections.ConfigDict(
        dict(
            steps=config_dict.placeholder(int),  # set steps or epochs, not both
            epochs=config_dict.placeholder(int),
            batch_size=8,
            seq_len=512,
            log_every_steps=10,
            progress_bar=True,
            # Knowledge distillation (jaxft/distill.py): with a teacher, each target token's loss is
            # alpha * T^2 * KL(teacher || student, both softened by T) + (1 - alpha) * the data's cross-entropy.
            distill=ml_collections.ConfigDict(
                dict(
                    # The teacher: a local HF model directory or hub id, frozen, with the student's tokenizer
                    # (vocabulary); None: no distillation.
                    teacher=config_dict.placeholder(str),
                    teacher_adapter=config_dict.placeholder(str),  # a PEFT LoRA adapter merged into the teacher
                    temperature=2.0,  # T > 0: softens both distributions (1: compares them as they are)
                    alpha=0.5,  # in [0, 1]: the KL's share of the loss; 1 learns from the teacher alone
                )
            ),
        )
    )

    c.eval = ml_collections.ConfigDict(
        dict(
            every_steps=100,  # 0: only at the start and the end
            batch_size=config_dict.placeholder(int),  # default: train.batch_size
            max_batches=config_dict.placeholder(int),  # default: the whole eval set
            # Stop after this many evaluations in a row without the eval loss falling by more than
            # early_stopping_min_delta below its best (0: never stop early).
            early_stopping_patience=0,
            early_stopping_min_delta=0.0,
            keep_best=False,  # export the parameters of the best evaluation (kept under <workdir>/best), not the last
            # Task metrics over answers generated for the eval rows, comma-separated: exact_match, accuracy, f1,
            # bleu, chrf, rouge (jaxft/task_metrics.py); the answers go to <workdir>/eval/step_<N>.jsonl.
            metrics="",
            generate_rows=config_dict.placeholder(int),  # eval rows answered for eval.metrics (default: all)
            max_new_tokens=64,  # the longest answer generated for eval.metrics
            # What early stopping and keep_best judge: "loss", "perplexity", or a score eval.metrics gives
            # ("exact_match", "accuracy", "f1_macro", "bleu", "chrf", "rouge1", "rouge2", "rougeL", ...).
            best_metric="loss",
            best_mode="auto",  # "min", "max", or "auto": min for loss and perplexity, max for the scores
            # A column of the eval data (e.g. "dialect", "gender", "language"): every eval.metrics score also per
            # group, with the largest gap and, for classification, the fairness gaps (jaxft/group_metrics.py).
            group_field=config_dict.placeholder(str),
        )
    )

    c.checkpoint = ml_collections.ConfigDict(
        dict(
            every_steps=500,
            every_seconds=0.0,  # also save when this long has passed since the last save (long steps); 0: off
            keep=3,
            async_save=True,
        )
    )

    # Devices as a ('data', 'fsdp', 'tensor') mesh (jaxft/sharding.py). The product of the three is
    # the devices per slice; one may be -1, the rest. The batch splits over data x fsdp.
    c.mesh = ml_collections.ConfigDict(
        dict(
            data=1,  # data parallelism: whole replicas of the weights
            fsdp=-1,  # data parallelism with weights and optimizer state sharded (ZeRO-3); default: all devices
            tensor=1,  # tensor parallelism: heads, MLP width and vocabulary split inside each layer
            dcn_data=1,  # slices of a multi-slice TPU job (data parallel over the data-centre network)
        )
    )

    c.resume = ml_collections.ConfigDict(
        dict(
            # Keys a resumed run may change although they change what is trained (comma-separated, e.g.
            # "optim.lr,train.steps"); jaxft/resume.py refuses any other such change, naming it.
            allow_changes="",
        )
    )

    c.export = ml_collections.ConfigDict(
        dict(
            adapter=True,  # PEFT-format adapter under <workdir>/export/adapter (LoRA runs)
            merged=False,  # LoRA merged into the base, as an HF model under <workdir>/export/model
            # The dtype of an exported model's weights (merged LoRA, full/partial/bitfit): "auto" is the base
            # checkpoint's (a bfloat16 base exports bfloat16, whatever the run computed in), or float32, bfloat16,
            # float16.
            merged_dtype="auto",
        )
    )
    return c


def _flat_keys(c):
    return (key for key, _ in _flat_items(c))


def valid_keys(schema=None) -> set[str]:
    """Every dotted key the schema declares ('optim.lr', ...)."""
    return set(_flat_keys(schema or base_config()))


def check_known_keys(config, schema=None):
    """Raise ConfigError for a key the schema does not declare, naming the nearest valid key."""
    valid = valid_keys(schema)
    for key in _flat_keys(config):
        if key not in valid:
            raise ConfigError(unknown_key_message(key, valid))


def unknown_key_message(key: str, valid) -> str:
    nearest = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    hint = f" Did you mean '{nearest[0]}'?" if nearest else ""
    return f"Unknown config key '{key}'.{hint}"


def overrides(config) -> dict:
    """{dotted key: value} of every key where `config` differs from `base_config()`: what a recipe and its
    command-line flags changed, as plain values."""
    base = dict(_flat_items(base_config()))
    return {key: value for key, value in _flat_items(config) if base.get(key) != value}


def from_recipe(recipe, arg=None, **values) -> ml_collections.ConfigDict:
    """The config of a recipe file (`get_config(arg)` in e.g. configs/quickstart.py) with dotted keys set, as
    `--config configs/x.py --config.optim.lr=1e-3` makes it; locked, so a misspelt key is an error naming the
    nearest.

    >>> config = from_recipe("configs/quickstart.py", **{"optim.lr": 1e-3, "train.steps": 50})
    >>> config.optim.lr, config.train.steps, config.peft.method
    (0.001, 50, 'lora')
    """
    module = load_recipe_module(recipe)
    config = module.get_config(arg)
    config.lock()
    valid = valid_keys()
    for key, value in values.items():
        if key not in valid:
            raise ConfigError(unknown_key_message(key, valid))
        _set(config, key, value)
    return config


def load_recipe_module(recipe):
    """The recipe file `recipe` (a path; a `:argument` after it is ignored) as a module."""
    import importlib.util
    import pathlib
    path = pathlib.Path(str(recipe).split(":")[0])
    if not path.is_file():
        raise ConfigError(f"Recipe {path} does not exist: give a file such as configs/quickstart.py.")
    spec = importlib.util.spec_from_file_location(f"jaxft_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _set(config, key: str, value) -> None:
    *parents, name = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[name] = value


def from_overrides(values: dict) -> ml_collections.ConfigDict:
    """`base_config()` with each dotted key set, locked like a recipe loaded by `--config`; ConfigError naming
    an unknown key."""
    config = base_config()
    valid = valid_keys(config)
    for key, value in values.items():
        if key not in valid:
            raise ConfigError(unknown_key_message(key, valid))
        _set(config, key, value)
    config.lock()
    return config


def _flat_items(c, prefix=""):
    for key, value in c.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _choice(config, key, choices):
    value = _get(config, key)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}.")


def _positive(config, key, *, allow_zero=False):
    value = _get(config, key)
    if value is None:
        return
    if not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} must be {bound}.")


def _get(config, key):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def validate(config) -> None:
    """Check every value a run depends on, before any work; raise ConfigError naming the bad one."""
    check_known_keys(config)
    if not config.model.path:
        raise ConfigError("model.path is not set: give a Hugging Face model directory (or hub id), "
                          "e.g. --config.model.path=/models/Llama-3.2-1B.")
    if not config.data.train:
        raise ConfigError("data.train is not set: give a data file, glob or hub dataset id, "
                          "e.g. --config.data.train=train.jsonl.")
    _choice(config, "model.dtype", DTYPES)
    if config.model.dtype == "float16":
        # float16's range (max 65504, smallest normal 6e-5) needs loss scaling to train: gradients underflow to
        # zero and activations overflow to Inf. bfloat16 has float32's range, on every accelerator jaxft targets.
        raise ConfigError("model.dtype=float16 is not supported for training: without loss scaling its gradients "
                          "underflow and activations overflow. Use model.dtype=bfloat16 (float32's range, the same "
                          "memory), or float32. model.param_dtype=float16 (storage of the frozen weights) is fine.")
    _choice(config, "model.param_dtype", DTYPES)
    _choice(config, "model.remat", REMAT_POLICIES)
    _choice(config, "model.layer_loop", LAYER_LOOPS)
    _choice(config, "model.attention", ATTENTION_BACKENDS)
    _positive(config, "model.loss_chunk", allow_zero=True)
    _choice(config, "data.format", DATA_FORMATS)
    _choice(config, "data.too_long", ("truncate", "drop"))
    _choice(config, "data.on_bad_row", ("error", "skip"))
    _choice(config, "peft.method", PEFT_METHODS)
    _choice(config, "optim.name", OPTIMIZERS)
    _choice(config, "optim.schedule", SCHEDULES)
    if (config.train.steps is None) == (config.train.epochs is None):
        raise ConfigError("Set exactly one of train.steps and train.epochs "
                          f"(got steps={config.train.steps}, epochs={config.train.epochs}).")
    for key in ("train.steps", "train.epochs", "train.batch_size", "train.seq_len",
                "train.log_every_steps", "optim.lr", "optim.grad_accum_steps",
                "peft.rank", "peft.alpha", "checkpoint.every_steps", "checkpoint.keep",
                "eval.batch_size", "eval.max_batches", "data.max_tokens"):
        _positive(config, key)
    for key in ("optim.warmup_steps", "optim.weight_decay", "optim.clip_norm",
                "optim.end_lr_ratio", "eval.every_steps", "data.eval_fraction", "peft.dropout",
                "data.min_tokens", "data.prefetch", "eval.early_stopping_patience", "eval.early_stopping_min_delta",
                "checkpoint.every_seconds"):
        _positive(config, key, allow_zero=True)
    _validate_early_stopping(config)
    _validate_resume(config)
    _validate_task_metrics(config)
    if not 0.0 <= config.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={config.data.eval_fraction} must be in [0, 1).")
    if not 0.0 <= config.peft.dropout < 1.0:
        raise ConfigError(f"peft.dropout={config.peft.dropout} must be in [0, 1).")
    _validate_peft(config)
    _validate_distill(config)
    if config.data.streaming and config.train.steps is None:
        raise ConfigError("data.streaming=True needs train.steps: a stream's length is unknown until it is read.")
    if config.data.streaming and config.data.eval_fraction:
        raise ConfigError("data.streaming=True cannot hold out data.eval_fraction of a stream; give data.eval.")
    _positive(config, "data.shuffle_buffer")
    _positive(config, "mesh.dcn_data")
    for axis in ("data", "fsdp", "tensor"):
        if config.mesh[axis] == 0 or config.mesh[axis] < -1:
            raise ConfigError(f"mesh.{axis}={config.mesh[axis]} must be a positive size or -1 (the devices left over).")
    if config.train.batch_size % config.optim.grad_accum_steps:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must divide by "
                          f"optim.grad_accum_steps={config.optim.grad_accum_steps}.")


def _validate_early_stopping(config) -> None:
    stopping, keep_best = config.eval.early_stopping_patience, config.eval.keep_best
    if not (stopping or keep_best):
        return
    asked = "eval.early_stopping_patience" if stopping else "eval.keep_best"
    if config.data.eval is None and not config.data.eval_fraction:
        raise ConfigError(f"{asked} judges the run by an evaluation: give data.eval or data.eval_fraction.")
    if stopping and not config.eval.every_steps:
        raise ConfigError("eval.early_stopping_patience counts evaluations during training: set eval.every_steps "
                          "(0 evaluates only at the start and the end).")


def _validate_task_metrics(config) -> None:
    from jaxft import task_metrics
    names = task_metrics.parse(config.eval.metrics)
    task_metrics.check_available(names)
    for key in ("eval.generate_rows", "eval.max_new_tokens"):
        _positive(config, key)
    _choice(config, "eval.best_mode", ("auto", "min", "max"))
    best = config.eval.best_metric
    known = ["loss", "perplexity", *task_metrics.score_keys(names)]
    if best not in known and not (best.startswith("f1_") and "f1" in names):  # f1_<label>: labels come with data
        raise ConfigError(f"eval.best_metric={best!r} is not something the evaluation reports; with "
                          f"eval.metrics={config.eval.metrics!r} it reports {', '.join(known)}; choose one of these, "
                          f"or add the metric to eval.metrics.")
    if config.eval.group_field and not names:
        raise ConfigError(f"eval.group_field={config.eval.group_field!r} reports the eval.metrics scores per group: "
                          "set eval.metrics too (e.g. exact_match, or accuracy,f1 for classification).")
    if names and config.data.eval is None and not config.data.eval_fraction:
        raise ConfigError(f"eval.metrics={config.eval.metrics!r} scores answers to eval rows: give data.eval or "
                          "data.eval_fraction.")


def best_metric(config) -> tuple[str, str]:
    """`(key in the eval metrics, "min" or "max")` of what early stopping and keep_best judge."""
    from jaxft import task_metrics
    name = config.eval.best_metric
    mode = config.eval.best_mode
    if mode == "auto":
        mode = "max" if task_metrics.better_is_higher(name) else "min"
    return f"eval_{name}", mode


def _validate_peft(config) -> None:
    _choice(config, "peft.task", TASKS)
    _choice(config, "export.merged_dtype", ("auto", *DTYPES))
    _validate_head(config)
    _choice(config, "peft.quant", ("nf4", "int8"))
    _choice(config, "peft.kernel", ("auto", "pallas", "xla"))
    _choice(config, "peft.adapter_kind", ("houlsby", "pfeiffer"))
    _choice(config, "peft.prompt_init", ("random", "text"))
    _choice(config, "peft.adapter_activation", ("relu", "gelu", "silu", "tanh"))
    for key in ("quant_block_size", "adapter_size", "num_virtual_tokens"):
        _positive(config, f"peft.{key}")
    for key in ("train_top_blocks", "unfreeze_every_steps"):
        _positive(config, f"peft.{key}", allow_zero=True)
    peft = config.peft
    if peft.unfreeze_every_steps and not peft.train_top_blocks:
        raise ConfigError("peft.unfreeze_every_steps unfreezes blocks from the top, one every K steps, up to "
                          "peft.train_top_blocks; set peft.train_top_blocks (and not peft.patterns).")
    if peft.prompt_init == "text" and not peft.prompt_init_text:
        raise ConfigError("peft.prompt_init=text needs peft.prompt_init_text, the text whose embeddings start "
                          "the virtual tokens.")
    if config.export.merged and peft.method not in ("lora", "qlora"):
        raise ConfigError(f"export.merged folds a LoRA update into the base weights; peft.method={peft.method!r} "
                          f"has nothing to merge (full, partial and bitfit runs export the whole model anyway). "
                          f"Set export.merged=False.")
    if peft.quant_embeddings and peft.method != "qlora":
        raise ConfigError(f"peft.quant_embeddings stores a QLoRA base's embeddings and head quantised; it needs "
                          f"peft.method='qlora', not {peft.method!r}.")
    if peft.use_dora and peft.method not in ("lora", "qlora"):
        raise ConfigError(f"peft.use_dora applies to lora and qlora, not peft.method={peft.method!r}.")


def _validate_head(config) -> None:
    if config.peft.task != "sequence_classification":
        return
    method = config.peft.method
    if method not in HEAD_METHODS:
        raise ConfigError(f"peft.task=sequence_classification trains a score head with the model; peft.method="
                          f"{method!r} cannot carry one. Use one of {', '.join(HEAD_METHODS)}, or "
                          f"peft.task=causal_lm to train the label as text.")
    if config.data.format not in ("auto", "classification"):
        raise ConfigError(f"peft.task=sequence_classification learns labels: it needs data.format=classification "
                          f"(a text and a label per row), not {config.data.format!r}.")
    if config.data.packing:
        raise ConfigError("peft.task=sequence_classification pools each row's last token; data.packing would put "
                          "several examples in one row. Turn data.packing off.")


def _validate_distill(config) -> None:
    distill = config.train.distill
    _positive(config, "train.distill.temperature")
    if not 0.0 <= distill.alpha <= 1.0:
        raise ConfigError(f"train.distill.alpha={distill.alpha!r} must be in [0, 1]: the KL's share of the loss "
                          f"(1: the teacher alone, 0: the data alone).")
    if distill.teacher_adapter and not distill.teacher:
        raise ConfigError("train.distill.teacher_adapter is an adapter for the teacher: set train.distill.teacher "
                          "to the model it was trained on.")
    if distill.teacher and config.peft.task == "sequence_classification":
        raise ConfigError("train.distill.teacher distils a language model's next-token distribution; "
                          "peft.task=sequence_classification trains a label head, which has none. Use "
                          "peft.task=causal_lm (the label as text), or unset train.distill.teacher.")


def _validate_resume(config) -> None:
    valid = valid_keys()
    for key in (k.strip() for k in (config.resume.allow_changes or "").split(",")):
        if key and key not in valid:
            raise ConfigError("resume.allow_changes: " + unknown_key_message(key, valid))
