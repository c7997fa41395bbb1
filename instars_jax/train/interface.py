"""The interface of a training stage (`Stage`), and its checkpoints: one orbax manager per
stage, numbered by the run's global step (storage/checkpoints.py), and resuming from them."""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import orbax.checkpoint as ocp

from instars_jax.storage import checkpoints


class Stage(Protocol):
  """A training stage. Its steps are counted in its model's numbering, [first_step, last_step)
  (the estimator's from 0, fine-tuning's on from the base model's); the loop places them
  after the global step `offset` at which the stage before it ended."""
  context: object  # stages.Context: the config, workdir, dataset, mesh and stop request
  name: str  # its checkpoints' and progress bar's name
  events_part: str  # its TensorBoard directory
  metrics_file: bool  # whether its rows go to metrics.jsonl
  watch_chance: bool  # whether a loss at chance level ends the run
  histogram: bool  # whether TensorBoard gets the σ table's histogram
  sigma: float  # the metrics rows' `sigma`
  batch_size: int
  num_classes: int
  steps_per_epoch: int
  first_step: int
  last_step: int  # known after start()
  checkpoints: ocp.CheckpointManager  # set by start()

  def start(self, base_state, offset: int) -> tuple:
    """(state, step): the stage's state built, or resumed from its latest checkpoint."""

  def stream(self, first_step: int) -> contextlib.AbstractContextManager[Iterator]:
    """The batches of steps [first_step, last_step)."""

  def label(self, epoch: int):
    """The metrics row's `stage`."""

  def describe(self, epoch: int) -> str:
    """The progress bar's text."""

  def begin_epoch(self, state, epoch: int):
    """The state before the epoch's first step (the σ-table hook)."""

  def step(self, state, batch, epoch: int) -> tuple:
    """(state, metrics) after one step on `batch`."""

  def end_epoch(self, state, epoch: int, row: dict, seconds: float) -> dict:
    """The epoch's metrics row (evaluation, σ table)."""

  def finish(self, state, base_state):
    """What the next stage starts from: the base model's state."""


def stage_manager(stage: Stage, directory, offset: int, more_kept=()) -> ocp.CheckpointManager:
  """The checkpoints of `stage` (starting after global step `offset`) in `directory`: every
  train.checkpoint_every_steps steps and at preemptions, its epoch ends (and `more_kept`)
  kept."""
  spe, length = stage.steps_per_epoch, stage.last_step - stage.first_step
  ends = set(range(offset + spe, offset + length + 1, spe)) | set(more_kept)
  every = stage.context.config.train.checkpoint_every_steps
  return checkpoints.manager(directory, every, ends)


def resume(stage: Stage, template, offset: int) -> tuple:
  """(state, step): `stage`'s latest checkpoint (its global steps follow `offset`) restored
  onto `template`, or (template, first_step) when it has none."""
  manager, length = stage.checkpoints, stage.last_step - stage.first_step
  latest = manager.latest_step()
  if latest is not None and not checkpoints.progress(manager, latest):
    raise ValueError(f"{manager.directory} holds checkpoints numbered by epoch, by an older "
                     "instars_jax: train in a new --workdir (certify.py still reads them)")
  ours = [step for step in manager.all_steps() if offset < step <= offset + length]
  if not ours:
    return template, stage.first_step
  return (checkpoints.restore(manager, max(ours), template),
          stage.first_step + max(ours) - offset)
