"""DualRS's last step (`train.finetune.epochs`): the base model fine-tuned again, each
training example at the σ the trained estimator picks for it (`assigned_sigmas`: the majority
bin over `train.estimator.label_samples` noisy copies at σ_e), so that the base model is trained
where the certificate will use it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from instars_jax import data
from instars_jax.selection import estimator
from instars_jax.smoothing.streams import Stream
from instars_jax.storage.files import write_json_atomic
from instars_jax.storage.workdir import Workdir
from instars_jax.train import state as state_lib
from instars_jax.train.interface import resume, stage_manager
from instars_jax.train.stages.base import FINETUNE, BaseStage

ORDER = 2
OFF = {"epochs": 0}  # adds no stage (stages/__init__.py)
# DualRS's last step, train.finetune: after the estimator, fine-tune the base model this many
# epochs (cosine from learning_rate), each training example at the σ the estimator picks.
DEFAULTS = {"epochs": 0, "learning_rate": 0.01}
# Its section may change on resume (a finished run can be fine-tuned later): the stage checks
# its settings against the ones its checkpoints were made with (check_settings).
CHECKS_OWN_RESUME = True
SETTINGS_FILE = "finetune.json"
# The names this stage's settings had before they moved to train.finetune, as finetune.json
# files of earlier runs record them.
EARLIER_NAMES = {"finetune_epochs": "epochs", "finetune_learning_rate": "learning_rate"}


def settings(config) -> dict:
  return {key: config.train.finetune[key] for key in DEFAULTS}


def validate(config) -> None:
  """ValueError naming a bad fine-tuning setting."""
  f = config.train.finetune
  if f.epochs < 0:
    raise ValueError(f"train.finetune.epochs must be >= 0; got {f.epochs}")
  if f.learning_rate <= 0:
    raise ValueError(f"train.finetune.learning_rate must be > 0; got {f.learning_rate}")
  if f.epochs and not config.train.estimator.epochs:
    raise ValueError("train.finetune.epochs needs the σ-estimator it fine-tunes at: set "
                     "train.estimator.epochs > 0")
  if f.epochs and config.train.estimator.router:
    raise ValueError("train.finetune.epochs needs the estimator over the grid, not "
                     "train.estimator.router")


def check_settings(path, current: dict) -> None:
  """Records the fine-tuning's settings in `path` the first time; refuses (ValueError naming
  them) a resume with others, as the σ-estimator's stage does with its own."""
  if path.exists():
    saved = {EARLIER_NAMES.get(k, k): v for k, v in json.loads(path.read_text()).items()}
    changed = sorted(k for k in current if saved.get(k) != current[k])
    if changed:
      shown = ", ".join(f"train.finetune.{k}={current[k]!r} (the run: {saved.get(k)!r})"
                        for k in changed)
      raise ValueError(f"{path.parent} holds a fine-tuning run with other settings: {shown}; "
                       "rerun with the run's settings, or choose a new --workdir")
  elif jax.process_index() == 0:
    write_json_atomic(path, current)


def stages(context) -> list:
  return [FinetuneStage(context)] if context.config.train.finetune.epochs else []


def assigned_sigmas(workdir, split: data.Split, config) -> np.ndarray:
  """float32[N]: for each example of `split`, the grid σ of the estimator's majority bin over
  `train.estimator.label_samples` copies at σ_e (noise keyed on (seed, example, copy); ties go to
  the smaller σ). Every host computes all of them, on its first local device."""
  apply, saved = estimator.load(Workdir(workdir).estimator_dir, workdir)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), Stream.ESTIMATOR_ASSIGN)
  bins = estimator.majority_bins(apply, saved["sigma"], len(saved["grid"]), split,
                                 np.arange(len(split)), key, config)
  return np.asarray(saved["grid"], np.float32)[bins]


class FinetuneStage(BaseStage):
  """DualRS's last step: `train.finetune.epochs` more epochs of the base model with a
  fresh cosine schedule from `train.finetune.learning_rate`, each example at the σ the
  estimator assigns it (kept in the σ table), checkpointed beside the base model's (whose
  epoch ends it keeps)."""
  name = "finetune"

  def __init__(self, context):
    super().__init__(context)
    f = context.config.train.finetune
    self.first_epoch = context.config.train.epochs
    self.last_epoch = self.first_epoch + f.epochs
    self.first_step = self.first_epoch * self.steps_per_epoch
    self.last_step = self.last_epoch * self.steps_per_epoch
    t = context.config.train.copy_and_resolve_references()
    with t.unlocked():
      t.learning_rate, t.warmup_epochs, t.schedule = f.learning_rate, 0.0, "cosine"
    self.tx = state_lib.optimizer(t, self.steps_per_epoch * self.loss.updates_per_step,
                                  f.epochs)

  def label(self, epoch: int):
    return FINETUNE

  def start(self, base_state, offset: int):
    c = self.context
    check_settings(c.workdir.path / SETTINGS_FILE, settings(c.config))
    base_ends = range(self.steps_per_epoch, self.first_step + 1, self.steps_per_epoch)
    self.checkpoints = stage_manager(self, c.workdir.path, offset, base_ends)
    state, step = resume(self, base_state.replace(tx=self.tx), offset)
    if step > self.first_step:  # the checkpoint holds the assigned table and the optimizer
      return state, step
    sigmas = assigned_sigmas(c.workdir, c.dataset.train, c.config)
    opt_state = c.sharder.replicate(self.tx.init(base_state.params))
    return (base_state.replace(tx=self.tx, opt_state=opt_state,
                               sigma_table=c.sharder.replicate(jnp.asarray(sigmas))),
            self.first_step)

  def finish(self, state, base_state):
    return state
