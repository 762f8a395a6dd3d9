"""Training checkpoints: orbax `CheckpointManager` under `<workdir>/checkpoints`.

A checkpoint holds what the run changes and nothing it can rebuild: the step,
the trainable parameters, the optimizer state (an orbax pytree), and a small
JSON record (the data position and a fingerprint of the trainable parameters).
Frozen pretrained weights are reloaded from their source. Saves are
asynchronous; orbax writes each into a temporary directory and renames it when
complete, so a killed run never leaves a half checkpoint that looks whole.
"""

import logging
import pathlib

import jax
import orbax.checkpoint as ocp

from jaxft.errors import CheckpointError

log = logging.getLogger("jaxft")


def fingerprint(params) -> dict:
    """Path -> shape/dtype of every trainable parameter: what a resumed run must agree on."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): f"{v.dtype}{list(v.shape)}" for p, v in flat}


class Checkpointer:
    """Saves every `every_steps`, keeps the newest `keep`, restores the latest. `subdir`: "checkpoints"
    for resuming; "best" holds the parameters of the best evaluation (`eval.keep_best`)."""

    def __init__(self, workdir, *, every_steps: int, keep: int, async_save: bool, subdir: str = "checkpoints"):
        self.directory = pathlib.Path(workdir).absolute() / subdir
        self.every_steps = every_steps
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving `state` (a pytree) and `meta` (JSON) as checkpoint `step`; a step saved already
        is kept as it is: a resumed run replays to the same state (and an interrupt right after a
        save would otherwise fail on orbax's StepAlreadyExistsError instead of stopping)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, like, expected_fingerprint: dict):
        """The state saved at `step`, shaped like `like`, and its meta; CheckpointError if unusable."""
        where = self.directory / str(step)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for unreadable files
            raise CheckpointError(f"Checkpoint {where} cannot be read ({type(e).__name__}: {e}). Move it aside "
                                  f"to resume from an earlier one, or use a new --workdir.") from e
        if meta.get("fingerprint") != expected_fingerprint:
            raise CheckpointError(_mismatch_message(where, meta.get("fingerprint") or {}, expected_fingerprint))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:
            raise CheckpointError(f"Checkpoint {where} is corrupt or incomplete ({type(e).__name__}: {e}). "
                                  f"Move it aside to resume from an earlier one, or use a new --workdir.") from e
        return restored["state"], meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _mismatch_message(where, saved: dict, expected: dict) -> str:
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
    parts = []
    if missing:
        parts.append(f"parameters this run trains but the checkpoint lacks: {missing[:5]}")
    if extra:
        parts.append(f"parameters in the checkpoint this run does not train: {extra[:5]}")
    if reshaped:
        parts.append("different shapes: " + ", ".join(f"{k} {saved[k]} vs {expected[k]}" for k in reshaped[:5]))
    return (f"Checkpoint {where} was written by a run with other trainable parameters ("
            + "; ".join(parts) + "). Resume with the config that wrote it, or use a new --workdir.")
