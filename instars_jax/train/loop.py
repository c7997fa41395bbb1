"""train.py's library function: one loop over global steps, running the run's stages in turn
(flax's imagenet example's train_and_evaluate, big_vision's one flat loop).

The stages (train/stages/, one module each, in their declared ORDER):
  base       Gaussian augmentation (Cohen et al.), or Insta-RS Train: stage 1 at one σ (or a
             grid σ per example), stage 2 at each example's σ-table entry, the table
             re-estimated before every `table.update_every`-th stage-2 epoch (sigma_table.py)
  sigma_experts  fixed-σ expert runs of their own in WORKDIR/experts/ (train.experts.sigmas)
  sigma_estimators  the σ-estimator of the sound instance-wise certificate
             (train.estimator.epochs > 0)
  finetune   the base model again, each example at the σ the estimator picks for it
             (train.finetune.epochs > 0, DualRS's last step)
  tune_threshold  the thresholded chain's τ chosen on the held-out examples (train.tune)
After every step and epoch, the small actions each stage supplies (train/actions.py): the
divergence watch, the metrics log, the checkpoints with the stop request, TensorBoard. The
stages' steps count on from one to the next as the run's global step, which numbers every
checkpoint (storage/checkpoints.py) and TensorBoard's events; rerunning the same command
resumes where the last checkpoint left off.

The noise and augmentation of example i in epoch e depend only on (seed, e, i), and the
table update of epoch e only on (seed, e, i) and the state: a resumed run continues exactly
as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import itertools
import time

import jax
import numpy as np
from tqdm import tqdm

from configs import default
from instars_jax import data, models, parallel, plugins
from instars_jax.data import pipeline
from instars_jax.storage import checkpoints
from instars_jax.storage.workdir import Workdir
from instars_jax.train import losses, stages
from instars_jax.train.interface import Stage


def train_and_evaluate(config, workdir):
  """Trains per `config` in `workdir` and returns the base model's final TrainState; rerunning
  the same command resumes from the latest checkpoint."""
  workdir = Workdir(workdir)
  validate_config(config, jax.device_count())
  config = losses.resolved_config(config)  # config.json records the loss settings that ran
  dataset = data.from_config(config)
  workdir.check_resumable(
      config, default.get_config(",".join(config.plugins)), losses.later_keys(config.train.loss),
      ignored=(losses.inactive_sections(config.train, "train", config.plugins)
               + stages.self_checked_sections(config) + ("plugins",)))
  workdir.path.mkdir(parents=True, exist_ok=True)
  # One writer per workdir: process 0 of a run holds the lock (the other hosts write nothing).
  lock = workdir.training_lock() if jax.process_index() == 0 else contextlib.nullcontext()
  with lock, checkpoints.StopRequest() as stop:
    context = stages.Context.start(config, workdir, dataset, parallel.Sharder(), stop,
                                   train_and_evaluate)
    state, offset = None, 0
    for stage in stages.for_config(context):
      state, offset = run_stage(stage, state, offset)
  return state


def run_stage(stage: Stage, base_state, offset: int):
  """The one loop: the steps of `stage` from where `stage.start` resumes it, the first at
  global step `offset` + 1, with its actions (`stage.actions`) after every step and epoch;
  returns what the stage hands on (`stage.finish`: the base model's state) and the global step
  after it."""
  state, step = stage.start(base_state, offset)
  end = offset + stage.last_step - stage.first_step
  if step >= stage.last_step:
    return stage.finish(state, base_state), end
  hooks = stage.actions(offset)
  with stage.stream(step) as stream:
    while step < stage.last_step:
      epoch, resume_at = divmod(step, stage.steps_per_epoch)
      if resume_at == 0:
        state = stage.begin_epoch(state, epoch)
      began = time.perf_counter()
      state, row, seconds = _run_epoch(stage, state, stream, step, hooks, offset)
      step = (epoch + 1) * stage.steps_per_epoch
      row = stage.end_epoch(state, epoch, row, seconds)
      row["seconds"] = time.perf_counter() - began
      for hook in hooks:
        hook.after_epoch(epoch, state, row)
  for hook in hooks:
    hook.close()
  return stage.finish(state, base_state), end


def _run_epoch(stage, state, stream, step, hooks, offset):
  """The rest of the epoch that `step` is in: the state, the epoch's metrics row (its end's
  global step, the means of the step metrics over the batches run here, throughput, and the
  share of time spent waiting for a batch) and its seconds."""
  epoch, resume_at = divmod(step, stage.steps_per_epoch)
  todo = stage.steps_per_epoch - resume_at
  began, waited = time.perf_counter(), pipeline.WaitClock()
  sums = {}
  for done, batch in enumerate(tqdm(waited(itertools.islice(stream, todo)), total=todo,
                                    desc=stage.describe(epoch), leave=False,
                                    disable=None if jax.process_index() == 0 else True), 1):
    state, metrics = stage.step(state, batch, epoch)
    for hook in hooks:
      hook.after_step(step + done, state, metrics)
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + v
  jax.block_until_ready(state.params)
  seconds = time.perf_counter() - began
  means = {k: float(v) / todo for k, v in sums.items()}
  end = offset + (epoch + 1) * stage.steps_per_epoch - stage.first_step
  row = {"epoch": epoch, "step": end, **stage.row_labels(epoch), "train_loss": means.pop("loss")}
  row.update({f"train_{k}": v for k, v in means.items()})
  row.update({"images_per_s": todo * stage.batch_size / seconds,
              "input_wait_share": waited.seconds / seconds})
  if resume_at:
    row["resumed_at_batch"] = resume_at  # the means above cover the batches after it
  return state, row, seconds


def validate_config(config, devices: int) -> None:
  """Rejects bad training knobs with one clear error, before anything compiles."""
  t = config.train
  checks = [
      (t.epochs >= 1, f"train.epochs must be >= 1; got {t.epochs}"),
      (t.batch_size >= 1 and t.batch_size % devices == 0,
       f"train.batch_size must be a positive multiple of the device count {devices}; "
       f"got {t.batch_size}"),
      (t.learning_rate > 0, f"train.learning_rate must be > 0; got {t.learning_rate}"),
      (0 <= t.momentum < 1, f"train.momentum must lie in [0, 1); got {t.momentum}"),
      (t.weight_decay >= 0, f"train.weight_decay must be >= 0; got {t.weight_decay}"),
      (np.isfinite(t.sigma) and t.sigma > 0, f"train.sigma must be finite and > 0; got {t.sigma}"),
      (t.schedule in ("step", "cosine"), f"train.schedule must be 'step' or 'cosine'; got {t.schedule!r}"),
      (config.model.name in models.ARCHITECTURES,
       f"model.name must be one of {models.ARCHITECTURES}; got {config.model.name!r}"),
      (config.model.dtype in models.DTYPES,
       f"model.dtype must be one of {sorted(models.DTYPES)}; got {config.model.dtype!r}"),
  ]
  d = t.divergence
  checks += [(d.chance_steps >= 0, f"train.divergence.chance_steps must be >= 0; got {d.chance_steps}"),
             (0 < d.chance_fraction, f"train.divergence.chance_fraction must be > 0; "
                                     f"got {d.chance_fraction}")]
  checks += losses.validate(t, "train", t.sigma, t.batch_size)
  plugins.raise_first_failure(checks + pipeline.validate(config))
  stages.validate(config)
