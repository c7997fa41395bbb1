"""A run's directory, owned in one place: its paths, its two JSON files, its checkpoint
managers, its locks, and whether a config may resume it.

  config.json              the run's config
  run.json                 TrainingFacts: what the train state's shapes depend on
  checkpoints/<step>/      orbax, by global step: the latest and every epoch end of the base
                           model and its fine-tuning (storage/checkpoints.py)
  estimator/               the σ-estimator: checkpoints/, estimator.json, profile.npz
  router/node_<k>/         the router tree's nodes (estimator.router)
  certify/<name>.tsv       results, each with a .json sidecar (storage/results.py)
  metrics.jsonl, tensorboard/, train.lock
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections

from instars_jax.storage import checkpoints, locks
from instars_jax.storage.files import write_json_atomic

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
ESTIMATOR_DIR = "estimator"
ROUTER_DIR = "router"
METRICS_FILE = "metrics.jsonl"
# Config keys added after runs were made, with the value that means what those runs did
# (a run that never diverged trained the same under the divergence watch).
LATER_KEYS = {"image_size": 0, "corrupt_images": "fail", "train.checkpoint_every_steps": 0,
              "train.divergence.nonfinite": True, "train.divergence.chance_steps": 200,
              "train.divergence.chance_fraction": 0.98, "train.table.explore": 0.0,
              "train.holdout": 0.0, "train.examples": 0, "sources.tfds.train_split": "train",
              "sources.tfds.test_split": ""}
# Keys that moved, new name: old name. A run saved before the move used the old key's value.
MOVED_KEYS = {"train.table.n": "certify.n", "train.table.alpha": "certify.alpha"}
# Sections a run may resume with changed: certification, the estimator (which checks its own
# settings, so a finished run can get one) and the input settings (they never change batches).
RESUMABLE_SECTIONS = ("certify", "estimator", "input")


@dataclasses.dataclass(frozen=True)
class TrainingFacts:
  """run.json: what the shapes of a run's train state depend on, and where it came from."""
  image_shape: tuple
  num_classes: int
  stats: object  # its Normalize layer's: a models.DATASET_STATS name or a (mean, std) pair
  num_train: int
  steps_per_epoch: int
  dataset: str
  imported_from: str | None = None  # import_torch: the checkpoint file
  torch_arch: str | None = None

  def to_json(self) -> dict:
    fields = dataclasses.asdict(self) | {"image_shape": list(self.image_shape)}
    return {k: v for k, v in fields.items() if v is not None}

  @classmethod
  def from_json(cls, fields: dict) -> "TrainingFacts":
    return cls(**fields | {"image_shape": tuple(fields["image_shape"])})


class Workdir:
  """The directory of one training run and of everything certified with it."""

  def __init__(self, path):
    self.path = Path(path)

  def __repr__(self) -> str:
    return f"Workdir({str(self.path)!r})"

  def __fspath__(self) -> str:
    return str(self.path)

  @property
  def config_path(self) -> Path:
    return self.path / CONFIG_FILE

  @property
  def metrics_path(self) -> Path:
    return self.path / METRICS_FILE

  @property
  def estimator_dir(self) -> Path:
    return self.path / ESTIMATOR_DIR

  def router_dir(self, node: int) -> Path:
    """The router-tree node that decides the grid's σ number `node` against the lower ones."""
    return self.path / ROUTER_DIR / f"node_{node}"

  def results_path(self, stem: str) -> Path:
    return self.path / "certify" / f"{stem}.tsv"

  def read_config(self) -> ml_collections.ConfigDict:
    if not self.config_path.exists():
      raise FileNotFoundError(f"no training run in {self.path}: {CONFIG_FILE} is missing "
                              "(train first with train.py --workdir)")
    return ml_collections.ConfigDict(json.loads(self.config_path.read_text()))

  def write_config(self, config) -> None:
    write_json_atomic(self.config_path, json.loads(config.to_json()))

  def read_facts(self) -> TrainingFacts:
    return TrainingFacts.from_json(json.loads((self.path / RUN_FILE).read_text()))

  def write_facts(self, info: TrainingFacts) -> None:
    write_json_atomic(self.path / RUN_FILE, info.to_json())

  def check_resumable(self, config, later_keys=None, ignored=()) -> None:
    """Refuses a config that differs from the saved one outside RESUMABLE_SECTIONS and the
    `ignored` key prefixes (settings the run does not read); keys added later count as their
    LATER_KEYS value, or their `later_keys` one."""
    if not self.config_path.exists():
      return
    saved = _dotted(json.loads(self.config_path.read_text()))
    saved = (LATER_KEYS | (later_keys or {})
             | {new: saved[old] for new, old in MOVED_KEYS.items() if old in saved} | saved)
    current = _dotted(json.loads(config.to_json()))
    differing = sorted(k for k in set(saved) | set(current)
                       if k.split(".")[0] not in RESUMABLE_SECTIONS
                       and not k.startswith(tuple(ignored))
                       and saved.get(k) != current.get(k))
    if differing:
      raise ValueError(f"{self.path} holds a run with a different config "
                       f"({', '.join(differing)}): rerun with the same config to resume, or "
                       "choose a new --workdir")

  def checkpoints(self):
    """The checkpoints of the base model (and its fine-tuning), for reading."""
    return checkpoints.manager(self.path)

  def training_lock(self):
    """One train.py per workdir (a second one exits naming the holder)."""
    return locks.exclusive(self.path / "train.lock", f"the training run in {self.path}")

  @staticmethod
  def results_lock(path: Path):
    """One writer per results file."""
    return locks.exclusive(path.with_name(path.name + ".lock"), f"the results file {path}")


def _dotted(tree: dict, prefix: str = "") -> dict:
  """{"a.b": value} for every leaf of a nested dict."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat |= _dotted(value, f"{prefix}{key}.")
    else:
      flat[prefix + key] = value
  return flat
