"""One of several processes joined with jax.distributed (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID set by the caller): trains the train_probe run and certifies
it across hosts; process 0 prints the same JSON as train_probe."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from instars_jax import parallel  # noqa: E402

parallel.initialize_distributed()

import jax  # noqa: E402
import train_probe  # noqa: E402

if __name__ == "__main__":
  outcome = train_probe.run(sys.argv[1])
  if outcome is not None:
    print(json.dumps(outcome))
  jax.distributed.shutdown()
