"""Every batch on grain: the training input pipeline (decode, augment and batch off the
training loop), and the plain batches of evaluation, the σ-table updates and the estimators.

The stream is one grain MapDataset over the run's global steps; element s is this host's
share of global batch s (epoch s // steps_per_epoch, the epoch order of splits.epoch_order),
decoded and augmented (augment.py) from (seed, epoch, example index) alone. So the stream is
a pure function of the step: its state is the step (which the orbax checkpoint holds), a
resumed run restarts it at the checkpoint's step, and neither the batches nor where a resume
lands depend on `input.workers`, `input.threads` or the host count. (grain's own iterator
state records the worker layout, so a checkpoint of it could not move between worker counts.)

`input.workers` processes decode and augment whole batches (grain's mp_prefetch), each
reading its own slice of the steps, and `input.threads` threads per process prefetch
`input.prefetch` batches ahead. Batches carry the examples' split indices (the σ table's
rows) and uint8 images; the train step scales them to [0, 1] on the device.

`batches` and `take` read other passes (evaluation, σ-table updates, the estimators' labels and
epochs) through grain too: the split's examples at given indices, float32 in [0, 1], in order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import threading
import time

import numpy as np

from instars_jax.data import augment
from instars_jax.data.splits import Split, batch_indices, epoch_order


@dataclasses.dataclass(frozen=True)
class Batching:
  """How global steps map to training batches: `batch_size` examples per step (all hosts),
  `steps_per_epoch`, the epoch orders and augmentations of `seed`, and the augmentation
  (augment.AUGMENTATIONS) with its output side `image_size`."""
  batch_size: int
  steps_per_epoch: int
  seed: int
  augmentation: str = "none"
  image_size: int = 0

  @classmethod
  def from_config(cls, config, steps_per_epoch: int) -> "Batching":
    return cls(config.train.batch_size, steps_per_epoch, config.seed, config.train.augment,
               config.image_size)


class StepBatches:
  """grain map function: global step -> this host's batch of it (uint8 image, label, index)."""

  def __init__(self, split: Split, batching: Batching, host_id: int = 0, host_count: int = 1):
    if batching.batch_size % host_count:
      raise ValueError(f"batch size {batching.batch_size} must divide by the host count "
                       f"{host_count}")
    self.split = split
    self.batch_size, self.steps_per_epoch = batching.batch_size, batching.steps_per_epoch
    self.seed, self.augmentation, self.image_size = (batching.seed, batching.augmentation,
                                                     batching.image_size)
    self.per_host, self.host_id = batching.batch_size // host_count, host_id
    self._order = (None, None)  # (epoch, its order): one permutation per epoch per process

  def order(self, epoch: int) -> np.ndarray:
    if self._order[0] != epoch:
      self._order = (epoch, epoch_order(len(self.split), self.seed, epoch, shuffle=True))
    return self._order[1]

  def indices(self, step: int) -> np.ndarray:
    epoch, batch = divmod(int(step), self.steps_per_epoch)
    start = batch * self.batch_size + self.host_id * self.per_host
    return self.order(epoch)[start: start + self.per_host]

  def __call__(self, step: int) -> dict:
    epoch = int(step) // self.steps_per_epoch
    raw = self.augmentation == "random_resized_crop"
    indices = self.indices(step)
    images, origins = [], []
    for i in indices:
      pixels, origin = self.split.read(int(i), raw=raw)
      images.append(augment.train_view(pixels, self.augmentation, (self.seed, epoch, int(i)),
                                       self.image_size))
      origins.append(origin)
    return {"image": np.stack(images), "label": self.split.labels[np.array(origins)],
            "index": indices.astype(np.int32)}


def take(split: Split, index_batches, settings=None):
  """An iterator over split.take(indices) for each of `index_batches`, in their order, read
  ahead by `settings` (config.input's threads and prefetch; None: on the caller's thread)."""
  import grain
  dataset = grain.MapDataset.source(list(index_batches)).map(split.take)
  threads, prefetch = (settings.threads, settings.prefetch) if settings is not None else (0, 0)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                        prefetch_buffer_size=prefetch)))


def batches(split: Split, batch_size: int, *, order=None, seed: int = 0, epoch: int = 0,
            shuffle: bool = False, drop_remainder: bool = False, host_id: int = 0,
            host_count: int = 1, settings=None):
  """This host's slices of the global batches of `batch_size` examples (splits.batch_indices),
  taken in `order` (split indices), else in the epoch's order of (seed, epoch)."""
  if order is None:
    order = epoch_order(len(split), seed, epoch, shuffle)
  return take(split, batch_indices(order, batch_size, drop_remainder=drop_remainder,
                                   host_id=host_id, host_count=host_count), settings)


@contextlib.contextmanager
def train_stream(batches: StepBatches, first_step: int, total_steps: int, settings):
  """An iterator over the batches of steps [first_step, total_steps), prefetched per
  `settings` (config.input: workers, threads, prefetch); closed on leaving the block."""
  import grain
  dataset = grain.MapDataset.range(first_step, total_steps).map(batches)
  stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=settings.threads,
                                                     prefetch_buffer_size=settings.prefetch))
  if settings.workers:
    _parse_absl_flags()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=settings.workers),
                                worker_init_fn=_exit_with_trainer)
  iterator = iter(stream)
  try:
    yield iterator
  finally:
    iterator.close()
    del iterator, stream
    gc.collect()  # worker handles left to interpreter shutdown print spurious errors
    _release_shared_memory()


def _release_shared_memory() -> None:
  """Waits for grain's background unlinking of the shared memory that carried the workers'
  batches, and unlinks what is left in the foreground from then on: a batch still held when
  training fails would otherwise outlive the unlinking thread, and the resource tracker
  would report it as leaked at exit, after the run's one-line error."""
  from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
  deleter = SharedMemoryArray._del_thread_pool  # noqa: SLF001 (grain has no public hook)
  if deleter is not None:
    deleter.close()
    deleter.join()
    SharedMemoryArray._disable_async_del()  # noqa: SLF001


class WaitClock:
  """Wraps an iterator, adding up the seconds its consumer waits in `next`."""

  def __init__(self):
    self.seconds = 0.0

  def __call__(self, iterable):
    iterator = iter(iterable)
    while True:
      began = time.perf_counter()
      try:
        item = next(iterator)
      except StopIteration:
        return
      finally:
        self.seconds += time.perf_counter() - began
      yield item


def _exit_with_trainer(worker_index: int, worker_count: int) -> None:
  """Runs in each worker process: it ends itself once the trainer that started it is gone.
  A trainer killed with SIGKILL cannot stop its workers, which would live on as orphans."""
  trainer = os.getppid()

  def watch():
    while os.getppid() == trainer:
      time.sleep(0.5)
    os._exit(0)

  threading.Thread(target=watch, name="exit-with-trainer", daemon=True).start()


def _parse_absl_flags() -> None:
  """grain's worker processes read absl flags; a notebook or test never parsed any."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def validate(config) -> list:
  """(ok, message) checks of the input settings."""
  i = config.input
  return [
      (config.train.augment in augment.AUGMENTATIONS,
       f"train.augment must be one of {augment.AUGMENTATIONS}; got {config.train.augment!r}"),
      (config.train.augment != "random_resized_crop" or config.image_size > 0,
       "train.augment=random_resized_crop needs image_size > 0 (the crop's side, e.g. 224)"),
      (config.corrupt_images in ("fail", "skip"),
       f"corrupt_images must be 'fail' or 'skip'; got {config.corrupt_images!r}"),
      (config.image_size >= 0, f"image_size must be >= 0; got {config.image_size}"),
      (i.workers >= 0 and i.threads >= 0 and i.prefetch >= 0,
       f"input.workers, input.threads and input.prefetch must be >= 0; got {i.workers}, "
       f"{i.threads}, {i.prefetch}"),
  ]
