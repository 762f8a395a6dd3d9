"""Throughput of the data pipeline on a synthetic 100k-row JSONL, and the input wait of a training run.

    python bench/data.py                  # 100k rows (a few minutes on 2 CPU cores)
    python bench/data.py --rows 10000     # a quicker look

Prints one JSON line per measurement:
- `encode`: jaxft's `data.load` from the JSONL (datasets read, cleaning with
  duplicate detection, tokenisation, loss masks, report), examples/s and tokens/s,
  beside the peer: a plain `datasets.load_dataset(...).map(tokenize, batched=True)`
  of the same prompt + completion text, no cleaning, no masks, no cache reuse;
- `cache`: the same load again, read from the workdir cache;
- `batches`: padded and packed batches built per second for the step;
- `stream`: the same rows through `data.streaming=True` (encode + shuffle buffer);
- `train`: a short LoRA run of the quickstart's tiny model on these rows, whose
  step is fast enough that a slow input would show: the mean input-wait fraction.

The tokenizer is the quickstart model's (a 1k-token BPE), so token counts are
higher per character than a production tokenizer's; examples/s is the figure
to compare.
"""

import argparse
import json
import pathlib
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "jaxft" / "assets" / "quickstart"
WORDS = ("river mountain lantern candle mirror meadow tower pebble harbour orchard falcon ember willow granite "
         "compass thistle beacon glacier saffron quarry").split()


def write_rows(path: pathlib.Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            prompt = f"### Instruction:\nList {rng.randint(2, 9)} words about " + " ".join(rng.choices(WORDS, k=8))
            completion = " ".join(rng.choices(WORDS, k=rng.randint(4, 40))) + f" ({i})"
            f.write(json.dumps({"prompt": prompt + "\n\n### Response:\n", "completion": completion}) + "\n")


def emit(**record):
    print(json.dumps(record), flush=True)


def config(train: pathlib.Path, **data):
    from jaxft.config import base_config
    c = base_config()
    c.model.path, c.data.train = str(QUICKSTART / "model"), str(train)
    c.train.steps, c.train.batch_size, c.train.seq_len = 60, 16, 128
    for k, v in data.items():
        c.data[k] = v
    return c


def bench_encode(train, tokenizer, rows, cache_dir):
    from jaxft.data import load
    start = time.perf_counter()
    data = load(config(train), tokenizer, cache_dir=cache_dir)
    seconds = time.perf_counter() - start
    ex = data.train.examples
    emit(bench="data", measure="encode", side="jaxft", rows=rows, seconds=round(seconds, 2),
         examples_per_sec=round(len(ex) / seconds), tokens_per_sec=round(len(ex.tokens) / seconds))

    start = time.perf_counter()
    load(config(train), tokenizer, cache_dir=cache_dir)
    emit(bench="data", measure="cache", side="jaxft", rows=rows, seconds=round(time.perf_counter() - start, 2))
    return data


def bench_peer(train, tokenizer, rows):
    import datasets
    datasets.disable_progress_bars()
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(train), split="train")
    tokenize = lambda b: tokenizer([p + c for p, c in zip(b["prompt"], b["completion"])])  # noqa: E731
    out = ds.map(tokenize, batched=True, load_from_cache_file=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(x) for x in out["input_ids"])
    emit(bench="data", measure="encode", side="datasets.map", rows=rows, seconds=round(seconds, 2),
         examples_per_sec=round(len(out) / seconds), tokens_per_sec=round(tokens / seconds))


def bench_batches(data, rows):
    from jaxft.data.packing import pack, packed_batch
    train = data.train
    steps = 200
    start = time.perf_counter()
    for step in range(steps):
        train.batch(step)
    padded = steps / (time.perf_counter() - start)
    packed_rows = pack(train.examples.lengths, train.seq_len)
    start = time.perf_counter()
    for step in range(steps):
        chosen = packed_rows[step * 16 % len(packed_rows):][:16]
        packed_batch(train.examples, chosen, train.seq_len, train.pad_id, 16)
    packed = steps / (time.perf_counter() - start)
    emit(bench="data", measure="batches", side="jaxft", batch=16, seq_len=train.seq_len,
         padded_batches_per_sec=round(padded), packed_batches_per_sec=round(packed),
         packed_fill=round(float(train.examples.lengths.sum()) / (len(packed_rows) * train.seq_len), 4))


def bench_stream(train, tokenizer, rows):
    from jaxft.data import load
    stream = load(config(train, streaming=True), tokenizer).train
    start = time.perf_counter()
    n = sum(1 for _ in stream.examples(epoch=0))
    seconds = time.perf_counter() - start
    emit(bench="data", measure="stream", side="jaxft", rows=rows, seconds=round(seconds, 2),
         examples_per_sec=round(n / seconds))


def bench_train(train, workdir, steps):
    from jaxft import trainer
    c = config(train)
    c.train.steps, c.train.log_every_steps, c.train.progress_bar = steps, 10, False
    c.eval.every_steps, c.checkpoint.every_steps, c.checkpoint.async_save = 0, steps, False
    trainer.run(c, workdir, tune_host=True)  # as python -m jaxft.train runs
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "input_wait_fraction" in r][1:]  # the first window holds compilation
    emit(bench="data", measure="train", side="jaxft", steps=steps, batch=16, seq_len=128,
         input_wait_fraction=round(sum(r["input_wait_fraction"] for r in logged) / len(logged), 4),
         tokens_per_sec=round(sum(r["tokens_per_sec"] for r in logged) / len(logged)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--train-steps", type=int, default=60)
    a = p.parse_args(argv)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(QUICKSTART / "model"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        train, peer_copy = tmp / "train.jsonl", tmp / "peer" / "train.jsonl"
        write_rows(train, a.rows)
        peer_copy.parent.mkdir()
        peer_copy.write_bytes(train.read_bytes())  # its own path: datasets' Arrow cache is not shared
        bench_peer(peer_copy, tokenizer, a.rows)
        data = bench_encode(train, tokenizer, a.rows, tmp / "cache")
        bench_batches(data, a.rows)
        bench_stream(train, tokenizer, a.rows)
        bench_train(train, tmp / "run", a.train_steps)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
