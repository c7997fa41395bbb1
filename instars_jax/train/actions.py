"""Small objects the training loop calls after every step and at every epoch end, in the
manner of CLU's periodic actions: the divergence watch, the metrics log, the checkpoints with
the stop request, and TensorBoard. Each stage builds its own (its `actions`, interface.py).

Each has `after_step(step, state, metrics)` (step: the stage's steps done) and
`after_epoch(epoch, state, row)`, called in list order; either may raise to end training.
"""

from __future__ import annotations

import json
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from instars_jax.storage import checkpoints


class Action:
  """Does nothing; actions override what they need."""

  def after_step(self, step: int, state, metrics) -> None:
    pass

  def after_epoch(self, epoch: int, state, row: dict) -> None:
    pass

  def close(self) -> None:
    pass


CHANCE_METRIC = "cross_entropy"


class DivergenceWatch(Action):
  """Stops training that has diverged: a non-finite loss at any step, or, from
  `start_step` on, a mean cross-entropy over a window of `chance_steps` steps at or above
  `chance_fraction` × ln(num_classes), the cross-entropy of a guess (the net has collapsed to
  chance). The cross-entropy is the step's `cross_entropy` metric where a loss reports one
  (its other terms, such as MACER's hinge or consistency's entropy, are not on that scale),
  else the loss itself.

  Losses stay on the device and are summed there; the host looks once per window (and at
  every epoch end for a non-finite loss), so the watch costs no per-step synchronisation."""

  def __init__(self, settings, num_classes: int, start_step: int, chance: bool = True):
    self.settings, self.start_step = settings, start_step
    self.window = settings.chance_steps or 100
    self.check_chance = chance and settings.chance_steps > 0
    self.chance = float(np.log(num_classes))
    self.step, self.sum, self.nonfinite, self.watched = 0, 0.0, None, "loss"

  def after_step(self, step: int, state, metrics) -> None:
    del state
    loss = metrics["loss"]
    self.step = step
    self.watched = CHANCE_METRIC if CHANCE_METRIC in metrics else "loss"
    self.sum = self.sum + metrics[self.watched]
    if self.settings.nonfinite:
      bad = jnp.logical_not(jnp.isfinite(loss))
      self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
    if step % self.window:
      return
    self._check_nonfinite("")
    mean, self.sum, self.nonfinite = float(self.sum) / self.window, 0.0, None
    threshold = self.settings.chance_fraction * self.chance
    if self.check_chance and step - self.window >= self.start_step and mean >= threshold:
      raise ValueError(f"training diverged by step {step}: mean train_{self.watched} "
                       f"{mean:.4g} over {self.window} steps is at chance level "
                       f"(>= {threshold:.4g} = {self.settings.chance_fraction:g} x ln "
                       f"{round(np.exp(self.chance))}); "
                       "see train.divergence")

  def after_epoch(self, epoch: int, state, row) -> None:
    del state, row
    self._check_nonfinite(f" (epoch {epoch + 1})")

  def _check_nonfinite(self, where: str) -> None:
    if self.nonfinite is not None and bool(self.nonfinite):
      raise ValueError(f"training diverged by step {self.step}{where}: train_loss is not finite "
                       "(NaN or inf); lower train.learning_rate or set train.grad_clip")


class Checkpoints(Action):
  """The stage's checkpoints, by global step (storage/checkpoints.py): at every epoch end, after
  its metrics row; in between wherever orbax's policies say (every train.checkpoint_every_steps
  steps, and on several hosts at the step they agree on after a preemption notice); and at a
  stop request (SIGTERM, SIGINT) after the step it arrived in, followed by
  `checkpoints.Interrupted`. A stop that arrives in an epoch's last step waits for the
  epoch's end. `offset` is the global step the stage starts at; each checkpoint carries the
  stage's name and its steps done of its steps (`checkpoints.progress`)."""

  def __init__(self, stage, offset: int, stop: checkpoints.StopRequest):
    self.stage, self.offset, self.stop = stage, offset, stop
    self.manager = stage.checkpoints

  def after_step(self, step: int, state, metrics) -> None:
    del metrics
    if step % self.stage.steps_per_epoch == 0:
      return  # the epoch's end: after_epoch
    saved = self._save(step, state, force=False)
    if self._stopping(step):
      if not saved:
        self._save(step, state, force=True)
      self._interrupt(step)

  def after_epoch(self, epoch: int, state, row: dict) -> None:
    step = (epoch + 1) * self.stage.steps_per_epoch
    self._save(step, state, force=True)
    if self._stopping(step):
      self._interrupt(step)

  def _save(self, step: int, state, force: bool) -> bool:
    first, last = self.stage.first_step, self.stage.last_step
    done = {"stage": self.stage.name, "step": step - first, "steps": last - first}
    return checkpoints.save(self.manager, self.offset + step - first, state, done, force)

  def _stopping(self, step: int) -> bool:
    return (self.manager.reached_preemption(self.offset + step - self.stage.first_step)
            or self.stop.requested)

  def _interrupt(self, step: int):
    epoch, batch = divmod(step - 1, self.stage.steps_per_epoch)
    raise checkpoints.Interrupted(
        f"stopped at step {step} (epoch {epoch + 1}, batch {batch + 1} of "
        f"{self.stage.steps_per_epoch}): saved in {self.manager.directory}; rerun the same "
        "command to resume")


class MetricsLog(Action):
  """Prints each epoch's row (process 0) and, with `rows` and `path`, appends it to them and
  as one line to the JSONL file (metrics.jsonl; a resumed run first rewrites the file with
  the rows of the epochs it keeps, stages.Context.start, so no epoch appears twice)."""

  def __init__(self, prefix: str = "", rows: list | None = None, path=None):
    self.prefix, self.rows, self.path = prefix, rows, path

  def after_epoch(self, epoch: int, state, row: dict) -> None:
    if self.rows is not None:
      self.rows.append(row)
    if jax.process_index() != 0:
      return
    if self.path is not None:
      with open(self.path, "a") as f:
        f.write(json.dumps(row) + "\n")
    tqdm.write(self.prefix + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in row.items()))


def write_rows(path, rows) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class TensorBoard(Action):
  """Each epoch's metrics row (its real values), and with `histogram` the σ table's
  histogram, written at the epoch end's global step (the row's `step`) by `writer`: an
  events.EventWriter, or any writer with CLU's MetricWriter methods."""

  def __init__(self, writer, histogram: bool = False):
    self.writer, self.histogram = writer, histogram

  def after_epoch(self, epoch: int, state, row) -> None:
    step = row["step"]
    self.writer.write_scalars(step, {k: v for k, v in row.items()
                                     if isinstance(v, numbers.Real) and not isinstance(v, bool)})
    if self.histogram:
      self.writer.write_histograms(step, {"sigma_table": state.sigma_table})
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()
