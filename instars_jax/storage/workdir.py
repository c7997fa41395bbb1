"""A run's directory, owned in one place: its paths, its two JSON files, its checkpoint
managers, its locks, and whether a config may resume it.

  config.json              the run's config
  run.json                 TrainingFacts: what the train state's shapes depend on
  checkpoints/<step>/      orbax, by global step: the latest and every epoch end of the base
                           model and its fine-tuning (storage/checkpoints.py)
  estimator/               the σ-estimator: checkpoints/, estimator.json, profile.npz
  router/node_<k>/         the router tree's nodes (train.estimator.router)
  finetune.json            the fine-tuning stage's settings (train.finetune)
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
# Certification settings chosen by the run's training on held-out data ({"settings": {dotted
# certify key: value}, ...}; train/stages/tune_threshold.py): the run's defaults at
# certification, under the command line's.
TUNED_FILE = "tuned.json"
# Keys that moved, new name: old name. A run saved before the move used the old key's value.
MOVED_KEYS = {"train.table.n": "certify.n", "train.table.alpha": "certify.alpha",
              "train.finetune.epochs": "estimator.finetune_epochs",
              "train.finetune.learning_rate": "estimator.finetune_learning_rate"}
# Sections that moved, new prefix: old prefix (the σ-estimators' settings, once top-level).
MOVED_SECTIONS = {"train.estimator.": "estimator."}
# Sections a run may resume with changed: certification and the input settings (they never
# change batches); training stages that check their own settings add theirs (check_resumable).
RESUMABLE_SECTIONS = ("certify", "input")


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

  @property
  def tuned_path(self) -> Path:
    return self.path / TUNED_FILE

  def tuned_settings(self) -> dict:
    """{dotted certify key: value} the run's training tuned ({}: none)."""
    return json.loads(self.tuned_path.read_text())["settings"] if self.tuned_path.exists() else {}

  def results_path(self, stem: str) -> Path:
    return self.path / "certify" / f"{stem}.tsv"

  def read_config(self, defaults: ml_collections.ConfigDict | None = None,
                  later_keys: dict | None = None) -> ml_collections.ConfigDict:
    """The run's saved config; with `defaults` (configs/default.py's), completed for the keys
    added since the run was saved (by their `later_keys` value, {dotted key: what runs before
    it did} where the default means otherwise, else by their default); keys that moved
    (MOVED_KEYS, MOVED_SECTIONS) under their new names, sequences as tuples."""
    if not self.config_path.exists():
      raise FileNotFoundError(f"no training run in {self.path}: {CONFIG_FILE} is missing "
                              "(train first with train.py --workdir)")
    flat = _moved(_dotted(json.loads(self.config_path.read_text())))
    if defaults is None:
      return ml_collections.ConfigDict(_nested(flat))
    flat = _dotted(json.loads(defaults.to_json())) | (later_keys or {}) | flat
    return ml_collections.ConfigDict(_nested({k: _tupled(v) for k, v in flat.items()}))

  @staticmethod
  def differing(config, saved, own=lambda key: False) -> list:
    """The dotted keys of `config` whose value differs from `saved` (the run's config as
    `read_config` completes it), except those `own(key)` lets change, sorted."""
    saved = _dotted(json.loads(saved.to_json()))
    current = _dotted(json.loads(config.to_json()))
    return sorted(k for k in current if not own(k) and saved.get(k) != current[k])

  def write_config(self, config) -> None:
    write_json_atomic(self.config_path, json.loads(config.to_json()))

  def read_facts(self) -> TrainingFacts:
    return TrainingFacts.from_json(json.loads((self.path / RUN_FILE).read_text()))

  def write_facts(self, info: TrainingFacts) -> None:
    write_json_atomic(self.path / RUN_FILE, info.to_json())

  def check_resumable(self, config, defaults, later_keys=None, ignored=()) -> None:
    """Refuses a config that differs from the saved one outside RESUMABLE_SECTIONS and the
    `ignored` key prefixes (settings the run does not read, or that their stage checks
    itself); keys added since the run was saved count as their `later_keys` value (what those
    runs did, where the default means otherwise), else their value in `defaults`."""
    if not self.config_path.exists():
      return
    differing = self.differing(
        config, self.read_config(defaults, later_keys),
        lambda key: key.split(".")[0] in RESUMABLE_SECTIONS or key.startswith(tuple(ignored)))
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


def _moved(flat: dict) -> dict:
  """A saved run's {dotted key: value} with the keys that moved under their new names too
  (MOVED_KEYS: the old key may live on; MOVED_SECTIONS: the old section is gone)."""
  moved = {new: flat[old] for new, old in MOVED_KEYS.items() if old in flat}
  for key, value in flat.items():
    old = next((prefix for prefix in MOVED_SECTIONS.values() if key.startswith(prefix)), None)
    if old is None:
      moved[key] = value
    elif key not in MOVED_KEYS.values():
      new = next(n for n, o in MOVED_SECTIONS.items() if o == old)
      moved[new + key[len(old):]] = value
  return moved


def _tupled(value):
  """JSON's lists as the tuples configs hold."""
  return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _nested(flat: dict) -> dict:
  """The nested dict of {"a.b": value}; an empty dict (a section without keys when it was
  saved) does not replace the keys other entries give it."""
  tree = {}
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    if value != {} or not isinstance(node.get(leaf), dict):
      node[leaf] = value
  return tree


def _dotted(tree: dict, prefix: str = "") -> dict:
  """{"a.b": value} for every leaf of a nested dict (an empty dict is a leaf)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat |= _dotted(value, f"{prefix}{key}.")
    else:
      flat[prefix + key] = value
  return flat
