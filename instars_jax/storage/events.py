"""TensorBoard event files of a run, in WORKDIR/tensorboard/<part>/ (tensorboardX: no
TensorFlow needed). The JSONL and TSV files stay the machine-readable record; these are for
watching a run. Only process 0 writes."""

from __future__ import annotations

import numbers
from pathlib import Path

import jax
import numpy as np

DIRECTORY = "tensorboard"


class EventWriter:
  """Scalars and histograms at a step; a no-op on processes other than 0."""

  def __init__(self, workdir, part: str):
    self.writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(logdir=str(Path(workdir) / DIRECTORY / part))

  def scalars(self, step: int, values: dict) -> None:
    """Every real-valued entry of `values` (others, such as strings, are skipped)."""
    if self.writer is None:
      return
    for tag, value in values.items():
      if isinstance(value, numbers.Real) and not isinstance(value, bool):
        self.writer.add_scalar(tag, float(value), step)
    self.writer.flush()

  def histogram(self, step: int, tag: str, values) -> None:
    if self.writer is not None:
      self.writer.add_histogram(tag, np.asarray(values, np.float64), step)
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
