"""One of two processes joined with jax.distributed (environment set by the caller): trains a
long toy run until it is stopped; prints the stop line, or "finished"."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from instars_jax import parallel  # noqa: E402

parallel.initialize_distributed()

import jax  # noqa: E402
from configs import default  # noqa: E402
from instars_jax.run import checkpoints  # noqa: E402
from instars_jax.train import loop  # noqa: E402

if __name__ == "__main__":
  workdir = Path(sys.argv[1])
  config = default.get_config()
  config.dataset = f"npz:{workdir / 'toy.npz'}"
  config.train.update(epochs=500, batch_size=32, learning_rate=0.01)
  try:
    loop.train_and_evaluate(config, workdir / "run")
    print("finished", flush=True)
  except checkpoints.Interrupted as stopped:
    print(stopped, flush=True)
  jax.distributed.shutdown()
