"""Curves of one run or several overlaid, read from their `metrics.jsonl`: training and eval loss, learning rate,
gradient norm, tokens/s (and MFU where known), and every task score the evaluations gave, against step.

    python -m jaxft.plot runs/x [runs/y ...] [--out plots/]

writes `curves.png` (every panel) and one PNG per panel. In Python, `figure(["runs/x", "runs/y"])` returns the
matplotlib figure (a notebook shows it). A finished run writes its own `curves.png` (jaxft/trainer.py).
"""

import argparse
import json
import logging
import math
import pathlib
import sys

log = logging.getLogger("jaxft")

# (panel, title, [(metric key, line style)]) in the order drawn; task-score panels follow.
PANELS = (
    ("loss", "loss (solid: train, dashed: eval)", [("loss", "-"), ("eval_loss", "--")]),
    ("lr", "learning rate", [("lr", "-")]),
    ("grad_norm", "gradient norm", [("grad_norm", "-")]),
    ("tokens_per_sec", "tokens/s", [("tokens_per_sec", "-")]),
    ("mfu", "MFU", [("mfu", "-")]),
)
# Eval keys that are not scores: the loss is on the loss panel, the rest are counts or restate the loss.
NOT_SCORES = ("eval_loss", "eval_perplexity", "eval_tokens")


def read_metrics(workdir) -> list[dict]:
    """The rows of `<workdir>/metrics.jsonl` (a torn last line of a killed run skipped)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a jaxft run directory?")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`; NaN/Inf (logged as strings) kept as NaN, so a gap shows where a run diverged."""
    steps, values = [], []
    for row in rows:
        if key in row:
            value = row[key]
            steps.append(row["step"])
            values.append(float(value) if isinstance(value, (int, float, str)) and _number(value) else math.nan)
    return steps, values


def _number(value) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def panels(runs: dict[str, list[dict]]) -> list[tuple]:
    """The panels that some run has data for: the fixed ones, then one per task score."""
    keys = {k for rows in runs.values() for row in rows for k in row}
    chosen = [p for p in PANELS if any(key in keys for key, _ in p[2])]
    scores = sorted(k for k in keys if k.startswith("eval_") and k not in NOT_SCORES)
    return chosen + [(k, k[len("eval_"):].replace("_", " "), [(k, "-")]) for k in scores]


def figure(workdirs, labels=None, panel_names=None):
    """A matplotlib figure with one panel per metric and one colour per run (named by `labels`, default the
    directory names). `panel_names` picks panels by name (e.g. ["loss", "eval_exact_match"]).

    >>> fig = figure([tmp / "run"], panel_names=["loss", "lr"])
    >>> [ax.get_gid() for ax in fig.axes], [line.get_label() for line in fig.axes[0].get_lines()]
    (['loss', 'lr'], ['run loss', 'run eval_loss'])
    """
    import matplotlib.pyplot as plt

    workdirs = [pathlib.Path(w) for w in ([workdirs] if isinstance(workdirs, (str, pathlib.Path)) else workdirs)]
    labels = list(labels) if labels is not None else _names(workdirs)
    runs = {label: read_metrics(w) for label, w in zip(labels, workdirs)}
    chosen = [p for p in panels(runs) if panel_names is None or p[0] in panel_names]
    if not chosen:
        raise ValueError(f"Nothing to plot: no metrics in {', '.join(map(str, workdirs))}.")
    columns = min(3, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, title, lines) in zip(axes.flat, chosen):
        for i, (label, records) in enumerate(runs.items()):
            for key, style in lines:
                steps, values = series(records, key)
                if steps:
                    ax.plot(steps, values, style, color=colors[i % len(colors)], marker="." if style == "--" else None,
                            label=f"{label} {key}" if len(lines) > 1 else label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_gid(name)  # the panel's name, for whoever reads the figure back
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(chosen):]:
        ax.remove()
    fig.tight_layout()
    return fig


def _names(workdirs) -> list[str]:
    """Each run's directory name, with parents added where two share one."""
    names = [w.name or str(w) for w in workdirs]
    if len(set(names)) < len(names):
        names = [str(w) for w in workdirs]
    return names


def write(workdirs, out, labels=None) -> list[pathlib.Path]:
    """`<out>/curves.png` with every panel, and `<out>/<panel>.png` for each; the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig = figure(workdirs, labels)
    written = [out / "curves.png"]
    fig.savefig(written[0], dpi=100)
    names = [ax.get_gid() for ax in fig.axes]
    plt.close(fig)
    for name in names:
        fig = figure(workdirs, labels, panel_names=[name])
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(out / f"{name}.png")
    return written


def write_run_curves(workdir) -> pathlib.Path | None:
    """A finished run's `<workdir>/curves.png`; a plotting failure is logged, never fatal to the run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(workdir) / "curves.png"
    try:
        fig = figure([workdir])
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as e:  # the run's results stand without their picture
        log.warning("Could not draw %s: %s", path, e)
        return None
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxft.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--out", default="plots", help="directory for the PNGs (default: plots)")
    parser.add_argument("--labels", help="comma-separated names for the runs (default: their directory names)")
    a = parser.parse_args(argv)
    labels = a.labels.split(",") if a.labels else None
    if labels is not None and len(labels) != len(a.workdirs):
        parser.error(f"--labels names {len(labels)} runs, but {len(a.workdirs)} were given")
    try:
        paths = write(a.workdirs, a.out, labels)
    except (FileNotFoundError, ValueError) as e:
        print(f"jaxft: error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(map(str, paths)))


if __name__ == "__main__":
    main()
