"""DualRS's last step: the base model again, each example at the σ the estimator picks."""

from __future__ import annotations

import jax.numpy as jnp

from instars_jax.train import estimator
from instars_jax.train import state as state_lib
from instars_jax.train.interface import resume, stage_manager
from instars_jax.train.stages.base import FINETUNE, BaseStage

ORDER = 2
SECTION = "estimator"
# DualRS's last step: after the estimator, fine-tune the base model this many epochs (cosine
# from finetune_learning_rate), each training example at the σ the estimator picks for it.
DEFAULTS = {"finetune_epochs": 0, "finetune_learning_rate": 0.01}


def stages(context) -> list:
  return [FinetuneStage(context)] if context.config.estimator.finetune_epochs else []


class FinetuneStage(BaseStage):
  """DualRS's last step (estimator.py): `estimator.finetune_epochs` more epochs of the base
  model with a fresh cosine schedule from `estimator.finetune_learning_rate`, each example at
  the σ the estimator assigns it (kept in the σ table), checkpointed beside the base model's
  (whose epoch ends it keeps)."""
  name = "finetune"
  histogram = False

  def __init__(self, context):
    super().__init__(context)
    e = context.config.estimator
    self.first_epoch = context.config.train.epochs
    self.last_epoch = self.first_epoch + e.finetune_epochs
    self.first_step = self.first_epoch * self.steps_per_epoch
    self.last_step = self.last_epoch * self.steps_per_epoch
    t = context.config.train.copy_and_resolve_references()
    with t.unlocked():
      t.learning_rate, t.warmup_epochs, t.schedule = e.finetune_learning_rate, 0.0, "cosine"
    self.tx = state_lib.optimizer(t, self.steps_per_epoch * self.loss.updates_per_step,
                                  e.finetune_epochs)

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
