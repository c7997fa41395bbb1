"""What every source yields: splits of images addressable by index, a dataset of two of them
with its normalisation stats, and which examples each deterministic batch holds.

Every example carries its index in its split; shuffling is a pure function of (seed, epoch);
each host reads only its own slice of every global batch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from instars_jax.smoothing.streams import Stream, numpy_rng


class DatasetError(ValueError):
  """A dataset that cannot be found or read; the message says what to install or set."""


@dataclasses.dataclass(frozen=True)
class Options:
  """How a source reads: where from (data_dir, cache_dir), the side on-demand images are
  resized and centre-cropped to (image_size, 0: as stored), and whether an unreadable image is
  skipped (the next readable one stands in) instead of stopping."""
  data_dir: str = ""
  cache_dir: str = ""
  image_size: int = 0
  skip_corrupt: bool = False


def stats_for(mode: str, shape: tuple) -> str:
  """The models.DATASET_STATS normalisation of images of `mode` ('L' or 'RGB') and stored
  `shape`: Fashion-MNIST's for grayscale, CIFAR-10's for small colour images, ImageNet's for
  the rest. Every source decides its stats here, once."""
  if mode == "L":
    return "fashion_mnist"
  return "cifar10" if max(shape[:2]) <= 64 else "imagenet"


def mode_of(shape: tuple) -> str:
  """'L' for [H, W] or [H, W, 1] images, else 'RGB'."""
  return "L" if len(shape) == 2 or shape[-1] == 1 else "RGB"


def default_cache_dir() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "instars_jax"


@dataclass
class Split:
  """Images (uint8, [N, H, W] or [N, H, W, C]) and labels, addressable by index.

  `images` is an array, or an encoded.EncodedImages decoded example by example.
  """
  images: object
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, index: int, raw: bool = False) -> tuple[np.ndarray, int]:
    """(uint8 pixels, j): example `index`'s image (with skip_corrupt, that of the example j
    standing in for an unreadable one); as stored if `raw`, else its fixed-size view."""
    if isinstance(self.images, np.ndarray):
      return self.images[index], int(index)
    return self.images.read(index, raw)

  def take(self, indices: np.ndarray) -> dict:
    """The examples at `indices`: float32 pixels in [0, 1], labels and their split indices."""
    if isinstance(self.images, np.ndarray):
      images, origins = self.images[indices], indices
    else:
      read = [self.read(int(i)) for i in indices]
      images, origins = np.stack([r[0] for r in read]), np.array([r[1] for r in read])
    return {"image": images.astype(np.float32) / 255.0, "label": self.labels[origins],
            "index": np.asarray(indices, np.int32)}

  def subset(self, rows: np.ndarray) -> "Split":
    """The examples at `rows` (sorted), indexed 0 … len(rows) − 1."""
    rows = np.asarray(rows)
    if isinstance(self.images, np.ndarray):
      return Split(self.images[rows], self.labels[rows])
    return Split(_Rows(self.images, rows), self.labels[rows])


class _Rows:
  """Some rows of on-demand images, read as if they were the whole split."""

  def __init__(self, images, rows: np.ndarray):
    self.images, self.rows = images, rows

  def __len__(self) -> int:
    return len(self.rows)

  def read(self, index: int, raw: bool = False) -> tuple[np.ndarray, int]:
    pixels, origin = self.images.read(int(self.rows[index]), raw)
    position = int(np.searchsorted(self.rows, origin))
    if position == len(self.rows) or self.rows[position] != origin:
      raise DatasetError(f"example {self.rows[index]} is unreadable and its stand-in "
                         f"{origin} lies outside this part of the split")
    return pixels, position


@dataclass
class Dataset:
  name: str
  train: Split
  test: Split
  num_classes: int
  stats: object  # its normalisation: a models.DATASET_STATS name, or its own (mean, std) pair
  classes: tuple = ()  # class names, when the source has them
  holdout: Split | None = None  # training examples held out from training (`hold_out`)

  @property
  def image_shape(self) -> tuple:
    return self.train.read(0)[0].shape


def hold_out(dataset: Dataset, fraction: float, seed: int) -> Dataset:
  """`dataset` with round(fraction · N) of its N training examples, drawn as a pure function
  of `seed`, moved from `train` to `holdout` (for tuning selection settings on images no
  stage trained on); unchanged at fraction 0. ValueError unless 0 <= fraction < 1 leaves at
  least one example on each side."""
  if fraction == 0:
    return dataset
  size = len(dataset.train)
  count = int(round(fraction * size))
  if not 0 < fraction < 1 or not 0 < count < size:
    raise ValueError(f"train.holdout={fraction} must lie in [0, 1) and leave examples on both "
                     f"sides of the {size} training examples (it holds out {count})")
  held = np.zeros(size, bool)
  held[numpy_rng(seed, Stream.HOLDOUT).permutation(size)[:count]] = True
  return dataclasses.replace(dataset, train=dataset.train.subset(np.flatnonzero(~held)),
                             holdout=dataset.train.subset(np.flatnonzero(held)))


def fewer_examples(dataset: Dataset, count: int, seed: int) -> Dataset:
  """`dataset` training on `count` of its training examples (a draw that is a pure function
  of `seed`, in their original order); unchanged at 0. ValueError unless 0 <= count <= N."""
  size = len(dataset.train)
  if count == 0:
    return dataset
  if not 0 < count <= size:
    raise ValueError(f"train.examples={count} must lie in [0, {size}] (0: all the training "
                     "examples)")
  kept = np.sort(numpy_rng(seed, Stream.FEWER_EXAMPLES).permutation(size)[:count])
  return dataclasses.replace(dataset, train=dataset.train.subset(kept))


# ---------------------------------------------------------------------------
# Batches


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  """The example order of one epoch: a pure function of (seed, epoch)."""
  if not shuffle:
    return np.arange(num_examples)
  return numpy_rng(seed, Stream.EPOCH_ORDER, epoch).permutation(num_examples)


def batch_indices(order: np.ndarray, batch_size: int, *, drop_remainder: bool = False,
                  host_id: int = 0, host_count: int = 1) -> list:
  """The split indices of this host's slice of each global batch of `batch_size` examples
  taken in `order` (a contiguous slice each; a short last batch is split as evenly as it
  goes, or dropped with drop_remainder)."""
  if batch_size % host_count:
    raise ValueError(f"batch size {batch_size} must divide by the host count {host_count}")
  order = np.asarray(order)
  stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
  per_host = batch_size // host_count
  mine = []
  for start in range(0, stop, batch_size):
    indices = order[start: min(start + batch_size, stop)]
    mine.append(indices[host_id * per_host: (host_id + 1) * per_host]
                if len(indices) == batch_size else np.array_split(indices, host_count)[host_id])
  return mine


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
  return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)
