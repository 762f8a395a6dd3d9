"""`python -m jaxft.generate`: a run's workdir or a base + adapter, one streamed prompt or a JSONL file; prompts
tokenised as training tokenised them; adapters that do not fit, and bad rows, named."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxft.errors import AdapterError, DataError
from jaxft.generate import GenerationConfig, generate
from jaxft.generate.__main__ import main
from jaxft.generate.prompts import chat_prompt, row_prompt, split_example, text_prompt
from jaxft.models import stack
from jaxft.models.hf import load_pretrained, load_tokenizer
from jaxft.peft.adapters import adapter_modules, apply_adapters, load_adapters, save_adapters
from jaxft.peft.lora import LoRAConfig, apply_lora, lora_modules
from jaxft.peft.peft_format import save_lora_adapter
from tests.conftest import QUICKSTART
from tests.test_trainer import small_config
from tests.tiny_hf import save_tiny_model

EVAL_ROWS = [json.loads(line) for line in (QUICKSTART / "eval.jsonl").read_text().splitlines()[:5]]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(QUICKSTART / "model")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """What a LoRA run leaves: its resolved config and its exported adapter (LoRA B moved off zero)."""
    workdir = tmp_path_factory.mktemp("run")
    (workdir / "config.json").write_text(small_config().to_json_best_effort())
    model = load_pretrained(QUICKSTART / "model")
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(0))
    for i, m in enumerate(lora_modules(model).values()):
        m.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(i), m.lora_b.get_value().shape))
    save_lora_adapter(model, workdir / "export" / "adapter", LoRAConfig(rank=4, alpha=8.0), wrapped,
                      base_model=str(QUICKSTART / "model"))
    return workdir, model


def _expected(model, tokenizer, prompts, new=24):
    ids = [text_prompt(tokenizer, p) for p in prompts]
    return generate(model, ids, GenerationConfig(max_new_tokens=new, eos_token_ids=(tokenizer.eos_token_id,),
                                                 pad_token_id=tokenizer.pad_token_id or 0), tokenizer=tokenizer)


def test_file_of_rows_answered_from_a_workdir(run_dir, tokenizer, tmp_path):
    workdir, model = run_dir
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in EVAL_ROWS))
    main(["--workdir", str(workdir), "--data", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "p.jsonl"),
          "--max-new-tokens", "24", "--batch-size", "2"])
    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    expected = _expected(model, tokenizer, [r["prompt"] for r in EVAL_ROWS])
    assert [w["prediction"] for w in written] == expected.texts
    assert [w["finish_reason"] for w in written] == expected.finish_reasons
    assert [{k: w[k] for k in ("prompt", "completion")} for w in written] == EVAL_ROWS


def test_one_prompt_streams_from_base_and_adapter(run_dir, tokenizer, capsys):
    workdir, model = run_dir
    prompt = EVAL_ROWS[1]["prompt"]
    main(["--model", str(QUICKSTART / "model"), "--adapter", str(workdir / "export" / "adapter"),
          "--prompt", prompt, "--max-new-tokens", "24"])
    assert capsys.readouterr().out == _expected(model, tokenizer, [prompt]).texts[0] + "\n"


def test_an_adapter_for_another_base_is_refused(run_dir, tmp_path, capsys):
    other = save_tiny_model("llama", tmp_path / "other")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(other), "--adapter", str(run_dir[0] / "export" / "adapter"), "--prompt", "hi"])
    assert e.value.code == 2
    assert "AdapterError" in capsys.readouterr().err


def test_bad_rows_are_named_with_their_line(run_dir, tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text(json.dumps(EVAL_ROWS[0]) + "\n{not json\n")
    with pytest.raises(SystemExit):
        main(["--workdir", str(run_dir[0]), "--data", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "o")])
    assert "rows.jsonl:2: invalid JSON" in capsys.readouterr().err
    (tmp_path / "rows.jsonl").write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(SystemExit):
        main(["--workdir", str(run_dir[0]), "--data", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "o")])
    assert "row 1: row has no 'prompt' text or 'messages' chat" in capsys.readouterr().err


def test_prompts_are_tokenised_as_training_tokenised_them(tokenizer):
    from jaxft.data import pipeline
    data = pipeline.load(small_config(), tokenizer)
    examples = data.eval
    for i in range(3):
        ids = examples.tokens[examples.offsets[i]:examples.offsets[i + 1]]
        mask = examples.loss_mask[examples.offsets[i]:examples.offsets[i + 1]]
        row = json.loads((QUICKSTART / "eval.jsonl").read_text().splitlines()[examples.origin[i][1]])
        prompt, answer = split_example(ids, mask, stop_ids=(tokenizer.eos_token_id,))
        assert prompt == text_prompt(tokenizer, row["prompt"])
        assert tokenizer.decode(answer) == row["completion"]
        assert row_prompt(tokenizer, row) == (prompt, row["completion"])
    with pytest.raises(DataError, match="no prompt to answer"):
        split_example([5, 6, 7], [1, 1, 1])


def test_chat_prompts_open_the_assistant_turn(tokenizer):
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    row = {"messages": [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]}
    ids, reference = row_prompt(tokenizer, row, template=template)
    assert reference == "four" and tokenizer.decode(ids).endswith("two plus two?</s><assistant>")
    assert ids == chat_prompt(tokenizer, row["messages"][:1], template=template)
    if not getattr(tokenizer, "chat_template", None):
        with pytest.raises(DataError, match="needs a chat template"):
            text_prompt(tokenizer, "hi", chat=True)


def test_bottleneck_adapters_round_trip(tmp_path):
    model = load_pretrained(QUICKSTART / "model")
    apply_adapters(model, "houlsby", 8, rngs=nnx.Rngs(0))
    for i, m in enumerate(adapter_modules(model).values()):
        m.adapter.up_kernel.set_value(0.1 * jax.random.normal(jax.random.key(i), m.adapter.up_kernel.get_value().shape))
    save_adapters(model, tmp_path / "a", kind="houlsby", bottleneck=8, activation="relu")
    loaded = load_pretrained(QUICKSTART / "model")
    load_adapters(loaded, tmp_path / "a")
    config = GenerationConfig(max_new_tokens=8)
    assert generate(loaded, [[1, 5, 9, 30]], config).tokens == generate(model, [[1, 5, 9, 30]], config).tokens
    with pytest.raises(AdapterError, match="another base"):
        load_adapters(load_pretrained(save_tiny_model("llama", tmp_path / "other")), tmp_path / "a")


def test_a_run_that_trained_on_chats_gets_chat_prompts(run_dir, tmp_path, capsys):
    import shutil
    workdir = tmp_path / "chat_run"
    shutil.copytree(run_dir[0], workdir)
    (workdir / "data_report.json").write_text(json.dumps({"train": {"format": "messages"}}))
    with pytest.raises(SystemExit):  # the quickstart tokenizer has no chat template: --chat was turned on
        main(["--workdir", str(workdir), "--prompt", "hi"])
    assert "needs a chat template" in capsys.readouterr().err
    main(["--workdir", str(workdir), "--prompt", "hi", "--no-chat", "--max-new-tokens", "2"])


def test_a_qlora_run_answers_over_its_quantised_base(tokenizer, tmp_path):
    """The adapter of a QLoRA run was trained against the quantised base: a --workdir load quantises it the same
    way (the same logits), which loading the adapter over the float base would not give."""
    from jaxft import peft
    config = small_config(**{"peft.method": "qlora", "peft.rank": 4, "peft.quant": "nf4", "peft.quant_block_size": 64})
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    model = load_pretrained(QUICKSTART / "model", layer_loop="unroll")  # as load_model lays it out on CPU
    method = peft.prepare(model, config.peft, rngs=nnx.Rngs(0))
    stack.layout_for_loop(model)
    for i, m in enumerate(lora_modules(model).values()):
        m.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(i), m.lora_b.get_value().shape))
    save_lora_adapter(model, tmp_path / "export" / "adapter", method.lora, list(method.wrapped),
                      base_model=str(QUICKSTART / "model"))
    from jaxft.generate.load import load_model
    from jaxft.peft.quant import quantized_modules
    loaded, _, run_config = load_model(workdir=tmp_path)
    assert run_config["peft"]["method"] == "qlora"
    assert set(quantized_modules(loaded)) == set(quantized_modules(model)) != set()
    ids = jnp.asarray([text_prompt(tokenizer, EVAL_ROWS[0]["prompt"])])
    ours, expected = np.asarray(loaded(ids)), np.asarray(model(ids))
    assert np.abs(ours - expected).max() <= 1e-5
    float_base = load_pretrained(QUICKSTART / "model")  # what loading the adapter without quantising gives
    from jaxft.peft.peft_format import load_lora_adapter
    load_lora_adapter(float_base, tmp_path / "export" / "adapter")
    assert np.abs(np.asarray(float_base(ids)) - expected).max() > 100 * 1e-5


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory):
    """Another LoRA adapter of the quickstart model (other targets, other B), as another task would leave."""
    directory = tmp_path_factory.mktemp("second")
    model = load_pretrained(QUICKSTART / "model")
    lora = LoRAConfig(rank=2, alpha=8.0, targets="v_proj,down_proj")
    wrapped = apply_lora(model, lora, rngs=nnx.Rngs(1))
    for i, m in enumerate(lora_modules(model).values()):
        m.lora_b.set_value(0.2 * jax.random.normal(jax.random.key(100 + i), m.lora_b.get_value().shape))
    save_lora_adapter(model, directory, lora, wrapped, base_model=str(QUICKSTART / "model"))
    return directory, model


def test_rows_pick_their_adapter_among_several_on_one_base(run_dir, second_adapter, tokenizer, tmp_path, capsys):
    (workdir, first), (second_dir, second) = run_dir, second_adapter
    rows = [dict(EVAL_ROWS[0], adapter="b"), EVAL_ROWS[1], dict(EVAL_ROWS[2], adapter="b")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapters = ["--adapter", f"a={workdir / 'export' / 'adapter'}", "--adapter", f"b={second_dir}"]
    main(["--model", str(QUICKSTART / "model"), *adapters, "--data", str(tmp_path / "rows.jsonl"),
          "--out", str(tmp_path / "p.jsonl"), "--max-new-tokens", "24"])
    written = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    by_b, by_a = (_expected(m, tokenizer, [r["prompt"] for r in rows]).texts for m in (second, first))
    assert [w["adapter"] for w in written] == ["b", "a", "b"]
    assert [w["prediction"] for w in written] == [by_b[0], by_a[1], by_b[2]]
    assert by_a != by_b  # the adapters answer differently, so picking the wrong one would show
    main(["--model", str(QUICKSTART / "model"), *adapters, "--use", "b", "--prompt", rows[1]["prompt"],
          "--max-new-tokens", "24"])
    assert capsys.readouterr().out == by_b[1] + "\n"
    (tmp_path / "bad.jsonl").write_text(json.dumps(dict(EVAL_ROWS[0], adapter="c")) + "\n")
    with pytest.raises(SystemExit):
        main(["--model", str(QUICKSTART / "model"), *adapters, "--data", str(tmp_path / "bad.jsonl"),
              "--out", str(tmp_path / "x.jsonl")])
    assert "rows name adapters ['c']" in capsys.readouterr().err
