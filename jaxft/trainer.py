"""The training flow, top to bottom: `run(config, workdir)`.

1. Data: validate the config, load the tokenizer, tokenise train and eval sets
   (first, so bad data fails before a large model loads); the order of batches
   is a function of the step.
2. Setup and model: load the model, apply the method, cut it into trainable
   parameters and the frozen rest.
3. Optimizer and state: optax over the trainable parameters only.
4. Resume: the latest checkpoint in the workdir, if any.
5. Loop: steps, logging, evaluation, checkpoints, NaN/Inf stop, early stopping.
6. Export: the adapter in PEFT format (and a merged or full HF model on request),
   from the last step or, with `eval.keep_best`, the best evaluation.

`train_step` and `eval_step` are top-level pure functions of
(trainable params, frozen rest, batch); `jax.jit` compiles them once.
"""

import collections
import contextlib
import functools
import json
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxft import checkpoint as ckpt_lib
from jaxft import data as data_lib
from jaxft import distill as distill_lib
from jaxft import evaluate, export, peft, plot, resume, sharding
from jaxft import flops as flops_lib
from jaxft.config import best_metric, validate
from jaxft.errors import ConfigError, DataError, TrainingDivergedError
from jaxft.host import tune_malloc
from jaxft.losses import chunked_cross_entropy_sum, token_cross_entropy
from jaxft.metrics import MetricWriter, Progress, Throughput
from jaxft.models import attention, hf, stack
from jaxft.optim import build_optimizer, learning_rate_schedule
from jaxft.peft import quant
from jaxft.peft.lora import with_dropout_keys
from jaxft.peft.select import TrainableFilter, format_parameter_table, parameter_summary, parameter_table, split_model
from jaxft.preemption import Preempted, StopSignal
from jaxft.stopping import EarlyStopping
from jaxft.workdir_lock import WorkdirLock

log = logging.getLogger("jaxft")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# ----------------------------------------------------------------------------- steps


def loss_sums(model, batch, loss_chunk: int = 0):
    """(sum of next-token cross-entropy over target tokens, number of target tokens), float32; for a sequence
    classifier `label_loss_sums`.

    `loss_chunk` > 0: the head and the loss run over chunks of that many positions, so the
    `[B, T, vocab]` logits never exist whole (jaxft/losses.py); 0: one chunk of the whole row.
    """
    if getattr(model.config, "num_labels", 0):  # a sequence classifier
        return label_loss_sums(model, batch)
    hidden = batch_hidden_states(model, batch)
    targets, weights = next_token_targets(batch)
    head, head_params = model.output_head()
    total = chunked_cross_entropy_sum(head, head_params, hidden, targets, weights,
                                      chunk_size=loss_chunk or hidden.shape[1])
    return total, jnp.sum(weights)


def batch_hidden_states(model, batch):
    """A language model's final hidden states `[B, T, hidden]` for a training batch."""
    # Packed rows carry segment ids and restarting positions (jaxft/data/packing.py); padding
    # only ever ends a row (jaxft/data/batches.py).
    return model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"],
                               positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                               right_padded=True)


def next_token_targets(batch):
    """(targets, weights) `[B, T]`: the token each position predicts, and 1.0 where it counts in the loss."""
    # Position t predicts token t+1. Shifting the small targets and weights instead of
    # slicing the hidden states keeps every chunk aligned; the last position gets weight 0.
    targets = jnp.roll(batch["input_ids"], -1, axis=1)
    weights = jnp.pad(batch["loss_mask"][:, 1:], ((0, 0), (0, 1))).astype(jnp.float32)
    return targets, weights


def distill_loss_sums(model, teacher, batch, spec, loss_chunk: int = 0):
    """(sum over target tokens of the distillation objective, (number of target tokens, {"data_loss",
    "distill_kl"} sums)), float32: the student `model` against the frozen `teacher` (jaxft/distill.py)."""
    hidden = batch_hidden_states(model, batch)
    targets, weights = next_token_targets(batch)
    total, sums = distill_lib.chunked_sums(model.output_head(), teacher.output_head(), hidden,
                                           batch_hidden_states(teacher, batch), targets, weights, spec,
                                           chunk_size=loss_chunk or hidden.shape[1])
    return total, (jnp.sum(weights), sums)


def label_loss_sums(model, batch):
    """(sum of the label cross-entropy over labelled rows, number of labelled rows), float32: a sequence
    classifier's loss, its `score` head over each row's last real token. Rows labelled -1 (padding) count nothing."""
    logits = model.classify(batch["input_ids"], attention_mask=batch["attention_mask"], right_padded=True)
    labelled = batch["labels"] >= 0
    losses = token_cross_entropy(logits, jnp.maximum(batch["labels"], 0))
    return jnp.sum(jnp.where(labelled, losses, 0.0)), jnp.sum(labelled.astype(jnp.float32))


def label_logits_step(params, frozen, batch, *, graphdef, mesh=None):
    """A sequence classifier's label logits `[B, num_labels]` for one eval batch, dropout off."""
    with sharding.use_mesh(mesh):
        model = nnx.merge(graphdef, params, frozen)
        return model.classify(batch["input_ids"], attention_mask=batch["attention_mask"], right_padded=True)


def train_step(state, frozen, batch, teacher=None, *, graphdef, tx, schedule, accum_steps: int, dropout_key,
               mesh=None, loss_chunk: int = 0, distill=None):
    """One optimizer step over `accum_steps` micro-batches; never applies a non-finite update.

    The loss is the mean over all target tokens of the whole batch, so accumulation
    changes memory, not the result. `mesh`: lay activations out on it (jaxft/sharding.py).
    `loss_chunk`: positions per chunk of the head and loss (`loss_sums`). `distill`: a
    `distill.DistillSpec`, with the frozen teacher's weights as `teacher`: the loss is then the
    distillation objective, and its parts are reported as `data_loss` and `distill_kl`.
    """
    step = state["step"]
    key = jax.random.fold_in(dropout_key, step)

    def micro_loss(params, micro, i):
        model = nnx.merge(graphdef, params, with_dropout_keys(frozen, jax.random.fold_in(key, i)))
        with sharding.use_mesh(mesh):
            if distill is None:
                total, count = loss_sums(model, micro, loss_chunk)
                return total, (count, {})
            return distill_loss_sums(model, nnx.merge(distill.teacher_graphdef, teacher), micro, distill, loss_chunk)

    def accumulate(carry, xs):
        grads, loss, (count, parts) = carry
        micro, i = xs
        (m_loss, m_aux), m_grads = jax.value_and_grad(micro_loss, has_aux=True)(state["params"], micro, i)
        aux = jax.tree.map(jnp.add, (count, parts), m_aux)
        return (jax.tree.map(jnp.add, grads, m_grads), loss + m_loss, aux), None

    if accum_steps == 1:  # no loop: XLA keeps a length-1 scan as a while loop, which blocks fusion
        (loss, (count, parts)), grads = jax.value_and_grad(micro_loss, has_aux=True)(state["params"], batch, 0)
    else:
        micro_batches = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)
        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        no_parts = {} if distill is None else {"data_loss": jnp.float32(0), "distill_kl": jnp.float32(0)}
        (grads, loss, (count, parts)), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), (jnp.float32(0), no_parts)), (micro_batches, jnp.arange(accum_steps)))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = loss / count
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))

    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = dict(
        step=step + 1,
        params=keep_if_bad(params, state["params"]),
        opt_state=keep_if_bad(opt_state, state["opt_state"]),
        nonfinite_step=jnp.where((state["nonfinite_step"] < 0) & ~finite, step, state["nonfinite_step"]),
    )
    metrics = dict(loss=loss, grad_norm=grad_norm, lr=schedule(step), target_tokens=count,
                   tokens=jnp.sum(batch["attention_mask"]), **{k: v / count for k, v in parts.items()})
    return new_state, metrics


def eval_step(params, frozen, batch, *, graphdef, mesh=None, loss_chunk: int = 0):
    """(loss sum, target tokens) of one eval batch, dropout off."""
    with sharding.use_mesh(mesh):
        return loss_sums(nnx.merge(graphdef, params, frozen), batch, loss_chunk)


def init_state(params, frozen, tx, mesh):
    """The training state (step, params, optimizer state, NaN marker) and the frozen weights, laid out on
    `mesh` by their logical axes; returns them with their shardings (for the step's jit)."""
    params = sharding.place(params, sharding.tree_shardings(params, mesh))
    frozen_shardings = sharding.tree_shardings(frozen, mesh)
    frozen = sharding.place(frozen, frozen_shardings)
    state = dict(step=jnp.int32(0), params=params, opt_state=jax.eval_shape(tx.init, params),
                 nonfinite_step=jnp.int32(-1))
    state_shardings = sharding.tree_shardings(state, mesh)
    # Created sharded, never whole on one device (full fine-tuning's optimizer state is twice the model).
    state["opt_state"] = jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(params)
    return sharding.place(state, state_shardings), frozen, state_shardings, frozen_shardings


# ----------------------------------------------------------------------------- flow


def run(config, workdir, *, tune_host: bool = False, on_metrics=None) -> dict:
    """Train as `config` says, in `workdir`; resume if it holds a checkpoint. Returns the last metrics.

    `tune_host` applies `jaxft.host.tune_malloc` between tokenising and starting JAX (the CLI sets it).
    `on_metrics(step, metrics)` is called on every process after each step that logged or evaluated (and after the
    evaluation at step 0), with what that step logged; an exception it raises stops the run there, unsaved (a
    sweep prunes a trial so, jaxft/sweep/trials.py).
    Only one run at a time uses a workdir (jaxft/workdir_lock.py; process 0 holds the lock).
    """
    validate(config)
    sharding.initialize_distributed()  # a multi-host job: join the other processes first
    workdir = make_workdir(workdir)
    # Not jax.process_index() alone: on one process it would start JAX before tune_host's moment.
    first = not jax.distributed.is_initialized() or jax.process_index() == 0
    with WorkdirLock(workdir) if first else contextlib.nullcontext(), \
            StopSignal(config.checkpoint.every_seconds) as signals:  # SIGTERM/SIGINT: stop at a step boundary
        return _run(config, workdir, tune_host, signals, on_metrics or (lambda step, metrics: None))


def make_workdir(workdir) -> pathlib.Path:
    """The workdir, created if needed; ConfigError if it cannot be (a file in the way, no permission)."""
    workdir = pathlib.Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except FileExistsError:
        raise ConfigError(f"--workdir {workdir} is a file, not a directory; give a directory path.") from None
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} cannot be written ({e.strerror}); give a directory this user can "
                          f"write, or fix its permissions.") from None
    return workdir


def _run(config, workdir: pathlib.Path, tune_host: bool, signals: StopSignal, on_metrics) -> dict:
    # 1. Data (before JAX starts: see tune_host) ----------------------------------
    resume.check(*resume.saved_config(workdir / "checkpoints"), config)  # a resume may not change what is trained
    seq_len, batch_size = config.train.seq_len, config.train.batch_size
    tokenizer = hf.load_tokenizer(config.model.path)
    hf.check_task_of(config.model.path, config.peft.task)  # an encoder only classifies: said before any data is read
    # A missing or mismatched teacher stops the run before data or weights are read.
    teacher_dir = distill_lib.check_teacher(config, tokenizer) if config.train.distill.teacher else None
    data = data_lib.load(config, tokenizer, cache_dir=workdir / "data_cache" if config.data.cache else None)
    train_set, eval_set = data.train, data.eval
    order = getattr(train_set, "order", None)  # None for a stream, whose length is unknown
    total_steps = config.train.steps or config.train.epochs * order.steps_per_epoch
    if tune_host:
        tune_malloc()

    # 2. Setup and model ----------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    eval_batch_size = config.eval.batch_size or batch_size
    sharding.check_batch(batch_size, config.optim.grad_accum_steps, mesh)
    if eval_set is not None:
        sharding.check_batch(eval_batch_size, 1, mesh, "eval.batch_size")
    log.info("Mesh %s over %d devices in %d process(es)", dict(mesh.shape), mesh.size, jax.process_count())
    if jax.process_index() == 0:
        log.info("Config of this start: %s", resume.write_start_config(workdir, config))
        _write_json(workdir / "data_report.json", data.report)
        if data.label_names is not None:
            _write_json(workdir / "labels.json", dict(labels=data.label_names,
                                                      label_to_id={n: i for i, n in enumerate(data.label_names)}))
    log.info("Data report (also in data_report.json): %s", json.dumps(data.report))
    eval_groups = evaluate.check_requests(config, data)
    if signals.poll()[0]:  # asked to stop while the data was read: nothing to save yet
        raise Preempted(signals.received, 0)
    log.info("%d steps of %d rows x %d tokens (%s steps per epoch)", total_steps, batch_size, seq_len,
             order.steps_per_epoch if order else "streaming: unknown")

    # QLoRA quantises each layer as it is read, so the float model never exists whole.
    on_param = quant.QuantSpec.from_config(config.peft).on_param if config.peft.method == "qlora" else None
    head_labels = data.label_names if config.peft.task == "sequence_classification" else None
    model = hf.load_pretrained(config.model.path, mesh=mesh, dtype=DTYPES[config.model.dtype], on_param=on_param,
                               param_dtype=DTYPES[config.model.param_dtype], remat=config.model.remat,
                               layer_loop=layer_loop(config.model.layer_loop), attention=config.model.attention,
                               num_labels=len(head_labels or ()), seed=config.seed)
    method = peft.prepare(model, config.peft, rngs=nnx.Rngs(params=config.seed), tokenizer=tokenizer)
    stack.layout_for_loop(model)
    _log_step_choices(model.config, config)
    table = parameter_table(model, method.trainable)
    log.info("Trainable parameters (%s):\n%s", method.name, format_parameter_table(table))
    flop_count = flops_lib.train_flops_per_token(model, method.trainable, seq_len)
    device_kind = jax.devices()[0].device_kind
    peak = flops_lib.peak_flops(device_kind)
    log.info("FLOPs per token: %s. Device %s: %s", flop_count.summary(), device_kind,
             f"dense bf16 peak {peak / 1e12:g} TFLOP/s" if peak else "peak unknown, so no MFU")
    if method.name == "qlora":
        sizes = quant.weight_bytes(model)
        log.info("Quantised base (%s): %d layers, %s bytes vs %s in bfloat16 (%.3fx)", config.peft.quant,
                 sizes["layers"], f"{sizes['quantized_bytes']:,}", f"{sizes['bf16_bytes']:,}", sizes["ratio"])
    graphdef, params, frozen = split_model(model, method.trainable)
    eval_graphdef = split_model(_without_dropout(model), method.trainable)[0]
    teacher = None if teacher_dir is None else distill_lib.load_teacher(
        config, teacher_dir, mesh, dtype=DTYPES[config.model.dtype], param_dtype=DTYPES[config.model.param_dtype],
        layer_loop=layer_loop(config.model.layer_loop))
    teacher_flops = 0.0 if teacher is None else flops_lib.train_flops_per_token(
        teacher.model, TrainableFilter(((r".*", False),)), seq_len).computed  # its forward pass only

    # 3. Optimizer and state, laid out on the mesh --------------------------------------
    tx = build_optimizer(config.optim, total_steps, _start_steps(method, params))
    state, frozen, state_shardings, frozen_shardings = init_state(params, frozen, tx, mesh)
    nnx.update(model, state["params"], frozen)  # the model holds the laid-out arrays, not a second copy
    if jax.process_index() == 0:
        quantized = quant.weight_bytes(model)["bf16_bytes"] // 2 if method.name == "qlora" else 0
        _write_json(workdir / "parameters.json", parameter_summary(method.name, table, state, frozen, quantized))
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = jax.jit(functools.partial(
        train_step, graphdef=graphdef, tx=tx, schedule=learning_rate_schedule(config.optim, total_steps),
        accum_steps=config.optim.grad_accum_steps, dropout_key=jax.random.key(config.seed), mesh=mesh,
        loss_chunk=config.model.loss_chunk, distill=teacher and teacher.spec),
        in_shardings=(state_shardings, frozen_shardings, batch_sharding, *([teacher.shardings] if teacher else [])),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    teacher_args = (teacher.state,) if teacher else ()
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=eval_graphdef, mesh=mesh,
                                        loss_chunk=config.model.loss_chunk),
                      in_shardings=(state_shardings["params"], frozen_shardings, batch_sharding),
                      out_shardings=sharding.replicated(mesh))

    # 4. Resume -----------------------------------------------------------------
    checkpoints = ckpt_lib.Checkpointer(workdir, every_steps=config.checkpoint.every_steps,
                                        keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    fingerprint = ckpt_lib.fingerprint(params)
    data_fingerprint = train_set.fingerprint()
    best_key, best_mode = best_metric(config)
    stopper = EarlyStopping(config.eval.early_stopping_patience, config.eval.early_stopping_min_delta,
                            mode=best_mode, metric=best_key)
    if checkpoints.latest_step() is not None:
        state, meta = checkpoints.restore_newest(state, fingerprint)
        _check_data_position(meta, order, int(state["step"]), data_fingerprint)
        stopper.restore(meta.get("early_stopping"))
        log.info("Resumed from %s at step %d (data position %s)", checkpoints.directory, int(state["step"]),
                 meta.get("data_position"))
    start_step = int(state["step"])
    resumed = checkpoints.latest_step() is not None
    # Where the next batch is read: the batches report it with each step (a stream's depends on the data). A
    # checkpoint is only saved right after a step, so this is always the position after the step it saves.
    position = order.position(start_step) if order else meta.get("data_position") if resumed else None
    stop_step = start_step if stopper.should_stop else total_steps
    if stopper.should_stop:
        log.info("This run stopped early at step %d; exporting without training further.", stopper.stopped_at)
    best = (ckpt_lib.Checkpointer(workdir, every_steps=1, keep=1, async_save=config.checkpoint.async_save,
                                  subdir="best") if config.eval.keep_best else None)

    # 5. Loop -------------------------------------------------------------------
    writer = MetricWriter(workdir, keep_through=start_step if resumed else None)
    progress = Progress(total_steps, start_step, config.train.progress_bar)
    throughput = Throughput(flops_per_token=flop_count.computed + teacher_flops, num_devices=jax.device_count(),
                            peak_flops=peak, model_flops_per_token=flop_count.model_6n)
    loss_now = functools.partial(_evaluate, eval_fn, frozen, eval_set, config, train_set.pad_id,
                                 batch_sharding, eval_batch_size)
    label_logits = None
    if head_labels is not None:
        logits_fn = jax.jit(functools.partial(label_logits_step, graphdef=eval_graphdef, mesh=mesh),
                            in_shardings=(state_shardings["params"], frozen_shardings, batch_sharding),
                            out_shardings=sharding.replicated(mesh))
        label_logits = functools.partial(_label_logits, logits_fn, frozen, config, train_set.pad_id, batch_sharding,
                                         eval_batch_size)
    answer_now = evaluate.answerer(config, eval_graphdef, frozen, eval_set, tokenizer, data.label_names,
                                   eval_groups, train_set.pad_id, eval_batch_size, mesh, workdir, label_logits)

    def evaluate_now(step):
        return {**loss_now(state["params"]), **answer_now(step, state["params"])}
    last = {}

    def save(step):
        _check_finite(state)
        checkpoints.save(step, state, dict(step=step, data_position=position, rows_seen=step * batch_size,
                                           data_fingerprint=data_fingerprint, fingerprint=fingerprint,
                                           early_stopping=stopper.to_meta(), config=resume.resolved(config)))
        signals.saved()
        if jax.process_index() == 0 and order is None:  # a stream's report grows as it is read
            _write_json(workdir / "data_report.json", dict(data.report, train=train_set.report()))

    def judge(step, metrics):
        """The judged metric against the best so far: the best's parameters kept, patience counted."""
        if best_key not in metrics:
            raise ConfigError(f"eval.best_metric={config.eval.best_metric!r}: the evaluation reported "
                              f"{sorted(k[len('eval_'):] for k in metrics if k.startswith('eval_'))}.")
        if stopper.update(step, metrics[best_key]) and best is not None:
            best.save(step, dict(params=state["params"]), dict(step=step, metric=best_key, value=metrics[best_key],
                                                                fingerprint=fingerprint))
        if stopper.should_stop:
            log.info("Early stopping at step %d: %s has not %s by more than %g from its best (%.4f, step %d) for "
                     "%d evaluations.", step, best_key, "fallen" if best_mode == "min" else "risen",
                     stopper.min_delta, stopper.best_value, stopper.best_step, stopper.patience)

    window = []
    part = sharding.process_rows(batch_sharding, batch_size)  # the rows of each batch this process builds
    batches = data_lib.Prefetcher(train_set.batches(start_step, stop_step, part), config.data.prefetch)
    try:
        if start_step == 0 and eval_set is not None:
            last = evaluate_now(0)
            writer.write(0, last)
            log.info("step 0: %s", _fmt(last))
            judge(0, last)
            on_metrics(0, dict(last))
        if signals.poll()[0]:  # before any step: nothing new to save
            raise Preempted(signals.received, start_step, checkpoints.directory if resumed else None)
        for step, batch, position in batches:
            state, metrics = step_fn(state, frozen, data_lib.to_global(batch, batch_sharding, batch_size),
                                     *teacher_args)
            window.append(metrics)
            done = step + 1
            progress.update(done, last)
            fresh = {}  # what this step logged and evaluated
            if done % config.train.log_every_steps == 0 or done == total_steps:
                last = fresh = _summarise(window, throughput, batches.wait_seconds)
                _check_finite(state)
                writer.write(done, last)
                window = []
            if eval_set is not None and ((config.eval.every_steps and done % config.eval.every_steps == 0)
                                         or done == total_steps):
                evaluation = evaluate_now(done)
                last, fresh = {**last, **evaluation}, {**fresh, **evaluation}
                writer.write(done, evaluation)
                log.info("step %d: %s", done, _fmt(last))
                judge(done, last)
            if fresh:
                on_metrics(done, fresh)
            stop, timed = signals.poll()
            if checkpoints.due(done) or done == total_steps or stopper.should_stop or stop or timed:
                save(done)
            if stop:
                checkpoints.wait()  # committed before any process exits: a launcher may end the others then
                sharding.barrier("jaxft: the preemption checkpoint is committed")
                raise Preempted(signals.received, done, checkpoints.directory)
            if stopper.should_stop:
                break
    except KeyboardInterrupt:
        log.warning("Stopped at once; the last checkpoint in %s is where the same command resumes.",
                    checkpoints.directory)
        raise
    finally:
        batches.close()
        for manager in (checkpoints, best):
            if manager is not None:
                manager.wait()
                manager.close()
        progress.close()
        writer.close()

    if jax.process_index() == 0:
        evaluate.show_answers_before_and_after(workdir)
        evaluate.show_group_report(workdir)
        plot.write_run_curves(workdir)  # curves.png: the run's metrics.jsonl drawn (jaxft/plot.py)

    # 6. Export -----------------------------------------------------------------
    nnx.update(model, _best_params(workdir, state["params"], fingerprint) if best else state["params"])
    if jax.process_count() > 1:  # process 0 writes the files: it needs every shard
        nnx.update(model, sharding.gather(nnx.state(model)))
    if jax.process_index() == 0:
        export.export_run(model, method, tokenizer, config, workdir / "export", head_labels)
    return last


def _best_params(workdir, params, fingerprint):
    """The parameters of the best evaluation, saved under <workdir>/best (`eval.keep_best`)."""
    best = ckpt_lib.Checkpointer(workdir, every_steps=1, keep=1, async_save=False, subdir="best")
    try:
        step = best.latest_step()
        if step is None:
            log.warning("eval.keep_best: no evaluation was saved under %s (was the run started without "
                        "keep_best?); exporting the last parameters.", best.directory)
            return params
        restored, meta = best.restore(step, dict(params=params), fingerprint)
    finally:
        best.close()
    # Checkpoints from before eval.best_metric carry only their eval loss.
    metric, value = meta.get("metric", "eval_loss"), meta.get("value", meta.get("eval_loss"))
    log.info("Exporting the parameters of the best evaluation (eval.keep_best): step %d, %s %.4f", step, metric,
             value)
    return restored["params"]


def _log_step_choices(model_config, config) -> None:
    """Say what runs each step: the layer loop, the remat policy, and the attention backend `auto` resolved
    to on this platform, with why (README, "Memory and speed on accelerators")."""
    windows = {model_config.layer_window(i) for i in range(model_config.num_layers)}
    # Training rows are right-padded (causal order hides the padding); prompt tuning's virtual tokens
    # need a padding mask, and over packed rows a dense one (models/decoder.py, hidden_states).
    prompts = config.peft.method == "prompt_tuning"
    backend, why = attention.explain_backend(
        config.model.attention, dtype=DTYPES[config.model.dtype], head_dim=model_config.head_dim,
        window=max((w for w in windows if w is not None), default=None),
        has_segment_ids=config.data.packing and not prompts, has_kv_mask=prompts,
        has_dense_mask=prompts and config.data.packing)
    pooled = getattr(model_config, "pooled_token", "last")  # an encoder's head reads the first ([CLS])
    head = (f"a {model_config.num_labels}-label head over each row's {pooled} token" if model_config.num_labels else
            f"head + loss in chunks of {config.model.loss_chunk or 'whole-row'} positions")
    log.info("Decoder blocks: %d, layer loop %s, remat %s; attention %s (%s); %s", model_config.num_layers,
             model_config.layer_loop, config.model.remat, backend, why, head)


def layer_loop(name: str, platform: str | None = None) -> str:
    """`model.layer_loop`, with "auto" resolved: a Python loop on CPU, where XLA schedules the unrolled blocks
    faster (bench/README.md), one scan elsewhere (compile time independent of depth)."""
    if name != "auto":
        return name
    return "unroll" if (platform or jax.default_backend()) == "cpu" else "scan"


def _start_steps(method, params):
    """Per-parameter start steps for gradual unfreezing (None when everything trains from step 0)."""
    if method.start_step is None:
        return None
    # Every layer of a stacked parameter starts at the same step (select.uniform_groups made it so).
    steps = nnx.from_flat_state([(path, v.replace(value=method.start_step(stack.layer_names(path, v)[0])))
                                 for path, v in nnx.to_flat_state(params)])
    counts = collections.Counter(jax.tree.leaves(steps))
    log.info("Gradual unfreezing (step: tensors that start training): %s",
             ", ".join(f"{step}: {n}" for step, n in sorted(counts.items())))
    return steps


def _without_dropout(model):
    """The same model with dropout off (nnx.view refuses models that have no Dropout)."""
    if any(isinstance(m, nnx.Dropout) for _, m in nnx.iter_modules(model)):
        return nnx.view(model, deterministic=True)
    return model


def _global_eval_batches(examples, config, pad_id, batch_sharding, batch_size, max_batches=None):
    """The eval batches of `examples` as global arrays: every process reads each batch and passes on its rows."""
    rows = sharding.process_rows(batch_sharding, batch_size)
    batches = data_lib.eval_batches(examples, batch_size, config.train.seq_len, pad_id, max_batches)
    return (data_lib.to_global({k: v[rows] for k, v in b.items()}, batch_sharding, batch_size) for b in batches)


def _evaluate(eval_fn, frozen, eval_set, config, pad_id, batch_sharding, batch_size, params) -> dict:
    """Loss and perplexity over the eval set."""
    batches = _global_eval_batches(eval_set, config, pad_id, batch_sharding, batch_size, config.eval.max_batches)
    return evaluate.loss_and_perplexity(functools.partial(eval_fn, params, frozen), batches)


def _label_logits(logits_fn, frozen, config, pad_id, batch_sharding, batch_size, params, examples, n) -> np.ndarray:
    """A classifier's label logits `[n, num_labels]` for the first `n` of `examples`."""
    batches = _global_eval_batches(examples.subset(range(n)), config, pad_id, batch_sharding, batch_size)
    logits = [logits_fn(params, frozen, batch) for batch in batches]  # dispatch all before reading any back
    return np.concatenate(jax.device_get(logits))[:n]


def _summarise(window: list[dict], throughput: Throughput, input_wait_seconds: float) -> dict:
    """Means over the logging window (not the last step alone), plus tokens/s (all hosts') and input wait."""
    window = jax.device_get(window)
    return dict(
        loss=float(np.mean([m["loss"] for m in window])),
        grad_norm=float(np.mean([m["grad_norm"] for m in window])),
        lr=float(window[-1]["lr"]),
        # Distillation's two parts of the loss (jaxft/distill.py); absent otherwise.
        **{k: float(np.mean([m[k] for m in window])) for k in ("data_loss", "distill_kl") if k in window[0]},
        **throughput.rates(int(sum(m["tokens"] for m in window)), input_wait_seconds),
    )


def _check_data_position(meta: dict, order, step: int, data_fingerprint: str) -> None:
    """A resume must read the data the checkpoint's run read, from the same position."""
    saved = meta.get("data_fingerprint")
    if saved is not None and saved != data_fingerprint:
        raise DataError("The training data (or its tokenisation, cleaning or packing settings) differ from the "
                        "run that wrote the checkpoint, so resuming cannot continue its batch order. Resume "
                        "with the same data and data.* settings, or use a new --workdir.")
    saved_position = meta.get("data_position")
    if order is not None and saved_position is not None and saved_position != order.position(step):
        raise DataError(f"The checkpoint's data position {saved_position} does not match step {step} under this "
                        f"train.batch_size ({order.position(step)}); resume with the same train.batch_size and "
                        f"seed, or use a new --workdir.")


def _write_json(path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _check_finite(state) -> None:
    bad = int(state["nonfinite_step"])
    if bad >= 0:
        raise TrainingDivergedError(
            f"The loss or gradient became NaN/Inf at step {bad}; training stopped and that update was not "
            f"applied. The last checkpoint in the workdir is intact. Try a lower optim.lr, optim.clip_norm, "
            f"or model.dtype=float32.")


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
