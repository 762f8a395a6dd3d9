"""The console progress bar (jaxft/metrics.py) and what it leaves in a log file."""

from jaxft.metrics import Progress


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
