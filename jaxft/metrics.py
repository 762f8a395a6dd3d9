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
    """Appends one JSON object per call to `<workdir>/metrics.jsonl` and mirrors scalars to TensorBoard.

    `keep_through`: the step a resumed run restarts from. Rows an earlier attempt logged after it (it went
    on past its last checkpoint, then was killed) are dropped from metrics.jsonl, and TensorBoard is told to
    drop its events past it too (a purge step), so the resumed run logs each step once. None: a fresh start,
    which drops everything an attempt without any checkpoint left.
    """

    def __init__(self, workdir, keep_through: int | None = None):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        workdir = pathlib.Path(workdir)
        path = workdir / "metrics.jsonl"
        dropped = _truncate_after(path, -1 if keep_through is None else keep_through)
        if dropped:
            log.info("metrics.jsonl: dropped %d rows an earlier attempt logged after step %s, where this run "
                     "continues", dropped, keep_through)
        self._jsonl = path.open("a", encoding="utf-8")
        purge_from = 0 if keep_through is None else keep_through + 1
        self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge_from)

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


def _truncate_after(path: pathlib.Path, step: int) -> int:
    """Keep the rows of `path` up to `step` (and no torn last line of a killed writer); returns how many went."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            row_step = None
        if row_step is not None and row_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


def _plain(value):
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as strings
    return value


class Progress:
    """A progress bar over optimizer steps showing loss, lr, tokens/s and MFU; tqdm supplies the ETA."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled and jax.process_index() == 0
        # Into a log file (CI, SLURM, a pod's worker logs) every redraw is a line: redraw every 30 s there.
        interval = 0.1 if sys.stderr.isatty() else 30.0
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        mininterval=interval, maxinterval=max(interval, 10.0), disable=not self.enabled)

    def update(self, step: int, metrics: dict) -> None:
        shown = {k: f"{metrics[k]:.4g}" for k in ("loss", "lr", "tokens_per_sec", "eval_loss") if k in metrics}
        if "mfu" in metrics:  # only where the chip's peak is known (Throughput)
            shown["mfu"] = f"{100 * metrics['mfu']:.1f}%"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(step - self.bar.n)  # redraws when tqdm's interval has passed

    def close(self) -> None:
        self.bar.close()


class Throughput:
    """Tokens per second, the share of wall time spent waiting for input, and, given the FLOPs per token
    (jaxft/flops.py), TFLOP/s per device and model FLOPs utilisation, between two readings."""

    def __init__(self, flops_per_token: float | None = None, num_devices: int = 1, peak_flops: float | None = None,
                 model_flops_per_token: float | None = None):
        """`flops_per_token`: `FlopCount.computed` (what `mfu` uses); `model_flops_per_token`: `FlopCount.model_6n`
        (reported as `mfu_6n`); `num_devices`: every device of the run (`jax.device_count()`), since the token
        rate is all hosts'; `peak_flops`: one device's peak (`flops.peak_flops`), None where unknown."""
        self._last = time.perf_counter()
        self._waited = 0.0
        self._flops = dict(flops_per_token=flops_per_token, num_devices=num_devices, peak_flops=peak_flops,
                           model_flops_per_token=model_flops_per_token)

    def rates(self, tokens: int, input_wait_seconds: float) -> dict:
        """`input_wait_seconds` is the running total of time blocked on input (Prefetcher.wait_seconds)."""
        now = time.perf_counter()
        elapsed = max(now - self._last, 1e-9)
        waited = input_wait_seconds - self._waited
        self._last, self._waited = now, input_wait_seconds
        tokens_per_sec = tokens / elapsed
        return dict(tokens_per_sec=tokens_per_sec, input_wait_fraction=round(min(waited / elapsed, 1.0), 4),
                    **flop_rates(tokens_per_sec, **self._flops))


def flop_rates(tokens_per_sec: float, flops_per_token: float | None, num_devices: int = 1,
               peak_flops: float | None = None, model_flops_per_token: float | None = None) -> dict:
    """`tflops_per_device` (10^12 FLOP/s each device did, counted as `flops_per_token`), and where the device's
    peak is known `mfu` (that over the peak, a fraction) and, given `model_flops_per_token`, `mfu_6n` (the
    PaLM/MaxText convention); keys without the numbers they need are left out, never filled in.

    `tokens_per_sec` counts real tokens (padding excluded), so padding shows up as lost utilisation."""
    if flops_per_token is None:
        return {}
    per_device = tokens_per_sec * flops_per_token / num_devices
    out = dict(tflops_per_device=per_device / 1e12)
    if peak_flops:
        out["mfu"] = round(per_device / peak_flops, 4)
        if model_flops_per_token is not None:
            out["mfu_6n"] = round(tokens_per_sec * model_flops_per_token / num_devices / peak_flops, 4)
    return out
