"""Checkpoint faults a long job meets: a newest checkpoint with missing or truncated files, or one whose commit never
finished, makes the run fall back to the newest one that restores; none restoring is a clear error that deletes
nothing; a save that fails on a full disk leaves the earlier checkpoints usable."""

import errno
import logging
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from jaxft import trainer
from jaxft.errors import CheckpointError
from tests.test_trainer import small_config

STEPS = 6


def _config():
    return small_config(**{"train.steps": STEPS, "checkpoint.every_steps": 3, "checkpoint.keep": 5,
                           "eval.every_steps": 0})


def _adapter(workdir):
    return load_file(str(workdir / "export" / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run whose checkpoints are 3 and 6, and what it exported."""
    workdir = tmp_path_factory.mktemp("finished")
    trainer.run(_config(), workdir)
    return workdir


def _truncate_arrays(step_dir):
    for f in (step_dir / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete_meta(step_dir):
    shutil.rmtree(step_dir / "meta")


def _copy_without_last(finished, tmp_path, damage):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    shutil.rmtree(workdir / "export")
    damage(workdir / "checkpoints" / str(STEPS))
    return workdir


@pytest.mark.parametrize("damage", [_truncate_arrays, _delete_meta])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(finished, tmp_path, damage, caplog):
    workdir = _copy_without_last(finished, tmp_path, damage)
    with caplog.at_level(logging.WARNING, logger="jaxft"):
        trainer.run(_config(), workdir)
    assert any(f"checkpoints/{STEPS}" in r.getMessage() and "Trying the one before it" in r.getMessage()
               for r in caplog.records)
    assert (workdir / "checkpoints_damaged" / str(STEPS)).is_dir()  # set aside, not deleted
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, STEPS]
    ours, theirs = _adapter(workdir), _adapter(finished)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)  # steps 4-6 retrained to the same result


def test_an_unfinished_commit_is_not_taken_for_a_checkpoint(finished, tmp_path):
    """orbax writes into a temporary directory and renames it when the save is complete; a save cut short
    leaves only that directory."""
    workdir = _copy_without_last(finished, tmp_path, lambda d: d.rename(d.with_name(f"{STEPS}.orbax-checkpoint-tmp-1")))
    trainer.run(_config(), workdir)
    ours, theirs = _adapter(workdir), _adapter(finished)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def test_no_checkpoint_restoring_is_an_error_that_deletes_nothing(finished, tmp_path):
    workdir = _copy_without_last(finished, tmp_path, _truncate_arrays)
    _truncate_arrays(workdir / "checkpoints" / "3")
    with pytest.raises(CheckpointError, match=r"No checkpoint in .* restores \(step 6: .*; step 3: .*Nothing was "
                                              r"deleted\. Move the checkpoints directory aside"):
        trainer.run(_config(), workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


def test_a_full_disk_during_a_save_is_named_and_the_earlier_checkpoint_resumes(finished, tmp_path, monkeypatch):
    """The second save's metadata write fails with ENOSPC (the arrays were being written): the error says so and
    which checkpoints are intact; with space again, the same command resumes from step 3."""
    write = ocp.handlers.JsonCheckpointHandler.async_save

    async def full_disk(self, directory, *args, **kwargs):
        if f"/{STEPS}" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await write(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", full_disk)
    workdir = tmp_path / "run"
    with pytest.raises(CheckpointError, match=rf"Saving checkpoint {STEPS} in .* failed \(OSError: .*No space left "
                                              r"on device\); the checkpoints committed before it \(3\) are intact"):
        trainer.run(_config(), workdir)
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", write)
    trainer.run(_config(), workdir)
    ours, theirs = _adapter(workdir), _adapter(finished)
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
