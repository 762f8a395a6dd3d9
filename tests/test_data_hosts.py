"""Per-process batches on two real processes (jax.distributed, gloo): disjoint shards that cover the batch."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import QUICKSTART, ROOT

# Data layout -> (packing, streaming).
LAYOUTS = {"padded": (0, 0), "packed": (1, 0), "streamed": (0, 1), "streamed_packed": (1, 1)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """What each of the two processes saw, per layout: one pair of processes reads every layout in turn."""
    tmp_path = tmp_path_factory.mktemp("data_hosts")
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()[:64]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n")
    port = _free_port()
    env = dict(os.environ, QUICKSTART_MODEL=str(QUICKSTART / "model"), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "data_host_worker.py"), str(port), str(i),
                               str(train), str(tmp_path / f"p{i}.json"), json.dumps(LAYOUTS)], env=env, cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_processes_read_disjoint_shards_that_cover_the_global_batch(two_processes, layout):
    streaming = LAYOUTS[layout][1]
    records = [by_layout[layout] for by_layout in two_processes]
    assert all(r["devices"] == 4 and r["local_devices"] == 2 for r in records)
    for step in range(3):
        a, b = (r["steps"][step] for r in records)
        assert a["local_rows"] == b["local_rows"] == 4 and a["global_shape"][0] == 8
        if not streaming:
            assert not set(a["units"]) & set(b["units"])  # disjoint
        assert a["local_ids"] != b["local_ids"]  # different rows (a stream has no unit indices to compare)
        assert a["gathered_equals_full"] and b["gathered_equals_full"]  # together: the global batch
