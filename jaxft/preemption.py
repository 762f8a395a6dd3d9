"""Stopping a run cleanly: SIGTERM (spot/preemptible VMs, SLURM before its time limit, Kubernetes) and SIGINT.

A signal only raises a flag; the training loop asks `StopSignal.poll` at every step boundary, saves a
checkpoint of the step just finished, and stops with `Preempted` (the CLI exits with `EXIT_PREEMPTED`),
so nothing is cut off mid-step, mid-compilation or mid-evaluation: those finish first. The same command
then resumes exactly there. A second signal means "now": it raises KeyboardInterrupt at once, and the
run keeps the checkpoints it has.

On several processes a signal may reach only some of them (one host's VM is preempted), and a
checkpoint save is collective: every process must stop at the same step. `poll` therefore joins every
process's flag with an all-gather each step, so they agree. The same vote carries the time-based save
(`checkpoint.every_seconds`), whose clocks differ between hosts.
"""

import logging
import signal
import threading
import time

import jax
import numpy as np

from jaxft.errors import JaxftError

log = logging.getLogger("jaxft")

# EX_TEMPFAIL from sysexits.h: a temporary failure, the caller is invited to retry (the same command resumes).
EXIT_PREEMPTED = 75
HANDLED = (signal.SIGTERM, signal.SIGINT)


class Preempted(JaxftError):
    """The run stopped on a signal after saving a checkpoint; running the same command resumes it."""

    def __init__(self, signal_name: str, step: int, directory=None):
        where = (f"after saving a checkpoint at step {step} in {directory}" if directory is not None else
                 "before the first step, with nothing to save")
        super().__init__(f"Stopped by {signal_name} {where}; the same command resumes the run from there.")
        self.step = step


class StopSignal:
    """While entered, SIGTERM and SIGINT set a flag instead of killing the process (main thread only)."""

    def __init__(self, every_seconds: float = 0.0):
        self.received: str | None = None
        self.every_seconds = every_seconds
        self._last_save = time.monotonic()
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        self._restore()

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:  # asked twice: stop now
            self._restore()
            raise KeyboardInterrupt(f"second signal ({name}): stopping without a further checkpoint")
        self.received = name
        log.warning("%s received: the run saves a checkpoint when the current step (or evaluation) ends, then "
                    "stops; the same command resumes it. Send it again to stop at once.", name)

    def saved(self) -> None:
        """A checkpoint was just saved: the time-based save counts from now."""
        self._last_save = time.monotonic()

    def poll(self) -> tuple[bool, bool]:
        """`(stop, save)`, the same on every process: stop because some process got a signal; save because
        `every_seconds` passed on some process since the last save. A collective on several processes:
        every process must call it at the same steps."""
        votes = np.array([self.received is not None,
                          bool(self.every_seconds) and time.monotonic() - self._last_save >= self.every_seconds])
        if jax.distributed.is_initialized() and jax.process_count() > 1:  # (one process: JAX not asked, not started)
            from jax.experimental import multihost_utils
            votes = np.asarray(multihost_utils.process_allgather(votes)).reshape(-1, 2).any(axis=0)
        if votes[0] and self.received is None:
            self.received = "a signal to another process"
        return bool(votes[0]), bool(votes[1])
