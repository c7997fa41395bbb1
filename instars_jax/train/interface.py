"""The interface of a training stage (`Stage`), and its checkpoints: one orbax manager per
stage, numbered by the run's global step (storage/checkpoints.py), and resuming from them."""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol

import orbax.checkpoint as ocp

from instars_jax.storage import checkpoints


class Stage(Protocol):
  """A training stage, as the loop (loop.py) sees it. Its steps are counted in its model's
  numbering, [first_step, last_step) (the estimator's from 0, fine-tuning's on from the base
  model's); the loop places them after the global step `offset` at which the stage before it
  ended, and runs the stage's own actions (train/actions.py) after each step and epoch."""
  steps_per_epoch: int
  first_step: int
  last_step: int  # known after start()
  batch_size: int  # the metrics row's images_per_s

  def start(self, base_state, offset: int) -> tuple:
    """(state, step): the stage's state built, or resumed from its latest checkpoint."""

  def actions(self, offset: int) -> list:
    """The actions.Action objects called after each step and epoch, in order (after start)."""

  def stream(self, first_step: int) -> contextlib.AbstractContextManager[Iterator]:
    """The batches of steps [first_step, last_step)."""

  def describe(self, epoch: int) -> str:
    """The progress bar's text."""

  def row_labels(self, epoch: int) -> dict:
    """The metrics row's `stage` and `sigma`."""

  def begin_epoch(self, state, epoch: int):
    """The state before the epoch's first step (the σ-table hook)."""

  def step(self, state, batch, epoch: int) -> tuple:
    """(state, metrics) after one step on `batch`."""

  def end_epoch(self, state, epoch: int, row: dict, seconds: float) -> dict:
    """The epoch's metrics row (evaluation, σ table)."""

  def finish(self, state, base_state):
    """What the next stage starts from: the base model's state."""


class WithoutSteps:
  """The Stage attributes of a stage that does its work in `start` (sub-runs, a tuning pass)
  and takes no steps of its own: the loop calls its start and finish only."""
  steps_per_epoch, first_step, last_step, batch_size = 1, 0, 0, 0

  def __init__(self, context):
    self.context = context

  def finish(self, state, base_state):
    del state
    return base_state


def stage_manager(stage, directory, offset: int, more_kept=()) -> ocp.CheckpointManager:
  """The checkpoints of `stage` (starting after global step `offset`; its `context` gives
  train.checkpoint_every_steps) in `directory`: every train.checkpoint_every_steps steps and
  at preemptions, its epoch ends (and `more_kept`) kept."""
  spe, length = stage.steps_per_epoch, stage.last_step - stage.first_step
  ends = set(range(offset + spe, offset + length + 1, spe)) | set(more_kept)
  every = stage.context.config.train.checkpoint_every_steps
  return checkpoints.manager(directory, every, ends)


def resume(stage, template, offset: int) -> tuple:
  """(state, step): the latest checkpoint of `stage.checkpoints` (its global steps follow
  `offset`) restored onto `template`, or (template, first_step) when it has none."""
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
