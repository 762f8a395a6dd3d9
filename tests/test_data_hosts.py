"""Per-process batches on two real processes (jax.distributed, gloo): disjoint shards that cover the batch."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import QUICKSTART, ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("packing,streaming", [("0", "0"), ("1", "0"), ("0", "1"), ("1", "1")],
                         ids=["padded", "packed", "streamed", "streamed_packed"])
def test_two_processes_read_disjoint_shards_that_cover_the_global_batch(tmp_path, packing, streaming):
    rows = (QUICKSTART / "train.jsonl").read_text().splitlines()[:64]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(rows) + "\n")
    port = _free_port()
    env = dict(os.environ, QUICKSTART_MODEL=str(QUICKSTART / "model"), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "data_host_worker.py"), str(port), str(i),
                               str(train), packing, streaming, str(tmp_path / f"p{i}.json")], env=env, cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    records = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert all(r["devices"] == 4 and r["local_devices"] == 2 for r in records)
    for step in range(3):
        a, b = (r["steps"][step] for r in records)
        assert a["local_rows"] == b["local_rows"] == 4 and a["global_shape"][0] == 8
        if streaming == "0":
            assert not set(a["units"]) & set(b["units"])  # disjoint
        assert a["local_ids"] != b["local_ids"]  # different rows (a stream has no unit indices to compare)
        assert a["gathered_equals_full"] and b["gathered_equals_full"]  # together: the global batch
