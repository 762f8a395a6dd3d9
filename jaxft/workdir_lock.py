"""One run per workdir: `<workdir>/run.lock` names the host and process that hold it.

Two runs writing one workdir (the same command started twice, a rerun while a job still runs) would
interleave checkpoints, metrics and exports. The lock is a file created exclusively (O_EXCL), so of
two starts exactly one wins. A lock whose process is gone (killed with SIGKILL, the machine rebooted)
on this same host is taken over with a warning; one from another host cannot be checked from here, so
the error says how to remove it. In a multi-host job process 0 holds it for all.
"""

import datetime
import json
import logging
import os
import pathlib
import socket

from jaxft.errors import WorkdirInUseError

log = logging.getLogger("jaxft")

LOCK_NAME = "run.lock"


class WorkdirLock:
    def __init__(self, workdir):
        self.path = pathlib.Path(workdir) / LOCK_NAME
        self.mine = dict(host=socket.gethostname(), pid=os.getpid(),
                         started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise WorkdirInUseError naming the run that holds it."""
        for _ in range(3):  # a stale lock taken over, then a race lost to another start, then give up
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise WorkdirInUseError(self._in_use_message(holder)) from None
                log.warning("Taking over %s: the run that held it (process %s on %s, started %s) is gone.",
                            self.path, holder.get("pid"), holder.get("host"), holder.get("started"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.mine, f)
            return
        raise WorkdirInUseError(self._in_use_message(self._holder()))

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self._holder() == self.mine:
            self.path.unlink(missing_ok=True)

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (ValueError, OSError):
            return {"unreadable": True}  # torn by a writer killed between create and write

    def _stale(self, holder: dict) -> bool:
        if holder.get("unreadable") or not holder:
            return True
        if holder.get("host") != self.mine["host"]:
            return False  # another machine's process: cannot tell from here
        return not _alive(int(holder["pid"]))

    def _in_use_message(self, holder: dict) -> str:
        return (f"{self.path.parent} is in use by another run (process {holder.get('pid')} on {holder.get('host')}, "
                f"started {holder.get('started')}). Wait for it to finish or stop it, or give this run another "
                f"--workdir. If that run is gone (its machine was lost), delete {self.path}.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
