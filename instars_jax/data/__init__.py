"""Image-classification datasets, found by name or prefix (`config.dataset`), one module each:

  fashion_mnist          fashion_mnist.py   Debian's IDX files, else TFDS
  cifar10_jpeg           cifar10_jpeg.py    ../shared's JPEG CIFAR-10, decoded once and cached
  npz:/path/file.npz     npz.py             arrays x_train, y_train, x_test, y_test
  folder:DIR             folder.py          an ImageFolder tree, decoded on demand
  array_record:DIR       array_record.py    written by `python -m instars_jax.convert`
  cifar10, imagenet2012, tfds:<name>
                         tfds.py            TFDS data sources, decoded on demand
Each source module names the datasets it reads (a literal NAMES tuple, a PREFIX, or both),
found by name without importing it (plugins.py); `config.dataset = "my_pkg.my_source:SPEC"`
loads an outside module's `load(SPEC, options)`. A source's own settings are a literal
DEFAULTS dict in its module, the config section sources.<module> (configs/default.py gathers
them), passed to its `load` as keyword arguments. Each source decides its normalisation once:
a models.DATASET_STATS name (splits.stats_for) or its own per-channel (mean, std) pair in the
Dataset it returns. The small ones are held
in memory as arrays; the others never hold a decoded split. Then pipeline.py (grain) and
augment.py make the training batches.
"""

from __future__ import annotations

from instars_jax import plugins
from instars_jax.data.pipeline import batches, take
from instars_jax.data.splits import (Dataset, DatasetError, Options, Split, batch_indices,
                                     epoch_order, fewer_examples, hold_out, num_batches)

__all__ = ["Dataset", "DatasetError", "Options", "Split", "batch_indices", "batches",
           "epoch_order", "fewer_examples", "from_config", "hold_out", "load_dataset",
           "num_batches", "take"]


def from_config(config) -> Dataset:
  """The dataset that `config` (dataset, data_dir, cache_dir, ...) names, with the share
  train.holdout of its training examples held out (splits.hold_out) and, with
  train.examples, only that many of the rest kept for training (splits.fewer_examples)."""
  dataset = load_dataset(config.dataset, data_dir=config.data_dir, cache_dir=config.cache_dir,
                         num_classes=config.num_classes, image_size=config.image_size,
                         skip_corrupt=config.corrupt_images == "skip", sources=config.sources)
  dataset = hold_out(dataset, config.train.holdout, config.seed)
  return fewer_examples(dataset, config.train.examples, config.seed)


def load_dataset(name: str, *, data_dir: str = "", cache_dir: str = "", num_classes: int = 0,
                 image_size: int = 0, skip_corrupt: bool = False, sources=None) -> Dataset:
  """The dataset `name` (see the module docstring); num_classes 0 means infer it; `sources`
  maps a source module to its own settings (config.sources; absent: its DEFAULTS)."""
  module, spec = _source(name)
  settings = dict((sources or {}).get(module, {}))
  options = Options(data_dir, cache_dir, image_size, skip_corrupt)
  try:
    source = plugins.load(__name__, module)
  except ImportError as error:
    raise DatasetError(f"cannot import the dataset source {module!r}: {error}") from None
  dataset = source.load(spec, options, **settings)
  if num_classes:
    seen = int(max(dataset.train.labels.max(), dataset.test.labels.max())) + 1
    if num_classes < seen:
      raise DatasetError(f"num_classes={num_classes} but {name} has labels up to {seen - 1}")
    dataset.num_classes = num_classes
  return dataset


def _source(name: str) -> tuple[str, str]:
  """(module, what it reads) of the dataset `name`: a source's NAMES entry, a name after its
  PREFIX, or "dotted.module:SPEC"."""
  known = []
  for module in plugins.names(__name__):
    declared = plugins.literals(plugins.source_path(__name__, module), "NAMES", "PREFIX")
    prefix = declared.get("PREFIX")
    if name in declared.get("NAMES", ()):
      return module, name
    if prefix and name.startswith(prefix):
      return module, name[len(prefix):]
    known += list(declared.get("NAMES", ())) + ([f"{prefix}..."] if prefix else [])
  module, _, spec = name.partition(":")
  if "." in module and spec:
    return module, spec
  raise DatasetError(f"unknown dataset {name!r}: use one of {', '.join(known)}, or "
                     "my_pkg.my_source:SPEC")
