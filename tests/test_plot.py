"""jaxft/plot.py: runs' curves drawn from their metrics.jsonl, several runs overlaid (checked on the figure's
lines, not its pixels). A real run's curves: tests/test_trainer.py's quickstart test."""

import json
import math

import matplotlib
import pytest

from jaxft import plot

matplotlib.use("Agg")


def _run(directory, rows):
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
    return directory


@pytest.fixture
def two_runs(tmp_path):
    a = _run(tmp_path / "a", [dict(step=0, eval_loss=4.0, eval_exact_match=0.0),
                              dict(step=2, loss=3.0, lr=1e-3, grad_norm=1.0, tokens_per_sec=100.0),
                              dict(step=4, loss=2.0, lr=5e-4, grad_norm=0.5, tokens_per_sec=120.0),
                              dict(step=4, eval_loss=2.5, eval_exact_match=0.5)])
    b = _run(tmp_path / "b", [dict(step=0, eval_loss=4.0), dict(step=2, loss="nan", lr=1e-2),
                              dict(step=4, loss=5.0, lr=1e-2)])
    return a, b


def _lines(fig, panel):
    ax = next(ax for ax in fig.axes if ax.get_gid() == panel)
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_two_runs_overlay_on_every_panel(two_runs):
    fig = plot.figure(two_runs)
    assert [ax.get_gid() for ax in fig.axes] == ["loss", "lr", "grad_norm", "tokens_per_sec", "eval_exact_match"]
    loss = _lines(fig, "loss")
    assert loss["a loss"] == ([2, 4], [3.0, 2.0]) and loss["a eval_loss"] == ([0, 4], [4.0, 2.5])
    assert loss["b eval_loss"] == ([0], [4.0])
    steps, values = loss["b loss"]  # a NaN logged as a string is a gap, not a missing point
    assert steps == [2, 4] and math.isnan(values[0]) and values[1] == 5.0
    assert _lines(fig, "lr") == {"a": ([2, 4], [1e-3, 5e-4]), "b": ([2, 4], [1e-2, 1e-2])}
    assert _lines(fig, "eval_exact_match") == {"a": ([0, 4], [0.0, 0.5])}
    labelled = plot.figure(two_runs, labels=["lr 1e-3", "lr 1e-2"], panel_names=["lr"])
    assert set(_lines(labelled, "lr")) == {"lr 1e-3", "lr 1e-2"}


def test_cli_writes_a_png_per_panel_and_names_a_missing_run(two_runs, tmp_path, capsys):
    plot.main([str(two_runs[0]), str(two_runs[1]), "--out", str(tmp_path / "out")])
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"curves.png", "loss.png", "lr.png", "grad_norm.png", "tokens_per_sec.png",
                     "eval_exact_match.png"}
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "missing")])
    assert e.value.code == 2 and "missing/metrics.jsonl does not exist" in capsys.readouterr().err
    assert plot.write_run_curves(tmp_path / "missing") is None  # a run is never failed by its picture
