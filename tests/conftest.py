"""Shared test settings. Tests run on CPU; JAX is imported by the test modules after this."""

import contextlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jaxft" / "assets" / "quickstart"


# ----------------------------------------------------------------------------- shared fixtures
# Imports of jaxft and JAX stay inside the fixtures: this module is imported before the test modules.

@pytest.fixture(scope="session")
def xla_cache_dir(tmp_path_factory):
    """A persistent XLA compilation cache for this session: a program one run has compiled (>= 1 s of compilation)
    a later run loads instead of compiling it again, here or in a subprocess. `trainer.run` jits its steps afresh
    each time, so without it every run of the same config compiles the same programs again. Not for a test that
    reads what XLA says while it compiles (tests/test_sharding.py's 8-device worker): a program it loads says
    nothing."""
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="session")
def subprocess_xla_cache(xla_cache_dir):
    """Environment for JAX subprocesses that share the session's compilation cache."""
    return dict(JAX_COMPILATION_CACHE_DIR=str(xla_cache_dir))


@contextlib.contextmanager
def xla_cache_in_process(directory):
    """This process's JAX compiles through the persistent cache in `directory` while inside."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(directory))
    compilation_cache.reset_cache()  # the cache is set up on first use, from the setting then
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def xla_cache(xla_cache_dir):
    """Use the session's compilation cache in this process for the tests of a module (`pytestmark =
    pytest.mark.usefixtures("xla_cache")`)."""
    with xla_cache_in_process(xla_cache_dir):
        yield


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A JAXFT_CACHE for this session's tests of the real SmolLM2 GGUF: the first converts it (about a minute of
    CPU, tests/test_gguf.py), the others (notebooks/05_real_model.ipynb) reuse the copy."""
    return tmp_path_factory.mktemp("jaxft_cache")


@pytest.fixture(scope="session")
def two_process_lora(tmp_path_factory, xla_cache_dir, subprocess_xla_cache):
    """The lora run on 2 processes x 4 CPU devices through launch/local.sh (tests.test_sharding.two_process_config)
    straight through, and the same run on this process's one device, which the 2-process one must match.
    tests/test_sharding.py checks the straight run; tests/test_preemption.py stops one like it and resumes it.

    The straight run also checkpoints mid-run (step 4) and answers 8 eval questions (step 0 and the end):
    neither changes what it trains."""
    from types import SimpleNamespace

    from jaxft import trainer
    from tests.test_sharding import two_process_config, two_processes
    root = tmp_path_factory.mktemp("two_process_lora")
    config = two_process_config()
    straight = two_process_config()
    straight.checkpoint.every_steps = 4
    straight.eval.metrics, straight.eval.generate_rows = "exact_match", 8  # generation across the processes too
    two_processes(root / "straight", straight, root / "logs", subprocess_xla_cache)
    one_device = two_process_config()
    one_device.mesh.data, one_device.mesh.fsdp, one_device.mesh.tensor, one_device.mesh.dcn_data = 1, -1, 1, 1
    with xla_cache_in_process(xla_cache_dir):  # tests/test_sharding.py resumes it on one device
        trainer.run(one_device, root / "one_device")
    return SimpleNamespace(config=config, straight_config=straight, straight=root / "straight",
                           one_device=root / "one_device")
