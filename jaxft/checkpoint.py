"""Training checkpoints: orbax `CheckpointManager` under `<workdir>/checkpoints`.

A checkpoint holds what the run changes and nothing it can rebuild: the step,
the trainable parameters, the optimizer state (an orbax pytree), and a small
JSON record (the data position and a fingerprint of the trainable parameters).
Frozen pretrained weights are reloaded from their source. Saves are
asynchronous; orbax writes each into a temporary directory and renames it when
complete, so a killed run never leaves a half checkpoint that looks whole, and
it deletes checkpoints past `keep` only after the new one is committed.

Faults a long job meets are survived: a newest checkpoint that does not restore
(files missing or truncated: a disk error, a copy cut short) is reported and the
next older one is used (`restore_newest`); a save that fails (a full disk) is a
CheckpointError saying which checkpoints are still intact. Nothing is deleted.
"""

import logging
import pathlib
import time

import jax
import orbax.checkpoint as ocp

from jaxft.errors import CheckpointError


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint's files are missing, truncated or corrupt (not a checkpoint of another run)."""

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
        save would otherwise fail on orbax's StepAlreadyExistsError instead of stopping).
        CheckpointError if this save, or the previous asynchronous one, fails."""
        if step in self.manager.all_steps():
            return
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:  # orbax re-raises a failed background save here, or at wait()
            raise self._save_failed(step, e) from e

    def restore(self, step: int, like, expected_fingerprint: dict):
        """The state saved at `step`, shaped like `like`, and its meta; CheckpointError if unusable."""
        where = self.directory / str(step)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for unreadable files
            raise UnreadableCheckpointError(f"Checkpoint {where} cannot be read ({type(e).__name__}: {e}). Move it "
                                            f"aside to resume from an earlier one, or use a new --workdir.") from e
        if meta.get("fingerprint") != expected_fingerprint:
            raise CheckpointError(_mismatch_message(where, meta.get("fingerprint") or {}, expected_fingerprint))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        except Exception as e:
            raise UnreadableCheckpointError(f"Checkpoint {where} is corrupt or incomplete ({type(e).__name__}: "
                                            f"{e}). Move it aside to resume from an earlier one, or use a new "
                                            f"--workdir.") from e
        return restored["state"], meta

    def restore_newest(self, like, expected_fingerprint: dict):
        """`(state, meta)` of the newest checkpoint that restores, trying older ones when a newer one's files
        are damaged (each reported with its step and path); CheckpointError when none does, deleting nothing.
        A checkpoint of another run (other trainable parameters) stops at once: the older ones are its too."""
        failures, damaged = [], []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.restore(step, like, expected_fingerprint)
            except UnreadableCheckpointError as e:
                log.warning("%s Trying the one before it.", e)
                failures.append(f"step {step}: {e.__cause__ or e}")
                damaged.append(step)
                continue
            if damaged:
                self._set_aside(damaged)
                log.warning("Resuming from checkpoint %d, the newest that restores; the damaged newer ones (%s) "
                            "were moved to %s for inspection.", step, damaged, self._damaged_dir)
            return restored
        raise CheckpointError(f"No checkpoint in {self.directory} restores ({'; '.join(failures)}). Nothing was "
                              f"deleted. Move the checkpoints directory aside to start from step 0, or use a new "
                              f"--workdir.")

    @property
    def _damaged_dir(self) -> pathlib.Path:
        return self.directory.parent / f"{self.directory.name}_damaged"

    def _set_aside(self, steps) -> None:
        """Move damaged checkpoints out of the manager's directory (kept, not deleted), so the run saves those
        steps afresh and a later resume does not meet them again."""
        self._damaged_dir.mkdir(exist_ok=True)
        for step in steps:
            target = self._damaged_dir / str(step)
            if target.exists():
                target = self._damaged_dir / f"{step}.{int(time.time())}"
            (self.directory / str(step)).rename(target)
        self.manager.reload()

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(self.manager.latest_step(), e) from e

    def _save_failed(self, step, error: Exception) -> CheckpointError:
        committed = sorted(self.manager.all_steps())
        intact = f"the checkpoints committed before it ({', '.join(map(str, committed))}) are intact" if committed \
            else "no checkpoint was committed yet"
        return CheckpointError(f"Saving checkpoint {step} in {self.directory} failed ({type(error).__name__}: "
                               f"{error}); {intact}. Free disk space (or fix the directory's permissions), then run "
                               f"the same command to resume from the newest.")

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
