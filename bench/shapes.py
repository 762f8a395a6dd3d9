"""What the benchmarks share (run from bench/: `from shapes import`): the Llama-shaped model every benchmark builds,
as command-line options, and fake CPU devices for the sharding benchmarks."""

import os


def add_model_args(parser, *, hidden=512, layers=4, heads=8, ffn=1408, vocab=8000):
    """--hidden, --layers, --heads, --ffn, --vocab with the calling benchmark's defaults."""
    for name, default in dict(hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab).items():
        parser.add_argument(f"--{name}", type=int, default=default)
    return parser


def fake_cpu_devices(count: int):
    """Start JAX on `count` fake CPU devices (before anything imports JAX) and return the jax module."""
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    assert jax.device_count() == count, "run in a fresh process: JAX started with another device count"
    return jax
