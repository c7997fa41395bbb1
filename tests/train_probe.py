"""One short Insta-RS run on toy data, trained and certified, as a dict of parameters, σ table
and TSV rows, for comparison across device and host counts: `run(workdir)` in the test's
process, and as a script in a subprocess (N fake CPU devices), where it prints the JSON."""

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from configs import default  # noqa: E402
from instars_jax import certification  # noqa: E402
from instars_jax.storage import results  # noqa: E402
from instars_jax.train import loop  # noqa: E402
from helpers import write_npz  # noqa: E402


def run(workdir) -> dict | None:
  """The run's outcome (None on processes other than 0 of a multi-host run)."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  config = default.get_config()
  npz = workdir / "toy.npz"  # written once, before any process of a multi-host run starts
  if not npz.exists():
    write_npz(npz, n_train=64, n_test=16)
  config.dataset = f"npz:{npz}"
  config.train.update(epochs=2, batch_size=32, learning_rate=0.05, insta=True, stage1_epochs=1)
  config.train.table.update(samples=4, chunk=32)
  config.certify.update(n0=16, n=128, batch=64, instances=2, skip=2)
  state = loop.train_and_evaluate(config, workdir / "run")
  path = certification.certify_test_set(config, workdir / "run")
  if jax.process_index() != 0:
    return None
  table = results.read_results(path)
  return {
      "devices": jax.device_count(),
      "params": [np.asarray(p, np.float64).ravel().tolist()
                 for p in jax.tree_util.tree_leaves(state.params)],
      "sigma_table": np.asarray(state.sigma_table).tolist(),
      "rows": {k: v.tolist() for k, v in table.items() if k != "time"},
  }


if __name__ == "__main__":
  print(json.dumps(run(sys.argv[1])))
