"""What several test modules share: toy datasets, analytic classifiers, simulated kills,
results and metrics without their timings, TensorBoard values, and subprocess runs."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from configs import default
from instars_jax.smoothing import bounds
from instars_jax.storage import results
from instars_jax.selection.estimator import Estimator

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Data


def write_npz(path, n_train=60, n_test=20, shape=(28, 28), classes=3, seed=0):
  """A toy npz dataset: class c lights up its own band of rows over noise."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n,) + shape)
    for c in range(classes):  # class c lights up its own band of rows
      band = slice(c * shape[0] // classes, (c + 1) * shape[0] // classes)
      images[labels == c, band] += 180
    arrays[f"x_{split}"] = images.astype(np.uint8)
    arrays[f"y_{split}"] = labels.astype(np.int64)
  np.savez(path, **arrays)
  return path


def write_tree(root, classes=("cat", "dog", "emu"), per_class=4, size=(12, 10), mode="RGB",
               test_folder="test", suffix=".png", seed=0):
  """An ImageFolder tree of random images; returns {(split, class, i): pixels}."""
  rng = np.random.default_rng(seed)
  written = {}
  for split in ("train", test_folder):
    for name in classes:
      (root / split / name).mkdir(parents=True, exist_ok=True)
      for i in range(per_class):
        shape = size[::-1] + ((3,) if mode == "RGB" else ())
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{i:04d}{suffix}")
        written[(split, name, i)] = pixels
  return written


def make_toy_config(tmp_path, n_train=96, n_test=24):
  """A 2-epoch LeNet on a toy npz of 3 classes, certified cheaply (every 2nd test image)."""
  config = default.get_config()
  config.dataset = f"npz:{write_npz(tmp_path / 'toy.npz', n_train=n_train, n_test=n_test)}"
  config.model.name = "lenet"
  config.train.epochs = 2
  config.train.batch_size = 32
  config.train.learning_rate = 0.05
  config.certify.n0 = 16
  config.certify.n = 200
  config.certify.batch = 64
  config.certify.instances = 4
  config.certify.skip = 2
  return config


# ---------------------------------------------------------------------------
# Analytic classifiers


class LinearClassifier:
  """logits = [w·x + b, −(w·x + b)]: class 0 where w·x + b > 0.

  Under N(0, σ²I) noise, p_A = Φ(|w·x + b| / (σ‖w‖)), and the distance to the decision
  boundary is |w·x + b| / ‖w‖: the exact robust radius of the smoothed classifier.
  """

  def __init__(self, w, b):
    self.w = np.asarray(w, np.float32)
    self.b = float(b)

  def __call__(self, x):
    z = x.reshape(x.shape[0], -1) @ self.w + self.b
    return jnp.stack([z, -z], axis=-1)

  def distance(self, x):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return np.abs(x @ self.w + self.b) / np.linalg.norm(self.w)

  def points_at_distance(self, distances):
    """Points x with w·x + b = +distance·‖w‖ (so class 0, at that distance from the boundary)."""
    unit = self.w / np.linalg.norm(self.w)
    offset = -self.b / np.linalg.norm(self.w) * unit
    return (offset[None] + np.asarray(distances)[:, None] * unit[None]).astype(np.float32)


def x7_chain(*, scale, sigmas, n):
  """[node 2, node 1]: two binary nodes on the feature x_7 (unrelated to the `linear` fixture's
  f), logits (cut − x_7, x_7 − cut) · scale: node 2 (σ 1.0 against lower) with cut 0.5, node 1
  (0.5 against 0.25) with cut 0, smoothed at `sigmas` with n samples each. Under N(0, σ²I)
  noise node k's probability of bin 0 ("lower") is Φ((cut − x_7)/σ_k)."""
  feature = lambda cut: (lambda z: jnp.stack([cut - z[:, 7], z[:, 7] - cut], axis=-1) * scale)
  return [Estimator((0.5, 1.0), sigmas[0], fn=feature(0.5), n=n),
          Estimator((0.25, 0.5), sigmas[1], fn=feature(0.0), n=n)]


def x7_nodes(linear, seed, count, *, scale, sigmas, n):
  """(x, x7_chain): `count` inputs at random signed distances in ±1 from the linear f's
  hyperplane with x_7 uniform in ±1.5, and the chain on x_7."""
  rng = np.random.default_rng(seed)
  x = linear.points_at_distance(rng.uniform(-1.0, 1.0, count))
  x[:, 7] = rng.uniform(-1.5, 1.5, count)
  return x, x7_chain(scale=scale, sigmas=sigmas, n=n)


def recorded_bounds(monkeypatch) -> dict:
  """{"lower": [...], "upper": [...]}: (successes, trials, α) of every later call of
  bounds.clopper_pearson_lower and clopper_pearson_upper (an upper bound's own call of the
  lower one not counted), so that a test can pin the exact counts and level of each bound."""
  calls, inside_upper = {"lower": [], "upper": []}, [False]
  lower, upper = bounds.clopper_pearson_lower, bounds.clopper_pearson_upper

  def record_lower(successes, trials, alpha):
    if not inside_upper[0]:
      calls["lower"].append((np.array(successes), np.array(trials), alpha))
    return lower(successes, trials, alpha)

  def record_upper(successes, trials, alpha):
    calls["upper"].append((np.array(successes), np.array(trials), alpha))
    inside_upper[0] = True
    try:
      return upper(successes, trials, alpha)
    finally:
      inside_upper[0] = False
  monkeypatch.setattr(bounds, "clopper_pearson_lower", record_lower)
  monkeypatch.setattr(bounds, "clopper_pearson_upper", record_upper)
  return calls


# ---------------------------------------------------------------------------
# Kills, rows, metrics, events


class Killed(Exception):
  """Stands for the process dying at that point: whatever is on disk stays."""


@contextlib.contextmanager
def sigterm_during_step(monkeypatch, step: int, module, name: str = "train_step"):
  """Sends this process SIGTERM during `module`.`name`'s call number `step` (1-based) inside
  the block."""
  original, calls = getattr(module, name), [0]

  def step_then_sigterm(*args, **kwargs):
    calls[0] += 1
    if calls[0] == step:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  with monkeypatch.context() as m:
    m.setattr(module, name, step_then_sigterm)
    yield


def stop_after(module, name, calls, monkeypatch):
  """Makes module.name raise Killed on its call number `calls` (1-based)."""
  original, count = getattr(module, name), [0]
  def wrapper(*args, **kwargs):
    count[0] += 1
    if count[0] == calls:
      raise Killed
    return original(*args, **kwargs)
  monkeypatch.setattr(module, name, wrapper)


def rows_without_time(path):
  table = results.read_results(path)
  return {k: v.tolist() for k, v in table.items() if k != "time"}


def read_metrics(workdir):
  path = Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def metrics_without_timing(workdir):
  timing = ("images_per_s", "seconds", "input_wait_share", "table_update_seconds",
            "table_update_share_of_epoch")
  return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(workdir)]


def as_experts(config, workdir, root) -> str:
  """certify.experts (or train.estimator.experts) naming three copies of the trained toy run, each recorded as a fixed-σ
  model at its grid σ (same weights as the run itself)."""
  paths = []
  for sigma in config.train.table.grid:
    expert = root / f"expert_{sigma}"
    shutil.copytree(workdir, expert, ignore=shutil.ignore_patterns("certify", "estimator"))
    saved = json.loads((expert / "config.json").read_text())
    saved["train"].update(insta=False, sigma=sigma)
    (expert / "config.json").write_text(json.dumps(saved))
    paths.append(str(expert))
  return ",".join(paths)


def event_values(directory) -> dict:
  """{tag: [(step, value)]} of the TensorBoard event files in `directory` (TFRecord framing,
  Event protos from tensorboardX); histograms have value None."""
  from tensorboardX.proto import event_pb2
  values = {}
  for path in sorted(Path(directory).glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      length = int.from_bytes(data[offset: offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
      offset += 16 + length
      for value in event.summary.value:
        scalar = value.simple_value if value.WhichOneof("value") == "simple_value" else None
        values.setdefault(value.tag, []).append((event.step, scalar))
  return values


# ---------------------------------------------------------------------------
# Subprocesses


def cli_env(path=(), **extra) -> dict:
  """The environment of a subprocess: the CPU, this checkout on the path, and the folders
  `path` after it (outside plug-ins)."""
  return dict(os.environ, JAX_PLATFORMS="cpu",
              PYTHONPATH=os.pathsep.join(map(str, (ROOT, *path))), **extra)


def run_cli(*args, cwd=ROOT, timeout=300, path=()):
  """python ARGS in a subprocess, as a user runs it (with the folders `path` on its path)."""
  return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=cli_env(path),
                        capture_output=True, text=True, timeout=timeout)


def start_cli(*args, cwd=ROOT, **popen):
  return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=cli_env(), text=True,
                          **popen)


def children(pid: int) -> list:
  """Process ids whose parent is `pid` (Linux /proc)."""
  found = []
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue
    if parent == pid:
      found.append(int(stat.parent.name))
  return found


def alive(pid: int) -> bool:
  """Whether `pid` exists and is not a zombie."""
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return False


def prepared(kind, smoothed, config):
  """kind.prepare with `smoothed` carrying the kind's metadata (the checkpoints it loads), as
  certification gives it."""
  import dataclasses
  return kind.prepare(dataclasses.replace(smoothed, metadata=kind.metadata(
      config, smoothed.workdir)), config)
