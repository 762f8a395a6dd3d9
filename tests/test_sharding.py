"""Sharded training (jaxft/sharding.py): the mesh and its errors, the rules, and training on 8 fake CPU
devices and on two processes that gives what one device gives."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec
from ml_collections import ConfigDict
from safetensors.numpy import load_file

from jaxft import checkpoint as ckpt_lib
from jaxft import sharding, trainer
from jaxft.config import validate
from jaxft.errors import ConfigError
from tests.conftest import ROOT
from tests.test_trainer import small_config

# The in-process runs compile through the session's compilation cache (tests/conftest.py); the 8-device worker
# does not: test_no_layout_makes_xla_replicate_a_tensor reads what XLA says while compiling.
pytestmark = pytest.mark.usefixtures("xla_cache")

# ----------------------------------------------------------------------------- mesh and rules


def _mesh_cfg(data=1, fsdp=-1, tensor=1, dcn_data=1):
    return ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, dcn_data=dcn_data))


@pytest.mark.parametrize("cfg,devices,shape", [
    (_mesh_cfg(), 8, (1, 8, 1)),
    (_mesh_cfg(data=-1, fsdp=2, tensor=2), 8, (2, 2, 2)),
    (_mesh_cfg(data=2, fsdp=2, tensor=2), 8, (2, 2, 2)),
    (_mesh_cfg(fsdp=1, tensor=-1), 4, (1, 1, 4)),
    (_mesh_cfg(data=1, fsdp=2, tensor=1, dcn_data=4), 8, (4, 2, 1)),  # 4 slices of 2 devices
    (_mesh_cfg(), 1, (1, 1, 1)),
])
def test_mesh_shape_fills_the_devices(cfg, devices, shape):
    assert sharding.mesh_shape(cfg, devices) == shape


@pytest.mark.parametrize("cfg,devices,fragment", [
    (_mesh_cfg(data=2, fsdp=2, tensor=1), 8, "data=2 x fsdp=2 x tensor=1 does not fit the 8 devices: their product"),
    (_mesh_cfg(data=3, fsdp=-1), 8, "3 does not divide 8"),
    (_mesh_cfg(data=-1, fsdp=-1), 8, "more than one mesh size is -1"),
    (_mesh_cfg(tensor=0), 8, "mesh.tensor=0"),
    (_mesh_cfg(dcn_data=3), 8, "mesh.dcn_data=3 must be a positive divisor of the 8 devices"),
])
def test_a_mesh_that_does_not_fit_is_a_config_error(cfg, devices, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        sharding.mesh_shape(cfg, devices)


def test_config_refuses_bad_mesh_sizes():
    c = small_config(**{"mesh.fsdp": -2})
    with pytest.raises(ConfigError, match=r"mesh.fsdp=-2 must be a positive size or -1"):
        validate(c)


MESH_222 = AbstractMesh((2, 2, 2), sharding.MESH_AXES)


@pytest.mark.parametrize("axes,shape,mesh_shape,spec", [
    (("embed", "mlp"), (128, 352), (2, 2, 2), PartitionSpec("fsdp", "tensor")),
    (("vocab", "embed"), (1024, 128), (2, 2, 2), PartitionSpec("tensor", "fsdp")),
    (("embed", "mlp"), (128, 352), (1, 8, 1), PartitionSpec("fsdp", None)),
    ((None, "mlp"), (8, 352), (1, 8, 1), PartitionSpec(None, "fsdp")),  # LoRA B: no width dim, FSDP takes out
    ((None, "mlp"), (8, 352), (2, 2, 2), PartitionSpec(None, ("tensor", "fsdp"))),
    (("mlp", "embed"), (352, 128), (1, 4, 2), PartitionSpec("tensor", "fsdp")),  # first choices first
    (("embed", "mlp"), (128, 351), (1, 4, 2), PartitionSpec("fsdp", None)),  # 351 does not split in 2: whole
    (("embed", "kv_heads"), (128, 64), (1, 4, 2), PartitionSpec("fsdp", "tensor")),
    (("norm",), (128,), (1, 8, 1), PartitionSpec(None)),
    (("embed", None), (128, 8), (8, 1, 1), PartitionSpec(None, None)),  # no fsdp axis: replicated
    (("batch", "length", "act_embed"), (8, 64, 128), (2, 2, 2), PartitionSpec(("data", "fsdp"), None, None)),
    (("batch",), (6,), (2, 2, 2), PartitionSpec("data")),  # 6 rows split 2 ways, not 4
    (("embed", "embed"), (64, 64), (1, 8, 1), PartitionSpec("fsdp", None)),  # a mesh axis is used once
    (None, (3, 3), (2, 2, 2), PartitionSpec()),
])
def test_rules_map_logical_axes_to_mesh_axes(axes, shape, mesh_shape, spec):
    mesh = AbstractMesh(mesh_shape, sharding.MESH_AXES)
    assert sharding.spec_for(axes, shape, mesh) == spec


def test_a_batch_that_does_not_split_over_the_batch_axes_is_refused():
    with pytest.raises(ConfigError, match=r"train.batch_size=12 \(micro-batches of 6 rows with "
                                          r"optim.grad_accum_steps=2\) does not split .* 2 x 2 = 4 ways"):
        sharding.check_batch(12, 2, MESH_222)
    sharding.check_batch(16, 2, MESH_222)


def test_a_mesh_larger_than_the_devices_stops_the_run_before_training(tmp_path):
    with pytest.raises(ConfigError, match="does not fit the 1 devices"):
        trainer.run(small_config(**{"mesh.data": 2}), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------- 8 devices

STEPS = 3
# The runs in other processes compile with XLA's CPU optimisations off (as tests/test_attention.py's FAST_COMPILE):
# their numbers are under test, not their speed, and they compile in two thirds of the time. The SPMD partitioner,
# which lays the programs out over the devices (and warns where it cannot but replicate), runs all the same.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def fast_compile_env(**extra) -> dict:
    """The environment of a JAX subprocess that compiles with FAST_COMPILE_XLA_FLAGS."""
    return dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}".strip(), **extra)


def case_config(case: dict):
    """The small quickstart run every equivalence case trains: `case` picks the method and mesh.

    SGD with momentum, not Adam: Adam divides each gradient entry by its own magnitude, so an entry
    that is float noise (LoRA A's gradient, a sum with cancellation while B is near zero) becomes an
    update of up to lr whose value reduction order decides. With AdamW the losses still agree to
    1e-6 and the trained parameters to ~3e-5; SGD keeps the comparison about the sharded computation.
    """
    data, fsdp, tensor = case.get("mesh", (1, 1, 1))
    return small_config(**{"train.steps": STEPS, "train.batch_size": 8, "train.log_every_steps": 1,
                           "eval.every_steps": 0, "eval.max_batches": 1, "checkpoint.every_steps": STEPS,
                           "peft.method": case["method"], "peft.kernel": case.get("kernel", "auto"),
                           "peft.quant": "int8", "peft.quant_embeddings": case["method"] == "qlora",  # qlora cases
                           "optim.name": "sgd", "optim.momentum": 0.9,
                           "optim.lr": 0.05, "optim.weight_decay": 0.01,
                           "mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
                           "model.layer_loop": case.get("layer_loop", "auto")})


# On CPU the decoder blocks run unrolled by default ("auto"); two cases run them under a scan, as on TPU/GPU.
CASES = [dict(name=f"{method}_{'x'.join(map(str, mesh))}{'_scan' if loop == 'scan' else ''}", method=method,
              mesh=mesh, layer_loop=loop)
         for method, mesh, loop in [("lora", (8, 1, 1), "auto"), ("lora", (1, 8, 1), "auto"),
                                    ("lora", (2, 2, 2), "auto"), ("lora", (1, 4, 2), "scan"),
                                    ("full", (1, 8, 1), "auto"), ("full", (2, 2, 2), "scan")]]
# The fused Pallas kernel (interpreted) through shard_map: column- and row-parallel layers on 'tensor',
# over a float base and over an int8 one (dequantised in the kernel).
CASES += [dict(name="lora_pallas_1x4x2", method="lora", mesh=(1, 4, 2), kernel="pallas"),
          dict(name="qlora_pallas_2x2x2", method="qlora", mesh=(2, 2, 2), kernel="pallas")]


def _losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return np.array([r["loss"] for r in records if "loss" in r] + [r["eval_loss"] for r in records
                                                                  if "eval_loss" in r])


def _trained(workdir, method):
    name = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    return load_file(str(workdir / "export" / name))


def _relative_error(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """The sharded runs, in a process with 8 fake devices, and the 1-device runs, in this process, that every
    sharded run must match (OUT/reference_<method>). The worker starts first, so the two run side by side."""
    root = tmp_path_factory.mktemp("sharded")
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_XLA_FLAGS}",
               JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # every program compiled, so that XLA says what it does
    with open(root / "worker.out", "w") as out, open(root / "worker.err", "w") as err:
        worker = subprocess.Popen([sys.executable, "-m", "tests.sharding_worker", str(root), json.dumps(CASES)],
                                  cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
    try:
        for method in ("lora", "full", "qlora"):
            trainer.run(case_config(dict(method=method)), root / f"reference_{method}")
        returncode = worker.wait(timeout=900)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    stdout, stderr = (root / "worker.out").read_text(), (root / "worker.err").read_text()
    assert returncode == 0, stderr[-4000:]
    report = json.loads(stdout.split("REPORT ", 1)[1])
    report["resharding_warnings"] = [line for line in stderr.splitlines() if "rematerialization" in line]
    return root, report


@pytest.mark.slow
def test_no_layout_makes_xla_replicate_a_tensor(eight_devices):
    """XLA warns "Involuntary full rematerialization" where it cannot go from one layout to the next and
    replicates the whole tensor instead; the embedding lookups (float, and int8 with quant_embeddings in
    the qlora case) are laid out in steps so that it never has to."""
    _, report = eight_devices
    assert report["resharding_warnings"] == [], "\n".join(report["resharding_warnings"][:2])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_sharded_training_matches_one_device(eight_devices, case):
    root, _ = eight_devices
    reference = root / f"reference_{case['method']}"
    assert _relative_error(_losses(root / case["name"]), _losses(reference)) <= 1e-5
    ours, theirs = _trained(root / case["name"], case["method"]), _trained(reference, case["method"])
    assert ours.keys() == theirs.keys()
    errors = {k: _relative_error(ours[k], theirs[k]) for k in ours}
    assert max(errors.values()) <= 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]


def _expected_spec(axes, mesh):
    """The spec for logical `axes` on a (data, fsdp, tensor) mesh where every dimension divides, written
    out by hand: width over fsdp, MLP width and vocabulary over tensor, and an MLP dimension of an array
    with no width dimension (LoRA B) over fsdp as well."""
    data, fsdp, tensor = mesh
    rule = {"embed": ["fsdp"] if fsdp > 1 else [], "mlp": ["tensor"] if tensor > 1 else [],
            "vocab": ["tensor"] if tensor > 1 else [], None: []}
    if "embed" not in axes and fsdp > 1:
        rule["mlp"] = rule["mlp"] + ["fsdp"]
    return [rule[a][0] if len(rule[a]) == 1 else rule[a] or None for a in axes]


def _stacked(spec_and_shape, layers):
    """The layout of a decoder-block parameter stacked over `layers` layers: the layer axis whole on every
    device (jaxft/models/stack.py), the rest as one layer's would be."""
    spec, shape = spec_and_shape
    return [[None] + spec, [layers] + shape]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_parameters_and_optimizer_state_are_sharded_by_the_rules(eight_devices, case):
    _, report = eight_devices
    got, mesh = report["cases"][case["name"]], case["mesh"]
    n_fsdp, n_tensor = mesh[1], mesh[2]
    # Group 0 of the decoder blocks: all 3 layers of the quickstart model scanned, layer 0 alone unrolled
    # (the CPU default, one group per layer); straight from the file, all 3.
    stacked = functools.partial(_stacked, layers=3 if case.get("layer_loop") == "scan" else 1)
    if case["method"] == "qlora":  # the int8 codes are laid out as the float kernel would be
        codes = "model.layers.0.mlp.gate_proj.base_layer.codes"
        assert got["frozen"][codes] == stacked([_expected_spec(("embed", "mlp"), mesh),
                                                 [128 // n_fsdp, 352 // n_tensor]])
        return
    if case["method"] == "lora":  # A follows the base kernel's input axis, B its output axis
        a, b, kernel = ("model.layers.0.mlp.gate_proj." + s for s in ("lora_a", "lora_b", "base_layer.kernel"))
        assert got["params"][a] == stacked([_expected_spec(("embed", None), mesh), [128 // n_fsdp, 8]])
        assert got["params"][b] == stacked([_expected_spec((None, "mlp"), mesh), [8, 352 // n_tensor // n_fsdp]])
        assert got["frozen"][kernel] == stacked([_expected_spec(("embed", "mlp"), mesh),
                                                  [128 // n_fsdp, 352 // n_tensor]])
        trained = [a, b]
    else:
        kernel, table = "model.layers.0.mlp.gate_proj.kernel", "model.embed_tokens.embedding"
        assert got["params"][kernel] == stacked([_expected_spec(("embed", "mlp"), mesh),
                                                  [128 // n_fsdp, 352 // n_tensor]])
        assert got["params"][table] == [_expected_spec(("vocab", "embed"), mesh), [1024 // n_tensor, 128 // n_fsdp]]
        assert got["frozen"] == {}
        trained = [kernel, table]
    # Straight from the file each weight is already in its shards: no device held the whole model.
    assert got["loaded"]["model.layers.0.mlp.gate_proj.kernel"] == _stacked([_expected_spec(("embed", "mlp"), mesh),
                                                                             [128 // n_fsdp, 352 // n_tensor]], 3)
    for name in trained:  # the momentum lives where its parameter lives
        moments = [v for k, v in got["opt_state"].items() if k.endswith(name)]
        assert len(moments) == 1 and moments[0] == got["params"][name], (name, moments)


@pytest.mark.slow
def test_a_checkpoint_restores_on_other_meshes_and_one_device(eight_devices):
    root, report = eight_devices
    saved_on = CASES[0]["name"]  # (8, 1, 1)
    for case in CASES:
        if case["method"] != "lora":
            continue
        restored = report["restores"][case["name"]]
        assert restored["same_values"] and restored["step"] == STEPS
        if case.get("layer_loop") == CASES[0]["layer_loop"]:  # restored with the saving run's layer grouping
            assert restored["params"] == report["cases"][case["name"]]["params"]  # laid out for the new mesh
    # And on this process's single device, against the run's own export.
    config = case_config(dict(method="lora"))
    source = ckpt_lib.Checkpointer(root / saved_on, every_steps=1, keep=1, async_save=False)
    from tests.sharding_worker import init_state
    like, _ = init_state(config)
    state, _ = source.restore(source.latest_step(), like, ckpt_lib.fingerprint(like["params"]))
    source.close()
    exported = _trained(root / saved_on, "lora")
    a = np.asarray(state["params"]["model"]["layers"][0]["mlp"]["gate_proj"]["lora_a"].get_value())[0]  # layer 0
    np.testing.assert_array_equal(a.T, exported["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"])


# ----------------------------------------------------------------------------- two processes


def _cli_flags(config) -> list[str]:
    """`--config.k=v` for every key where `config` differs from configs/quickstart.py's."""
    from configs import quickstart
    base, flags = quickstart.get_config(), []
    for section, values in config.items():
        if not hasattr(values, "items"):
            continue
        flags += [f"--config.{section}.{k}={v}" for k, v in values.items() if base[section][k] != v]
    return flags


def two_process_config():
    """The lora run the two-process tests train (here and in tests/test_preemption.py): 8 steps on 2 processes x 4
    devices, a (2, 2, 2) mesh whose data axis spans the processes as it would span the slices of a multi-slice job
    (mesh.dcn_data=2), per-process data rows."""
    config = case_config(dict(method="lora", mesh=(1, 2, 2)))
    config.mesh.dcn_data, config.train.steps, config.checkpoint.every_steps = 2, 8, 100
    return config


def two_processes(workdir, config, logs, env=None):
    """`python -m jaxft.train` as 2 processes x 4 CPU devices through launch/local.sh (which adds the device count to
    XLA_FLAGS)."""
    proc = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "2", "--devices-per-process", "4",
                           "--log-dir", str(logs), "--", "--config", str(ROOT / "configs" / "quickstart.py"),
                           "--workdir", str(workdir), *_cli_flags(config)],
                          cwd=ROOT, env=fast_compile_env(PYTHON=sys.executable, **(env or {})), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_as_one(two_process_lora, tmp_path):
    """2 processes x 4 devices (two_process_config, the run of tests/conftest.py's two_process_lora): the 1-device
    run's losses and adapter, generation across the processes in its evaluations; restored from its step-4
    checkpoint on this one device it continues as the 1-device run does. (Stopped by a signal and resumed on 2
    processes it continues bitwise as it went: tests/test_preemption.py.)"""
    import shutil
    straight, reference = two_process_lora.straight, two_process_lora.one_device
    evals = [r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r]
    assert evals and all("eval_exact_match" in r for r in evals)
    assert len((straight / "eval" / f"step_{evals[-1]['step']}.jsonl").read_text().splitlines()) == 1 + 8
    assert _relative_error(_losses(straight), _losses(reference)) <= 1e-5
    ours, theirs = _trained(straight, "lora"), _trained(reference, "lora")
    assert max(_relative_error(ours[k], theirs[k]) for k in theirs) <= 1e-5

    # The run as a kill after its step-4 checkpoint would have left it, saved on 8 devices in 2 processes,
    # restored on 1.
    one_device = tmp_path / "one_device"
    shutil.copytree(straight, one_device)
    shutil.rmtree(one_device / "export")
    assert sorted(int(p.name) for p in (one_device / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]
    shutil.rmtree(one_device / "checkpoints" / "8")
    config = two_process_lora.straight_config.copy_and_resolve_references()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.mesh.dcn_data = 1, -1, 1, 1
    trainer.run(config, one_device)
    restored = _trained(one_device, "lora")
    assert max(_relative_error(restored[k], theirs[k]) for k in theirs) <= 1e-5
