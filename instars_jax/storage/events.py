"""TensorBoard event files of a run, in WORKDIR/tensorboard/<part>/ (tensorboardX: no
TensorFlow needed). The JSONL and TSV files stay the machine-readable record; these are for
watching a run. Only process 0 writes."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import jax
import numpy as np

DIRECTORY = "tensorboard"


class EventWriter:
  """Scalars and histograms at a step, by CLU's MetricWriter method names (a CLU writer can
  take its place); a no-op on processes other than 0."""

  def __init__(self, workdir, part: str):
    self.writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(logdir=str(Path(workdir) / DIRECTORY / part))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Each value stored as the largest float32 not above it (TensorBoard keeps float32): a
    certified accuracy or ACR never grows in storage."""
    if self.writer is not None:
      for tag, value in scalars.items():
        self.writer.add_scalar(tag, float32_down(value), step)

  def write_histograms(self, step: int, arrays: Mapping[str, np.ndarray],
                       num_buckets: int | None = None) -> None:
    del num_buckets  # tensorboardX's own bins
    if self.writer is not None:
      for tag, values in arrays.items():
        self.writer.add_histogram(tag, np.asarray(values, np.float64), step)

  def flush(self) -> None:
    if self.writer is not None:
      self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()



def float32_down(value) -> np.float32:
  """The largest float32 not above `value` (np.float32 rounds to nearest: up about half the
  time)."""
  value = float(value)
  nearest = np.float32(value)
  # Compared in float64: against a float32, numpy casts the Python float to float32 too.
  return np.nextafter(nearest, np.float32(-np.inf)) if float(nearest) > value else nearest
