"""The console progress bar (jaxft/metrics.py) and what it leaves in a log file; throughput against the
hardware (TFLOP/s per device, MFU)."""

import time

import jax
import pytest

from jaxft.flops import peak_flops
from jaxft.metrics import Progress, Throughput, flop_rates


def test_progress_into_a_log_file_redraws_rarely(capsys):
    """Not a terminal (CI, SLURM, pod logs): a few lines for a fast run, not one per step; the last
    state, with its metrics, is still written when the bar closes."""
    progress = Progress(total_steps=500, start_step=0, enabled=True)
    for step in range(1, 501):
        progress.update(step, {"loss": 1.0 / step, "lr": 1e-3})
    progress.close()
    err = capsys.readouterr().err
    redraws = err.count("\r") + err.count("\n")
    assert redraws <= 4, err
    assert "500/500" in err and "loss=0.002" in err


def test_progress_resumes_at_its_start_step(capsys):
    progress = Progress(total_steps=10, start_step=6, enabled=True)
    progress.update(7, {})
    progress.close()
    assert "7/10" in capsys.readouterr().err


def test_flop_rates_per_device_and_mfu_only_where_the_peak_is_known():
    """4 devices share 10,000 tokens/s of a step costing 3e9 FLOPs per token: 7.5 TFLOP/s each; on a chip
    of 100 TFLOP/s peak that is 7.5% MFU, 10% by the 6N convention's 4e9 FLOPs per token."""
    rates = flop_rates(10_000.0, 3e9, num_devices=4, peak_flops=100e12, model_flops_per_token=4e9)
    assert rates == dict(tflops_per_device=pytest.approx(7.5), mfu=0.075, mfu_6n=0.1)
    assert flop_rates(10_000.0, 3e9, num_devices=4, peak_flops=None) == dict(tflops_per_device=pytest.approx(7.5))
    assert flop_rates(10_000.0, None, num_devices=4, peak_flops=100e12) == {}


def test_throughput_reports_flops_and_no_mfu_on_cpu():
    """On CPU (the tests' device) there is no known peak, so no MFU key at all, not a zero or a guess."""
    peak = peak_flops(jax.devices()[0].device_kind)
    throughput = Throughput(flops_per_token=3e9, num_devices=jax.device_count(), peak_flops=peak)
    time.sleep(0.01)
    rates = throughput.rates(tokens=1000, input_wait_seconds=0.0)
    assert rates["tflops_per_device"] == pytest.approx(rates["tokens_per_sec"] * 3e9 / jax.device_count() / 1e12)
    assert "mfu" not in rates and "mfu_6n" not in rates
    known = Throughput(flops_per_token=3e9, num_devices=1, peak_flops=989e12).rates(1000, 0.0)
    assert known["mfu"] == round(known["tflops_per_device"] * 1e12 / 989e12, 4)
    assert set(Throughput().rates(1000, 0.0)) == {"tokens_per_sec", "input_wait_fraction"}


def test_progress_shows_mfu_as_a_percentage(capsys):
    progress = Progress(total_steps=2, start_step=0, enabled=True)
    progress.update(1, {"loss": 1.0})
    progress.update(2, {"loss": 0.5, "mfu": 0.4123, "tflops_per_device": 407.8})
    progress.close()
    err = capsys.readouterr().err
    assert "mfu=41.2%" in err
