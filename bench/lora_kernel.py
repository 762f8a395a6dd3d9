"""The fused LoRA Pallas kernel against XLA's unfused `x W + s (x A) B`, forward + backward.

    python bench/lora_kernel.py                      # training shapes and decode shapes, bf16
    python bench/lora_kernel.py --shapes 8192,4096,4096,16 --iters 50 --passes train
    python bench/lora_kernel.py --sweep              # the device's candidate blocks; the best per shape

Imports only jax, numpy and jaxft/kernels/lora_matmul.py (loaded by path), so it runs on
a machine that has JAX and nothing else: copy the repo, run it. Each shape is timed as a
forward pass (what decoding runs) and as a training step (value and gradients in x, A, B):
warm-up calls, then `--iters` timed calls of the jitted function, each ended by
`block_until_ready`; medians. The roofline column is the lower bound
max(flops / peak flops, bytes / bandwidth) for the fused step on the device, where its peak
figures are known (bf16 dense; see PEAKS). On CPU the kernel runs interpreted: the figures
say nothing about speed there, so the script asks for --allow-cpu.
"""

import argparse
import importlib.util
import itertools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_PATH = pathlib.Path(__file__).resolve().parents[1] / "jaxft" / "kernels" / "lora_matmul.py"
_spec = importlib.util.spec_from_file_location("lora_matmul", _PATH)
lora_kernel = sys.modules["lora_matmul"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lora_kernel)

# Device kind (substring, lower case) -> (bf16 dense FLOP/s, HBM bytes/s), from the vendors' data sheets.
PEAKS = {
    "h100": (989e12, 3.35e12),
    "h200": (989e12, 4.8e12),
    "a100": (312e12, 2.0e12),
    "v5 lite": (197e12, 819e9),
    "v5e": (197e12, 819e9),
    "v5p": (459e12, 2.76e12),
    "v6": (918e12, 1.64e12),
}

TRAINING = [(8192, 2048, 2048, 16), (8192, 4096, 4096, 16)]
DECODE = [(m, 4096, 4096, 16) for m in (1, 8, 16, 64)]


def step_fn(kernel: str, scale: float, blocks, train: bool):
    """The jitted forward (decode, inference) or forward + backward (value and gradients in x, A, B)."""
    def forward(x, w, a, b):
        return lora_kernel.lora_matmul(x, w, a, b, scale, kernel=kernel, blocks=blocks)

    if not train:
        return jax.jit(forward)
    loss = lambda x, w, a, b: jnp.sum(forward(x, w, a, b).astype(jnp.float32))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3)))


def time_step(fn, args, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def roofline_seconds(m, k, n, r, itemsize, device, train: bool) -> float | None:
    """Lower bound of one fused forward (+ backward) on `device`, or None where its peaks are unknown."""
    kind = device.device_kind.lower()
    peak = next((v for key, v in PEAKS.items() if key in kind), None)
    if peak is None:
        return None
    low_rank = 2 * m * r * (k + n)  # x A and (x A) B forward; backward twice that: dy B^T, g A^T, dA, dB
    flops = 2 * m * k * n + low_rank if not train else 2 * (2 * m * k * n) + 3 * low_rank
    # Forward: read x and W, write y. Backward: read dy (once: dB is summed in the kernel), W, and x (for
    # dA), write dx. A, B, x A and g are r wide: small.
    bytes_moved = itemsize * (m * k + k * n + m * n) if not train else itemsize * (3 * m * k + 2 * k * n + 2 * m * n)
    return max(flops / peak[0], bytes_moved / peak[1])


# Block candidates for --sweep: (m, n, k[, warps, stages]). GPU: Triton matmul's usual tiles, and thin
# row blocks with narrow columns for decode (more programs when M is 1-64). TPU: multiples of 128.
SWEEP = {
    "gpu": ["128,128,64,4,3", "128,128,32,4,4", "64,128,64,4,3", "128,64,64,4,3", "64,64,64,4,3",
            "128,256,64,8,3", "256,128,64,8,3", "16,64,128,4,3", "16,128,128,4,3", "16,32,256,4,4"],
    "tpu": ["128,128,128", "256,256,256", "256,512,512", "512,512,512", "128,512,1024", "8,512,1024",
            "512,1024,512"],
}


def parse_blocks(text: str):
    return lora_kernel.Blocks(*map(int, text.split(",")))


def measure(shape, step, blocks_list, a, device):
    """One JSON line per block candidate (XLA timed once), then, for several candidates, the best."""
    m, k, n, r = shape
    dtype = jnp.dtype(a.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    w = (jax.random.normal(keys[1], (k, n)) / np.sqrt(k)).astype(dtype)
    args = (jax.random.normal(keys[0], (m, k), dtype), w, jax.random.normal(keys[2], (k, r)) / np.sqrt(k),
            jax.random.normal(keys[3], (r, n)))
    train = step == "train"
    xla = time_step(step_fn("xla", 2.0, lora_kernel.Blocks(), train), args, a.warmup, a.iters)
    bound = roofline_seconds(m, k, n, r, dtype.itemsize, device, train)
    common = dict(bench="lora_kernel", device=device.device_kind, jax=jax.__version__, dtype=a.dtype, step=step,
                  shape=dict(m=m, k=k, n=n, r=r), xla_ms=round(1e3 * xla, 4),
                  roofline_ms=None if bound is None else round(1e3 * bound, 4))
    results = []
    for text in blocks_list:
        try:
            fused = time_step(step_fn("pallas", 2.0, parse_blocks(text), train), args, a.warmup, a.iters)
        except Exception as e:  # a candidate the backend cannot compile (shared memory, VMEM): say so, go on
            print(json.dumps(dict(common, blocks=text, error=f"{type(e).__name__}: {str(e)[:300]}")), flush=True)
            continue
        record = dict(common, blocks=text, pallas_ms=round(1e3 * fused, 4), speedup=round(xla / fused, 3),
                      pallas_over_roofline=None if bound is None else round(fused / bound, 2))
        results.append(record)
        print(json.dumps(record), flush=True)
    if len(blocks_list) > 1 and results:
        print(json.dumps(dict(max(results, key=lambda rec: rec["speedup"]), best_of=len(blocks_list))), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", help="M,K,N,r[;M,K,N,r...] (default: the training and decode shapes)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--block", default="128,128,128", help="m,n,k[,warps,stages][;...]: the kernel's Blocks, "
                   "several separated by ';' (warps and stages: GPU only)")
    p.add_argument("--sweep", action="store_true", help="time the device's candidate blocks (SWEEP) and report "
                   "the best for each shape and pass")
    p.add_argument("--passes", default="forward,train", help="forward (decode, inference) and/or train "
                   "(forward + backward)")
    p.add_argument("--allow-cpu", action="store_true")
    a = p.parse_args(argv)
    device = jax.devices()[0]
    if device.platform == "cpu" and not a.allow_cpu:
        p.error("no accelerator: on CPU the kernel is interpreted and its timing means nothing (--allow-cpu)")
    shapes = ([tuple(map(int, s.split(","))) for s in a.shapes.split(";")] if a.shapes else TRAINING + DECODE)
    blocks_list = SWEEP["tpu" if device.platform == "tpu" else "gpu"] if a.sweep else a.block.split(";")
    for shape, step in itertools.product(shapes, a.passes.split(",")):
        measure(shape, step, blocks_list, a, device)


if __name__ == "__main__":
    sys.exit(main())
