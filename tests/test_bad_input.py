"""Bad user input, one case per table row: each is refused with its jaxft error, whose message names the problem
and says what to do; on the command line it is a `jaxft: error:` line, exit status 2, no traceback.

A case is (id, trigger, error type, problem regex, remedy regex). The trigger takes a fresh tmp_path and must
raise; the helpers it calls are below the tables. Nothing here trains: every error comes before the first step.
"""

import ast
import functools
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh
from safetensors.numpy import load_file, save_file

from jaxft import data, sharding, trainer
from jaxft.config import validate
from jaxft.errors import AdapterError, ConfigError, DataError, ModelLoadError
from jaxft.kernels.lora_matmul import Blocks, lora_matmul, use_pallas
from jaxft.models.hf import load_pretrained, load_tokenizer
from jaxft.peft.lora import LoRAConfig, apply_lora
from jaxft.peft.peft_format import load_lora_adapter, lora_adapter_config
from tests.conftest import QUICKSTART, ROOT
from tests.test_data import CHAT_TEMPLATE
from tests.test_trainer import small_config

ONE_ROW = '{"text": "a"}\n'
TWO_ROWS = '{"text": "a"}\n{"text": "b"}\n'
LABELLED = '{"text": "a", "label": "pos"}\n{"text": "b", "label": "maybe"}\n'
NO_ANSWER = '{"messages": [{"role": "user", "content": "hi"}]}\n'
UP_PROJ = "model.layers.1.mlp.up_proj.weight"
INDEX = "model.safetensors.index.json"

CASES = [
    # config values: jaxft.config.validate
    ("unknown-key", lambda t: validated("optim.lrr=1e-3"), ConfigError, r"key 'optim\.lrr'",
     r"Did you mean 'optim\.lr'"),
    ("optim-name", lambda t: validated("optim.name='foo'"), ConfigError, r"optim\.name='foo'",
     r"choose one of 'adamw'"),
    ("negative-lr", lambda t: validated("optim.lr=-1.0"), ConfigError, r"optim\.lr=-1\.0", r"must be > 0"),
    ("steps-and-epochs", lambda t: validated("train.epochs=2"), ConfigError, r"steps=6, epochs=2", r"exactly one of"),
    ("accum-split", lambda t: validated("train.batch_size=6", "optim.grad_accum_steps=4"), ConfigError,
     r"train\.batch_size=6", r"must divide by optim\.grad_accum_steps=4"),
    ("best-metric", lambda t: validated("eval.best_metric='accuracy'"), ConfigError, r"best_metric='accuracy' is not",
     r"it reports loss, perplexity"),
    ("group-field", lambda t: validated("eval.group_field='dialect'"), ConfigError, r"group_field='dialect'",
     r"set eval\.metrics too"),
    ("head-on-adapter", lambda t: validated("peft.task='sequence_classification'", "peft.method='adapter'"),
     ConfigError, r"peft\.method='adapter' cannot carry", r"Use one of lora, qlora"),
    ("no-model-path", lambda t: validated("model.path=None"), ConfigError, r"model\.path is not set",
     r"give a Hugging Face model directory"),
    ("eval-fraction", lambda t: validated("data.eval_fraction=1.5"), ConfigError, r"eval_fraction=1\.5",
     r"must be in \[0, 1\)"),
    ("unknown-metric", lambda t: validated("eval.metrics='bleurt'"), ConfigError, r"metric 'bleurt'", r"valid: exact"),
    ("patience-no-eval", lambda t: validated("eval.early_stopping_patience=2", "data.eval=None"), ConfigError,
     r"early_stopping_patience judges", r"give data\.eval or data\.eval_fraction"),
    ("mesh-zero", lambda t: validated("mesh.tensor=0"), ConfigError, r"mesh\.tensor=0", r"positive size or -1"),
    # data files: jaxft.data.load
    ("missing-file", lambda t: load_data(t, None), DataError, r"train\.jsonl' does not exist", r"check the path"),
    ("empty-file", lambda t: load_data(t, ""), DataError, r"train\.jsonl' is empty", r"give a file with at least"),
    ("invalid-json", lambda t: load_data(t, '{"text": "a"}\n{"text": \n'), DataError, r"train\.jsonl:2: invalid JSON",
     r"fix or delete that line"),
    ("not-utf8", lambda t: load_data(t, b'{"text": "caf\xe9"}\n'), DataError, r"jsonl:1: not valid UTF-8",
     r"re-save the file as UTF-8"),
    ("not-an-object", lambda t: load_data(t, ONE_ROW + "[1, 2]\n"), DataError, r"jsonl:2: a row must be a JSON object",
     r"write each line as"),
    ("first-row-an-array", lambda t: load_data(t, "[1, 2]\n" + ONE_ROW), DataError,
     r"jsonl:1: a row must be a JSON object", r"write each line as"),
    ("missing-field", lambda t: load_data(t, '{"prompt": "p", "completion": "c"}\n{"prompt": "q"}\n'), DataError,
     r"jsonl:2: missing field 'completion'", r"set data\.on_bad_row=skip"),
    ("wrong-type", lambda t: load_data(t, '{"text": 3}\n'), DataError, r"jsonl:1: field 'text' must be a string",
     r"set data\.on_bad_row=skip"),
    ("unknown-label", lambda t: load_data(t, LABELLED, "data.labels='pos,neg'"), DataError,
     r"jsonl:2: label 'maybe' is not in the label set", r"add it to data\.labels"),
    ("no-assistant", lambda t: load_chat(t, NO_ANSWER), DataError, r"jsonl:1: the chat has no assistant turn",
     r"data\.on_bad_row=skip"),
    ("fewer-rows", lambda t: load_data(t, TWO_ROWS, "train.batch_size=4"), DataError,
     r"2 usable rows, fewer than train\.batch_size=4", r"lower train\.batch_size or give more rows"),
    ("unknown-columns", lambda t: load_data(t, '{"question": "q"}\n'), DataError, r"format from columns \['question'\]",
     r"set data\.format"),
    ("no-usable-rows", lambda t: load_data(t, '{"text": "  "}\n'), DataError, r"No usable rows", r"fix the data or"),
    ("txt-file", lambda t: load_data(t, "x", "data.train='{tmp}/d.txt'"), DataError, r"unknown data file type '\.txt'",
     r"use one of"),
    ("empty-glob", lambda t: load_data(t, None, "data.train='{tmp}/*.jsonl'"), DataError, r"matches no files",
     r"check the directory"),
    ("plain-directory", lambda t: load_data(t, None, "data.train='{tmp}'"), DataError,
     r"is a directory but not one written by", r"give a file or a glob"),
    ("eval-takes-all", lambda t: load_data(t, ONE_ROW, "data.eval_fraction=0.5", "train.batch_size=1"), DataError,
     r"leaves no training examples", r"lower data\.eval_fraction"),
    ("chat-template", lambda t: load_data(t, NO_ANSWER, "data.chat_template='{tmp}/t.jinja'"), DataError,
     r"neither a Jinja template nor an existing file", r"give the template text"),
    ("head-on-text", lambda t: load_data(t, TWO_ROWS, "peft.task='sequence_classification'"), DataError,
     r"the data is in 'text' format", r"give rows with 'text' and 'label' fields"),
    # model directories: jaxft.models.hf.load_pretrained
    ("missing-dir", lambda t: load_pretrained(t / "nope"), ModelLoadError, r"nope' does not exist", r"set model\.path"),
    ("dir-is-a-file", lambda t: load_pretrained(model_dir(t) / "config.json"), ModelLoadError,
     r"config\.json' is a file, not a directory", r"set model\.path to the directory"),
    ("no-config", lambda t: load_pretrained(model_dir(t, without("config.json"))), ModelLoadError,
     r"no config\.json in", r"point model\.path at"),
    ("config-not-json", lambda t: load_pretrained(model_dir(t, with_file("config.json", b"{"))), ModelLoadError,
     r"config\.json is not valid JSON", r"restore it"),
    ("model-type", lambda t: load_pretrained(model_dir(t, with_config(model_type="mamba"))), ModelLoadError,
     r"model_type 'mamba' is not supported",
     r"supported: .*llama.* \(use a checkpoint of one of these"),
    ("missing-tensor", lambda t: load_pretrained(model_dir(t, without_tensor(UP_PROJ))), ModelLoadError,
     r"missing tensors: \['model\.layers\.1\.mlp\.up_proj\.weight'\]", r"use the config\.json saved with"),
    ("misshaped-tensor", lambda t: load_pretrained(model_dir(t, with_tensor("model.norm.weight", np.ones(127)))),
     ModelLoadError, r"model\.norm\.weight: expected \(128,\), found \(127,\)", r"use the config\.json saved with"),
    ("corrupt-weights", lambda t: load_pretrained(model_dir(t, with_file("model.safetensors", b"junk" * 9))),
     ModelLoadError, r"model\.safetensors cannot be read as safetensors", r"download or save it again"),
    ("missing-shard", lambda t: load_pretrained(model_dir(t, without("model.safetensors"), with_file(INDEX, SHARDS))),
     ModelLoadError, r"names shard\(s\) missing .*part-2", r"download the missing shards"),
    ("pickle-only", lambda t: load_pickle_only(t), ModelLoadError, r"no model\.safetensors .*pytorch_model\.bin",
     r"convert \.bin files"),
    # adapters: jaxft.peft.peft_format.load_lora_adapter, jaxft.peft.lora.apply_lora
    ("no-weights-file", lambda t: load_adapter(t, None), AdapterError, r"adapter_model\.safetensors missing",
     r"give the directory the adapter was saved to"),
    ("other-width", lambda t: load_adapter(t, lora_tensors(width=32)), AdapterError,
     r"lora_A\.weight: shape \[4, 32\] does not fit", r"Load it onto the base model it was trained from"),
    ("other-depth", lambda t: load_adapter(t, lora_tensors(layers=5)), AdapterError,
     r"no linear module 'model\.layers\.3\.self_attn\.q_proj'", r"Load it onto the base model it was trained from"),
    ("missing-layer", lambda t: load_adapter(t, lora_tensors(layers=2)), AdapterError,
     r"lacks 2 of the tensors .*layers\.2\.self_attn\.q_proj", r"Save or download the adapter again"),
    ("seq-cls", lambda t: load_adapter(t, lora_tensors(), task_type="SEQ_CLS"), AdapterError, r"task_type SEQ_CLS",
     r"loads in transformers' AutoModelForSequenceClassification"),
    ("prefix-tuning", lambda t: load_adapter(t, lora_tensors(), peft_type="PREFIX_TUNING"), AdapterError,
     r"peft_type 'PREFIX_TUNING'", r"give a LoRA adapter's directory"),
    ("no-rank", lambda t: load_adapter(t, lora_tensors(), r=None), AdapterError, r"lacks 'r'", r"restore it"),
    ("config-garbage", lambda t: load_adapter(t, lora_tensors(), raw=b"{"), AdapterError, r"is not valid JSON",
     r"restore it"),
    ("weights-garbage", lambda t: load_adapter(t, b"junk"), AdapterError, r"cannot be read as safetensors",
     r"save or download the adapter again"),
    ("targets", lambda t: lora(LoRAConfig(targets="qkv_proj")), AdapterError,
     r"names \['qkv_proj'\], which the model does not have", r"its linear modules are \['down_proj'"),
    ("rank", lambda t: lora(LoRAConfig(rank=512)), AdapterError, r"peft\.rank=512 exceeds", r"use a rank <= 128"),
    # meshes: jaxft.sharding
    ("mesh-too-big", lambda t: sharding.make_mesh(mesh("data=2", "fsdp=1"), jax.devices()[:1]), ConfigError,
     r"data=2 x fsdp=1 x tensor=1 does not fit the 1 devices", r"Set the sizes so their product is the device count"),
    ("mesh-no-divisor", lambda t: sharding.mesh_shape(mesh("data=3"), 8), ConfigError,
     r"3 does not divide 8", r"leave one at -1"),
    ("mesh-two-fills", lambda t: sharding.mesh_shape(mesh("data=-1", "fsdp=-1"), 8), ConfigError,
     r"more than one mesh size is -1", r"at most one may be -1"),
    ("mesh-slices", lambda t: sharding.mesh_shape(mesh("dcn_data=3"), 8), ConfigError, r"mesh\.dcn_data=3",
     r"must be a positive divisor of the 8 devices"),
    ("batch-split", lambda t: sharding.check_batch(12, 2, MESH_222), ConfigError,
     r"batch_size=12 \(micro-batches of 6 rows.* does not split", r"Use a multiple of 4 rows per micro-batch"),
    ("eval-batch-split", lambda t: sharding.check_batch(6, 1, MESH_222, "eval.batch_size"), ConfigError,
     r"eval\.batch_size=6 does not split", r"or a mesh with fewer data/fsdp ways"),
    # kernel blocks: jaxft.kernels.lora_matmul
    ("gpu-blocks", lambda t: kernel_shapes(Blocks(m=96), "cuda"), ConfigError, r"m=96.* do not fit this backend",
     r"must be powers of two >= 16"),
    ("tpu-blocks", lambda t: kernel_shapes(Blocks(n=64), "tpu"), ConfigError, r"n=64.* do not fit this backend",
     r"must be positive multiples of 8 \(m\) and 128 \(n, k\)"),
    ("negative-block", lambda t: kernel_shapes(Blocks(m=-8), "tpu"), ConfigError, r"m=-8.* do not fit",
     r"must be positive multiples"),
    ("gpu-warps", lambda t: kernel_shapes(Blocks(warps=3), "cuda"), ConfigError, r"warps=3",
     r"warps a power of two .* choose Blocks"),
    ("tpu-vmem", lambda t: kernel_shapes(Blocks(1024, 4096, 4096), "tpu", 4096, interpret=False), ConfigError,
     r"need \d+ MiB of VMEM, more than a TPU core has", r"choose smaller Blocks"),
    ("kernel-name", lambda t: use_pallas("triton"), ConfigError, r"kernel='triton' is not", r"choose one of"),
    # workdirs: jaxft.trainer.run, before the model loads
    ("workdir-is-a-file", lambda t: run_in(a_file(t / "run")), ConfigError, r"run is a file, not a directory",
     r"give a directory path"),
    ("workdir-under-a-file", lambda t: run_in(a_file(t / "f") / "run"), ConfigError,
     r"cannot be written \(Not a directory\)", r"give a directory this user can write"),
    ("workdir-read-only", lambda t: run_in(read_only(t / "run")), ConfigError, r"run cannot be written",
     r"give a directory this user can write"),
    ("data-cache-is-a-file", lambda t: run_in(a_file(t / "data_cache").parent), ConfigError,
     r"data cache .*data_cache cannot be written", r"set data\.cache=False"),
]

# The command line: `--config.<flag>` over the quickstart recipe; {tmp} is the test's tmp_path.
CLI_CASES = [
    ("--config.optim.name=foo", r"ConfigError: optim\.name='foo' is not valid", r"choose one of"),
    ("--config.data.train={tmp}/nope.jsonl", r"DataError: Data file '.*nope\.jsonl' does not exist",
     r"check the path in data\.train"),
    ("--config.model.path={tmp}/nope", r"ModelLoadError: model directory '.*nope' does not exist",
     r"set model\.path to a local Hugging Face model directory"),
]


@pytest.mark.parametrize("trigger,error,problem,remedy", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_what_to_do(tmp_path, trigger, error, problem, remedy):
    with pytest.raises(error) as caught:
        trigger(tmp_path)
    message = str(caught.value)
    assert re.search(problem, message), f"the message does not name the problem: {message}"
    assert re.search(remedy, message), f"the message does not say what to do: {message}"


@pytest.mark.parametrize("flag,problem,remedy", CLI_CASES, ids=[c[0].split("=")[0] for c in CLI_CASES])
def test_cli_reports_bad_input_without_a_traceback(tmp_path, flag, problem, remedy):
    out = subprocess.run([sys.executable, "-m", "jaxft.train", "--config", str(ROOT / "configs/quickstart.py"),
                          "--workdir", str(tmp_path / "run"), flag.replace("{tmp}", str(tmp_path))],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("jaxft: error: "), out.stderr
    assert "Traceback" not in out.stderr
    assert re.search(problem, out.stderr) and re.search(remedy, out.stderr), out.stderr


# ----------------------------------------------------------------------------- config


def overridden(*settings, tmp=""):
    """The small quickstart config with `settings` applied, each 'section.key=<python literal>' ({tmp}: tmp)."""
    overrides = {}
    for setting in settings:
        key, value = setting.replace("{tmp}", str(tmp)).split("=", 1)
        overrides[key] = ast.literal_eval(value)
    return small_config(**overrides)


def validated(*settings):
    validate(overridden(*settings))


# ----------------------------------------------------------------------------- data


@functools.cache
def tokenizer():
    return load_tokenizer(QUICKSTART / "model")


def load_data(tmp, content, *settings):
    """Write `content` (None: nothing) where data.train points (default {tmp}/train.jsonl), then load the data."""
    config = overridden("data.train='{tmp}/train.jsonl'", "data.eval=None", *settings, tmp=tmp)
    if content is not None:
        path = tmp / os.path.basename(config.data.train)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return data.load(config, tokenizer())


def load_chat(tmp, content, *settings):
    """`load_data` with a chat template: the quickstart tokenizer has none."""
    return load_data(tmp, content, f"data.chat_template={CHAT_TEMPLATE!r}", *settings)


# ----------------------------------------------------------------------------- model directories


def model_dir(tmp, *edits):
    """A copy of the quickstart model under tmp, with `edits` (functions of the directory) applied."""
    directory = tmp / "model"
    shutil.copytree(QUICKSTART / "model", directory)
    for edit in edits:
        edit(directory)
    return directory


def without(name):
    return lambda d: (d / name).unlink()


def with_file(name, content: bytes):
    return lambda d: (d / name).write_bytes(content)


def with_config(**changes):
    def edit(d):
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def _with_tensors(change):
    def edit(d):
        tensors = load_file(d / "model.safetensors")
        change(tensors)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return edit


def without_tensor(name):
    return _with_tensors(lambda tensors: tensors.pop(name))


def with_tensor(name, value):
    return _with_tensors(lambda tensors: tensors.update({name: np.asarray(value, np.float32)}))


SHARDS = json.dumps({"weight_map": {"model.embed_tokens.weight": "part-1.safetensors",
                                    "model.norm.weight": "part-2.safetensors"}}).encode()


class PickleCanary:
    """Unpickling this makes the directory `path`: evidence that a loader ran pickle on the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def load_pickle_only(tmp):
    """A checkpoint saved only as `pytorch_model.bin` (a pickle): refused, and never unpickled."""
    directory = model_dir(tmp, without("model.safetensors"))
    canary = tmp / "unpickled"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(PickleCanary(canary)))
    try:
        load_pretrained(directory)
    finally:
        assert not canary.exists(), "loading the model unpickled pytorch_model.bin"


def test_the_pickle_canary_would_notice_unpickling(tmp_path):
    pickle.loads(pickle.dumps(PickleCanary(tmp_path / "unpickled")))
    assert (tmp_path / "unpickled").is_dir()


# ----------------------------------------------------------------------------- adapters


def quickstart_model():
    """A fresh quickstart model (tenths of a second): a case that failed to refuse must not change another's."""
    return load_pretrained(QUICKSTART / "model")


def lora(config):
    """LoRA as `config` says on a fresh quickstart model."""
    return apply_lora(quickstart_model(), config, rngs=nnx.Rngs(0))


def lora_tensors(width=128, layers=3, rank=4):
    """PEFT-named rank-`rank` LoRA tensors for q_proj (128 -> 128 in the quickstart model) of `layers` layers."""
    tensors = {}
    for i in range(layers):
        name = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{name}.lora_A.weight"] = np.zeros((rank, width), np.float32)
        tensors[f"{name}.lora_B.weight"] = np.zeros((width, rank), np.float32)
    return tensors


def load_adapter(tmp, tensors, raw=None, **changes):
    """Write a PEFT LoRA adapter (config entries `changes`, None removes one; `raw`: the config file's bytes;
    tensors a dict, raw bytes, or None for no tensor file), then load it onto the quickstart model."""
    directory = tmp / "adapter"
    directory.mkdir()
    config = {**lora_adapter_config(LoRAConfig(rank=4, targets="q_proj"), ["q_proj"], None), **changes}
    config = {k: v for k, v in config.items() if v is not None}
    (directory / "adapter_config.json").write_bytes(raw or json.dumps(config).encode())
    if isinstance(tensors, dict):
        save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    elif tensors is not None:
        (directory / "adapter_model.safetensors").write_bytes(tensors)
    return load_lora_adapter(quickstart_model(), directory)


def test_the_adapter_helper_writes_a_loadable_adapter(tmp_path):
    config, wrapped = load_adapter(tmp_path, lora_tensors())
    assert config.rank == 4 and len(wrapped) == 3


# ----------------------------------------------------------------------------- meshes and kernel blocks

MESH_222 = AbstractMesh((2, 2, 2), sharding.MESH_AXES)


def mesh(*settings):
    """config.mesh with `settings` ('data=2', ...) over the defaults (data=1, fsdp=-1, tensor=1)."""
    return overridden(*(f"mesh.{s}" for s in settings)).mesh


def kernel_shapes(blocks, platform, size=256, interpret=True):
    """Trace the Pallas LoRA matmul for `platform` on abstract [64, size] x [size, size] operands: no compute.
    `interpret=False`: as compiled for `platform` (the TPU form's VMEM budget is checked then)."""
    shapes = [((64, size), jnp.float32), ((size, size), jnp.float32), ((size, 16), jnp.float32),
              ((16, size), jnp.float32)]
    operands = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
    return jax.eval_shape(lambda x, w, a, b: lora_matmul(x, w, a, b, 2.0, kernel="pallas", blocks=blocks,
                                                         platform=platform, interpret=interpret), *operands)


# ----------------------------------------------------------------------------- workdirs


def run_in(workdir):
    """trainer.run of the small config in `workdir`."""
    return trainer.run(overridden("data.eval=None"), workdir)


def a_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


def read_only(path):
    if os.geteuid() == 0:
        pytest.skip("root writes through a directory's permissions; run as another user to check this case")
    path.mkdir()
    path.chmod(0o555)
    return path
