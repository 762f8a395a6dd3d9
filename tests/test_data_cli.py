"""`python -m jaxft.data --show N`: rendered examples with the loss tokens marked, and the report."""

import json
import subprocess
import sys

from tests.conftest import QUICKSTART, ROOT


def _run(*args):
    return subprocess.run([sys.executable, "-m", "jaxft.data", "--config", str(ROOT / "configs/quickstart.py"),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_show_prints_marked_examples_and_the_report():
    result = _run("--show", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    first = json.loads((QUICKSTART / "train.jsonl").read_text().splitlines()[0])
    assert f"«{first['completion']}</s>»" in out  # the completion and EOS are the loss tokens
    assert "train.jsonl:1;" in out and "train.jsonl:2;" in out and "train.jsonl:3;" not in out
    report = json.loads(out[out.index("--- data report") + len("--- data report"):])
    assert report["train"]["rows_read"] == 2581 and report["eval"]["rows_read"] == 250


def test_show_reports_bad_config_in_one_line():
    result = _run("--config.data.fromat=text")
    assert result.returncode == 2 and "Did you mean 'data.format'?" in result.stderr
