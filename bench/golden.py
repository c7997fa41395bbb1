"""Golden outputs: fingerprints of everything a fixed-seed run writes, as one JSON.

    python bench/golden.py --workdir /tmp/golden > before.json   # ... change the code ...
    python bench/golden.py --workdir /tmp/golden2 > after.json && diff before.json after.json

Trains the demo's LeNet recipe (configs/fashion_mnist_demo.py: Insta-RS Train, σ-estimator,
plus one fine-tuning epoch) on a small synthetic npz through train.py, then certifies it
through certify.py with every certificate kind (the router and the thresholded chain on
router nodes trained by a second train.py) and both sequential modes. It goes through
the command line and the public API only (`ij.load_train_state`), so the same script
fingerprints the code before and after a refactor: SHA-256 of the parameters, the σ table and
profile, the estimator's parameters, the metrics rows and each results TSV (timings
dropped). Identical fingerprints mean identical numbers on this machine; XLA may round
differently on another CPU kind, so compare runs made on one machine.
"""

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import instars_jax as ij  # noqa: E402
from instars_jax import certificates  # noqa: E402

TIMING = ("images_per_s", "seconds", "input_wait_share", "table_update_seconds",
          "table_update_share_of_epoch")
INSTANCE = "--config.certify.sigma_mode=instance"
# Every kind of the registry, then both sequential modes at fixed σ.
KINDS = {
    "fixed": ["--config.certify.sigma_mode=fixed"],
    **{kind: [INSTANCE, f"--config.certify.certificate={kind}"]
       for kind in certificates.instance_kinds()},
    "radius": ["--config.certify.sampling=sequential", "--config.certify.n=4000",
               "--config.certify.name=radius"],
    "decision": ["--config.certify.sampling=sequential", "--config.certify.n=4000",
                 "--config.certify.radii=(0.25,0.5)", "--config.certify.name=decision"],
}


def synthetic_npz(path: Path, n_train: int = 1200, n_test: int = 100, classes: int = 10) -> Path:
  """28×28 uint8 images; class c brightens its own band of rows a little, over strong noise
  (hard enough that radii and abstentions vary from image to image)."""
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    labels = np.arange(n) % classes
    images = rng.integers(0, 160, size=(n, 28, 28))
    for c in range(classes):
      images[labels == c, 2 * c + 4: 2 * c + 8] += 60
    arrays[f"x_{split}"], arrays[f"y_{split}"] = images.astype(np.uint8), labels
  np.savez(path, **arrays)
  return path


def digest(*arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def tree_digest(tree) -> str:
  return digest(*jax.tree_util.tree_leaves(tree))


def run(script: str, flags: list) -> None:
  done = subprocess.run([sys.executable, str(ROOT / script), *flags], cwd=ROOT,
                        capture_output=True, text=True)
  if done.returncode:
    sys.exit(f"{script} failed: {done.stderr[-2000:]}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, type=Path)
  args = parser.parse_args()
  args.workdir.mkdir(parents=True, exist_ok=True)
  npz = synthetic_npz(args.workdir / "data.npz")
  run_dir = args.workdir / "run"
  # The demo recipe as it was when these fingerprints began (every training example, the σ
  # table's radii at n = 500, 2,000 test images evaluated: all 100 here).
  common = [f"--config={ROOT / 'configs' / 'fashion_mnist_demo.py'}", f"--workdir={run_dir}",
            f"--config.dataset=npz:{npz}", "--config.train.table.fraction=0.5",
            "--config.train.examples=0", "--config.train.table.n=500",
            "--config.train.finetune.epochs=1", "--config.certify.n=500",
            "--config.certify.skip=4", "--config.certify.batch=500",
            "--config.certify.instances=5", "--config.certify.estimator.n=500"]
  run("train.py", common)
  run("train.py", common + ["--config.train.estimator.router=True",  # the router's nodes
                            "--config.train.finetune.epochs=0"])
  record = {}
  state = ij.load_train_state(run_dir)
  record["params"] = tree_digest(state.params)
  record["batch_stats"] = tree_digest(state.batch_stats)
  record["sigma_table"] = digest(state.sigma_table)
  record["sigma_profile"] = digest(state.sigma_profile)
  estimator_dir = run_dir / "estimator" / "checkpoints"
  step = max(int(p.name) for p in estimator_dir.iterdir() if p.name.isdigit())
  restored = ocp.StandardCheckpointer().restore(estimator_dir / str(step) / "default")
  record["estimator_params"] = tree_digest(restored["params"])
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  record["metrics"] = digest(np.frombuffer(json.dumps(
      [{k: v for k, v in r.items() if k not in TIMING} for r in rows]).encode(), np.uint8))
  for kind, flags in KINDS.items():  # the run's own settings, certify.* included, from its workdir
    run("certify.py", [f"--workdir={run_dir}", *flags])
  for tsv in sorted((run_dir / "certify").glob("*.tsv")):
    lines = [line.split("\t") for line in tsv.read_text().splitlines()]
    keep = [i for i, name in enumerate(lines[0]) if name != "time"]
    text = "\n".join("\t".join(line[i] for i in keep) for line in lines)
    record[f"tsv:{tsv.name}"] = digest(np.frombuffer(text.encode(), np.uint8))
  record["machine"] = next((line.split(":")[1].strip() for line in
                            Path("/proc/cpuinfo").read_text().splitlines()
                            if line.startswith("model name")), "unknown")
  print(json.dumps(record, indent=2, sort_keys=True))


if __name__ == "__main__":
  main()
