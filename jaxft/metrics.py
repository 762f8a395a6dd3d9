"""Where a run's numbers go: `metrics.jsonl`, TensorBoard events, and the console.

Only process 0 writes; on other processes the writer accepts and drops everything,
so the training flow never asks which process it is on.
"""

import json
import logging
import math
import pathlib
import sys
import time

import jax
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

log = logging.getLogger("jaxft")


class MetricWriter:
    """Appends one JSON object per call to `<workdir>/metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, workdir):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        workdir = pathlib.Path(workdir)
        self._jsonl = (workdir / "metrics.jsonl").open("a", encoding="utf-8")
        self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as strings
    return value


class Progress:
    """A progress bar over optimizer steps showing loss, lr and tokens/s; tqdm supplies the ETA."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled and jax.process_index() == 0
        # Into a log file (CI, SLURM, a pod's worker logs) every redraw is a line: redraw every 30 s there.
        interval = 0.1 if sys.stderr.isatty() else 30.0
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        mininterval=interval, maxinterval=max(interval, 10.0), disable=not self.enabled)

    def update(self, step: int, metrics: dict) -> None:
        shown = {k: metrics[k] for k in ("loss", "lr", "tokens_per_sec", "eval_loss") if k in metrics}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self.bar.update(step - self.bar.n)  # redraws when tqdm's interval has passed

    def close(self) -> None:
        self.bar.close()


class Throughput:
    """Tokens per second, and the share of wall time spent waiting for input, between two readings."""

    def __init__(self):
        self._last = time.perf_counter()
        self._waited = 0.0

    def rates(self, tokens: int, input_wait_seconds: float) -> dict:
        """`input_wait_seconds` is the running total of time blocked on input (Prefetcher.wait_seconds)."""
        now = time.perf_counter()
        elapsed = max(now - self._last, 1e-9)
        waited = input_wait_seconds - self._waited
        self._last, self._waited = now, input_wait_seconds
        return dict(tokens_per_sec=tokens / elapsed, input_wait_fraction=round(min(waited / elapsed, 1.0), 4))
