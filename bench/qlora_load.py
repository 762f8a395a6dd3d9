"""Peak host memory of loading a model for QLoRA: float then quantised, against quantised while loading.

    python bench/qlora_load.py                  # Llama-shaped, hidden 1024, 8 layers, vocab 32000 (~0.66 GB fp32)
    python bench/qlora_load.py --hidden 2048    # larger

Writes a random Llama-shaped HF checkpoint (float32 safetensors) to a temp dir, then
loads it in a fresh child process per way and reports the child's peak anonymous
resident memory (RssAnon, sampled every 2 ms) and that of a child that only imports jaxft and JAX, so the difference is
what the load itself costs. One JSON line per way, then the ratio.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

from shapes import add_model_args  # bench/shapes.py: python puts bench/ on the path

CHILD = """
import re, sys, threading, time
from jaxft.models.hf import load_pretrained
from jaxft.peft.quant import QuantSpec, quantize_model
import jax

# Peak anonymous memory, sampled: VmHWM and ru_maxrss would count the checkpoint's file pages,
# which safetensors maps and the OS can drop, and ru_maxrss carries the parent's peak over exec.
peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        anon = int(re.search(r"RssAnon:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
        peak[0] = max(peak[0], anon)
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
time.sleep(0.05)
way, path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if way == "float_then_quantise":
    model = load_pretrained(path)
    quantize_model(model, QuantSpec("nf4"))
elif way == "quantise_while_loading":
    model = load_pretrained(path, on_param=QuantSpec("nf4").on_param)
if way != "imports_only":
    jax.block_until_ready(jax.tree.leaves(model))
seconds = time.perf_counter() - start
time.sleep(0.05)
done.set()
print(peak[0], round(seconds, 2))
"""


def write_checkpoint(a, directory: pathlib.Path) -> int:
    """A random Llama-shaped model as HF config.json + model.safetensors; returns its bytes."""
    from flax import nnx
    from safetensors.numpy import save_file

    from jaxft.models import get_family, to_hf_state_dict
    hf_config = dict(model_type="llama", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                     num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                     max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    family = get_family("llama")
    model = family.model_cls(family.config_cls.from_hf(hf_config), rngs=nnx.Rngs(0))
    tensors = to_hf_state_dict(model)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config))
    return sum(t.nbytes for t in tensors.values())


def measure(way: str, directory: pathlib.Path) -> tuple[int, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, way, str(directory)], capture_output=True, text=True,
                         check=True)
    peak, seconds = out.stdout.split()
    return int(peak), float(seconds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p, hidden=1024, layers=8, heads=16, ffn=2816, vocab=32000)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        size = write_checkpoint(a, directory)
        base, _ = measure("imports_only", directory)
        results = {}
        for way in ("float_then_quantise", "quantise_while_loading"):
            peak, seconds = measure(way, directory)
            results[way] = peak - base
            print(json.dumps(dict(bench="qlora_load", way=way, checkpoint_bytes=size, peak_anon_bytes=peak,
                                  imports_only_anon_bytes=base, load_peak_bytes=peak - base, seconds=seconds)),
                  flush=True)
    print(json.dumps(dict(bench="qlora_load", while_loading_over_float_first=round(
        results["quantise_while_loading"] / results["float_then_quantise"], 3))))


if __name__ == "__main__":
    sys.exit(main())
