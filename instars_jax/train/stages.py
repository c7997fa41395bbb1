"""The stages the training loop (loop.py) runs, behind one interface (interface.py): here the base
model's two, `BaseStage` (Gaussian augmentation or Insta-RS Train) and `FinetuneStage` (the
epochs after train.epochs, each example at the σ the estimator picks); the σ-estimators'
stage is in estimator_stage.py.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp

from instars_jax import data
from instars_jax.data import pipeline
from instars_jax.storage import checkpoints
from instars_jax.storage.workdir import TrainingFacts, Workdir
from instars_jax.smoothing.streams import Stream
from instars_jax.train import actions, estimator, estimator_stage, losses, sigma_table, steps
from instars_jax.train.interface import resume, stage_manager
from instars_jax.train import state as state_lib

FINETUNE = "finetune"  # the `stage` of the epochs after train.epochs


@dataclasses.dataclass
class Context:
  """What every stage reads: the config, the run's directory and dataset, the device mesh,
  the stop request, the run's shapes, and the metrics rows written so far."""
  config: object
  workdir: Workdir
  dataset: data.Dataset
  sharder: object
  stop: checkpoints.StopRequest
  facts: TrainingFacts
  history: list

  @classmethod
  def start(cls, config, workdir: Workdir, dataset, sharder, stop) -> "Context":
    """Writes config.json and run.json (process 0) and keeps the metrics rows of the epochs
    that a resume does not redo."""
    steps_per_epoch = data.num_batches(len(dataset.train), config.train.batch_size, True)
    if steps_per_epoch == 0:
      raise ValueError(f"train.batch_size={config.train.batch_size} exceeds the "
                       f"{len(dataset.train)} training examples")
    facts = TrainingFacts(tuple(dataset.image_shape), dataset.num_classes, dataset.stats,
                  len(dataset.train), steps_per_epoch, dataset.name)
    done = workdir.checkpoints().latest_step() or 0
    path = workdir.metrics_path
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    history = [row for row in rows if row["step"] <= done]
    if jax.process_index() == 0:
      workdir.write_config(config)
      workdir.write_facts(facts)
      actions.write_rows(path, history)
    return cls(config, workdir, dataset, sharder, stop, facts, history)


def for_config(context: Context) -> list:
  """The stages `context.config` asks for, in order."""
  e = context.config.estimator
  choosers = estimator.choosers(context.config, context.workdir) if e.epochs else []
  return ([BaseStage(context)] + [estimator_stage.EstimatorStage(context, c) for c in choosers]
          + ([FinetuneStage(context)] if e.finetune_epochs else []))


class BaseStage:
  """Epochs [0, train.epochs) of the base model (stage 1 and, with Insta-RS, stage 2)."""
  name = "base"
  watch_chance = True  # a loss stuck at chance ends the run
  events_part = "train"
  metrics_file = True  # rows go to metrics.jsonl

  def __init__(self, context: Context):
    self.context, t = context, context.config.train
    self.steps_per_epoch, self.batch_size = context.facts.steps_per_epoch, t.batch_size
    self.num_classes = context.facts.num_classes
    self.first_epoch, self.last_epoch = 0, t.epochs
    self.first_step, self.last_step = 0, self.last_epoch * self.steps_per_epoch
    self.histogram = t.insta
    self.sigma = t.sigma  # the metrics rows' `sigma`
    self.loss = losses.from_config(t)
    self.update_seconds = 0.0  # the σ-table update before the current epoch

  def start(self, base_state, offset: int):
    del base_state
    self.checkpoints = stage_manager(self, self.context.workdir.path, offset)
    template = self.context.sharder.replicate(
        state_lib.create_train_state(self.context.config, self.context.facts))
    return resume(self, template, offset)

  def stream(self, first_step: int):
    c = self.context
    batches = pipeline.StepBatches(
        c.dataset.train, pipeline.Batching.from_config(c.config, self.steps_per_epoch),
        jax.process_index(), jax.process_count())
    return pipeline.train_stream(batches, first_step, self.last_step, c.config.input)

  def label(self, epoch: int):
    """The metrics row's `stage`: 1, 2 (Insta-RS Train's table stage) or "finetune"."""
    t = self.context.config.train
    return 2 if t.insta and epoch >= t.stage1_epochs else 1

  def describe(self, epoch: int) -> str:
    return f"epoch {epoch + 1}/{self.context.config.train.epochs}"

  def begin_epoch(self, state, epoch: int):
    """The σ-table update due before `epoch` (sigma_table.update_due), timed."""
    c = self.context
    if not sigma_table.update_due(c.config, epoch):
      return state
    began = time.perf_counter()
    state = sigma_table.update_before_epoch(state, c.dataset.train, c.sharder, c.config, epoch)
    jax.block_until_ready(state.sigma_table)
    self.update_seconds = time.perf_counter() - began
    return state

  def step(self, state, batch, epoch: int):
    t = self.context.config.train
    # Cohen: always train.sigma; stage 1: all, stage 2: a share `explore`, at a random grid σ.
    explore = {1: 1.0 if t.stage1_noise == "grid" else 0.0,
               2: t.table.explore}.get(self.label(epoch), 0.0)
    grid = tuple(float(s) for s in t.table.grid) if t.insta and explore > 0 else None
    return steps.train_step(state, self.context.sharder.batch(batch),
                            epoch_key(self.context.config.seed, epoch), grid, float(explore),
                            self.loss, epoch)

  def end_epoch(self, state, epoch: int, row: dict, seconds: float) -> dict:
    """The row with the cost of the epoch's σ-table update against its `seconds` of training,
    the table's quantiles (and grid shares) and the test accuracy."""
    c = self.context
    row.update({"table_update_seconds": self.update_seconds,
                "table_update_share_of_epoch": self.update_seconds / seconds})
    self.update_seconds = 0.0
    row.update(sigma_table.quantiles(state.sigma_table))
    if c.config.train.insta or row["stage"] == FINETUNE:
      row.update(sigma_table.grid_shares(state.sigma_table, c.config.train.table.grid))
    row.update(steps.evaluate(state, c.dataset.test, c.sharder, c.config, c.config.train.sigma))
    return row

  def finish(self, state, base_state):
    del base_state
    c = self.context
    if c.config.train.insta and jax.process_index() == 0:
      sigma_table.plot(state.sigma_table, c.dataset.train.labels, c.workdir.path)
    return state


class FinetuneStage(BaseStage):
  """DualRS's last step (estimator.py): `estimator.finetune_epochs` more epochs of the base
  model with a fresh cosine schedule from `estimator.finetune_learning_rate`, each example at
  the σ the estimator assigns it (kept in the σ table), checkpointed beside the base model's
  (whose epoch ends it keeps)."""
  name = "finetune"
  histogram = False

  def __init__(self, context: Context):
    super().__init__(context)
    e = context.config.estimator
    self.first_epoch = context.config.train.epochs
    self.last_epoch = self.first_epoch + e.finetune_epochs
    self.first_step = self.first_epoch * self.steps_per_epoch
    self.last_step = self.last_epoch * self.steps_per_epoch
    t = context.config.train.copy_and_resolve_references()
    with t.unlocked():
      t.learning_rate, t.warmup_epochs, t.schedule = e.finetune_learning_rate, 0.0, "cosine"
    self.tx = state_lib.optimizer(t, self.steps_per_epoch, e.finetune_epochs)

  def label(self, epoch: int):
    return FINETUNE

  def start(self, base_state, offset: int):
    c = self.context
    base_ends = range(self.steps_per_epoch, self.first_step + 1, self.steps_per_epoch)
    self.checkpoints = stage_manager(self, c.workdir.path, offset, base_ends)
    state, step = resume(self, base_state.replace(tx=self.tx), offset)
    if step > self.first_step:  # the checkpoint holds the assigned table and the optimizer
      return state, step
    sigmas = estimator.assigned_sigmas(c.workdir, c.dataset.train, c.config)
    opt_state = c.sharder.replicate(self.tx.init(base_state.params))
    return (base_state.replace(tx=self.tx, opt_state=opt_state,
                               sigma_table=c.sharder.replicate(jnp.asarray(sigmas))),
            self.first_step)

  def finish(self, state, base_state):
    return state


def epoch_key(seed: int, epoch: int):
  """The training noise key of `epoch`: every example's noise is folded from it by index."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), Stream.TRAIN_NOISE),
                            epoch)
