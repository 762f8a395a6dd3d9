"""One process of the two-process data test (tests/test_data_hosts.py): for each data layout it is given, builds
its slices of the global batches, joins them with make_array_from_process_local_data, and writes what it saw as
JSON. One pair of processes serves every layout: starting them (imports, jax.distributed) costs more than the
layouts themselves.

    python tests/data_host_worker.py PORT PROCESS_ID TRAIN_FILE OUT LAYOUTS_JSON

LAYOUTS_JSON: {"name": [packing, streaming], ...}; OUT gets {"name": record, ...}.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
from jax.experimental import multihost_utils  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from jaxft import sharding  # noqa: E402
from jaxft.config import base_config  # noqa: E402
from jaxft.data import load, to_global  # noqa: E402


def layout_record(tokenizer, rows, train_file, packing: bool, streaming: bool) -> dict:
    c = base_config()
    c.model.path, c.data.train, c.data.packing = os.environ["QUICKSTART_MODEL"], train_file, packing
    c.data.streaming, c.data.shuffle_buffer = streaming, 16
    c.train.steps, c.train.batch_size, c.train.seq_len = 3, 8, 64
    data = load(c, tokenizer)
    part = sharding.process_rows(rows, 8)
    if c.data.streaming:  # a stream has no index order: each process reads it all and keeps its rows
        local_batches = [batch for _, batch, _ in data.train.batches(0, 3, part)]
        full_batches = [batch for _, batch, _ in data.train.batches(0, 3)]
    else:
        local_batches = [data.train.batch(step, part) for step in range(3)]
        full_batches = [data.train.batch(step) for step in range(3)]
    record = dict(devices=jax.device_count(), local_devices=jax.local_device_count(), steps=[])
    for step, (local, full) in enumerate(zip(local_batches, full_batches, strict=True)):
        global_batch = to_global(local, rows, 8)
        gathered = multihost_utils.process_allgather(global_batch, tiled=True)
        record["steps"].append(dict(
            units=None if c.data.streaming else data.train.order.indices(step)[part].tolist(),
            local_ids=np.asarray(local["input_ids"]).tolist(),
            global_shape=list(global_batch["input_ids"].shape),
            gathered_equals_full=all(np.array_equal(gathered[k], full[k]) for k in full),
            local_rows=int(local["input_ids"].shape[0])))
    return record


def main(port, process_id, train_file, out, layouts_json):
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
    tokenizer = AutoTokenizer.from_pretrained(os.environ["QUICKSTART_MODEL"])
    rows = sharding.batch_sharding(jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1, 1), sharding.MESH_AXES))
    records = {}
    for name, (packing, streaming) in json.loads(layouts_json).items():
        print(f"data_host_worker: process {process_id}, layout {name} (packing={packing}, streaming={streaming})",
              file=sys.stderr, flush=True)  # a traceback after this line is this layout's
        records[name] = layout_record(tokenizer, rows, train_file, bool(packing), bool(streaming))
    with open(out, "w") as f:
        json.dump(records, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
