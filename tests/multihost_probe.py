"""One of two processes joined with jax.distributed (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID set by the caller), each with the local devices XLA_FLAGS
gives it. Process 0 prints, as JSON lines, device_probe's results on its local devices, then
the train_probe run trained and certified across both hosts; then both train a long toy run
until it is stopped, and print the stop line (or "finished"). In between, process 0 prints
whether a stage's stop check, asked of process 1 only, stopped it too."""

import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from instars_jax import parallel  # noqa: E402

parallel.initialize_distributed()

import device_probe  # noqa: E402
import jax  # noqa: E402
import train_probe  # noqa: E402
from configs import default  # noqa: E402
from instars_jax.storage import checkpoints  # noqa: E402
from instars_jax.train import loop, stages  # noqa: E402

if __name__ == "__main__":
  workdir = Path(sys.argv[1])
  local = device_probe.results()
  if jax.process_index() == 0:
    print(json.dumps({"sampler": local}), flush=True)
  outcome = train_probe.run(workdir)
  if outcome is not None:
    print(json.dumps(outcome), flush=True)
  # A stop asked of process 1 only, between a stage's own units: both stop there.
  stop = checkpoints.StopRequest()
  stop.requested = jax.process_index() == 1
  try:
    stages.Context.check_stop(types.SimpleNamespace(stop=stop), "the probe's next unit")
    stage_stop = "went on"
  except checkpoints.Interrupted:
    stage_stop = "stopped"
  if jax.process_index() == 0:
    print(json.dumps({"stage_stop": stage_stop}), flush=True)
  config = default.get_config()
  config.dataset = f"npz:{workdir / 'toy.npz'}"
  config.train.update(epochs=500, batch_size=32, learning_rate=0.01)
  try:
    loop.train_and_evaluate(config, workdir / "long")
    print("finished", flush=True)
  except checkpoints.Interrupted as stopped:
    print(stopped, flush=True)
  parallel.shutdown_distributed()
