"""One process started by launch/local.sh in tests/test_launch.py: joins the others through the env
contract local.sh sets (the one jaxft's trainer reads), sums the process ids across processes with a
jitted reduction over a global array, and prints the result and its own argv.

    --fail-process I   process I exits with status 3 before joining (the others then wait on it)
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def main(argv):
    process_id, num_processes = int(os.environ["JAX_PROCESS_ID"]), int(os.environ["JAX_NUM_PROCESSES"])
    print(f"argv={json.dumps(argv)}", flush=True)
    if "--fail-process" in argv and int(argv[argv.index("--fail-process") + 1]) == process_id:
        print(f"process {process_id}: failing on purpose", file=sys.stderr)
        sys.exit(3)

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=num_processes, process_id=process_id)
    assert jax.process_count() == num_processes == 2, jax.process_count()
    assert jax.device_count() == 4, jax.devices()

    # Rows are processes, columns their local devices: process p holds row p (its id), replicated
    # over its own devices; the sum needs data from every process.
    devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
    mesh = Mesh(devices.reshape(num_processes, -1), ("process", "local"))
    ids = jax.make_array_from_process_local_data(
        NamedSharding(mesh, PartitionSpec("process")), np.array([process_id], np.int32), (num_processes,))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(ids)
    print(f"process {process_id}/{num_processes}: devices={jax.device_count()} "
          f"sum_of_process_ids={int(np.asarray(total.addressable_data(0)))}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
