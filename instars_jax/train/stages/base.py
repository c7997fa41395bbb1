"""The base model's stage: Gaussian augmentation (Cohen et al.) at train.sigma, or Insta-RS
Train, stage 1 at one σ (or a grid σ per example) and stage 2 at each example's σ-table entry,
the table re-estimated before every `table.update_every`-th stage-2 epoch (sigma_table.py)."""

from __future__ import annotations

import time

import jax

from instars_jax import plugins
from instars_jax.data import pipeline
from instars_jax.smoothing.streams import Stream
from instars_jax.storage import events
from instars_jax.train import actions, losses, sigma_table, steps
from instars_jax.train import state as state_lib
from instars_jax.train.interface import resume, stage_manager

ORDER = 0
FINETUNE = "finetune"  # the `stage` of the epochs after train.epochs (finetune.py)


def validate(config) -> None:
  """ValueError naming a bad Insta-RS Train setting (train.stage1_noise, train.table)."""
  t = config.train
  if t.stage1_noise not in ("sigma", "grid"):
    raise ValueError(f"train.stage1_noise must be 'sigma' or 'grid'; got {t.stage1_noise!r}")
  if t.insta or t.stage1_noise == "grid":
    plugins.raise_first_failure(sigma_table.validate(config, jax.device_count()))


def stages(context) -> list:
  return [BaseStage(context)]


class BaseStage:
  """Epochs [0, train.epochs) of the base model (stage 1 and, with Insta-RS, stage 2)."""
  name = "base"  # its checkpoints' name

  def __init__(self, context):
    self.context, t = context, context.config.train
    self.steps_per_epoch, self.batch_size = context.facts.steps_per_epoch, t.batch_size
    self.num_classes = context.facts.num_classes
    self.first_epoch, self.last_epoch = 0, t.epochs
    self.first_step, self.last_step = 0, self.last_epoch * self.steps_per_epoch
    self.loss = losses.from_config(t, t.sigma)
    self.update_seconds = 0.0  # the σ-table update before the current epoch

  def start(self, base_state, offset: int):
    del base_state
    self.checkpoints = stage_manager(self, self.context.workdir.path, offset)
    template = self.context.sharder.replicate(
        state_lib.create_train_state(self.context.config, self.context.facts))
    return resume(self, template, offset)

  def actions(self, offset: int) -> list:
    """A loss stuck at chance ends the run; rows go to metrics.jsonl; TensorBoard gets the σ
    table's histogram with Insta-RS."""
    c, t = self.context, self.context.config.train
    return [actions.DivergenceWatch(t.divergence, self.num_classes, self.steps_per_epoch),
            actions.MetricsLog(rows=c.history, path=c.workdir.metrics_path),
            actions.Checkpoints(self, offset, c.stop),
            actions.TensorBoard(events.EventWriter(c.workdir, "train"), histogram=t.insta)]

  def stream(self, first_step: int):
    c = self.context
    batches = pipeline.StepBatches(
        c.dataset.train, pipeline.Batching.from_config(c.config, self.steps_per_epoch),
        jax.process_index(), jax.process_count())
    return pipeline.train_stream(batches, first_step, self.last_step, c.config.input)

  def label(self, epoch: int):
    """The epoch's stage: 1, 2 (Insta-RS Train's table stage) or "finetune"."""
    t = self.context.config.train
    return 2 if t.insta and epoch >= t.stage1_epochs else 1

  def row_labels(self, epoch: int) -> dict:
    return {"stage": self.label(epoch), "sigma": self.context.config.train.sigma}

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


def epoch_key(seed: int, epoch: int):
  """The training noise key of `epoch`: every example's noise is folded from it by index."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), Stream.TRAIN_NOISE),
                            epoch)
