"""`cifar10`, `imagenet2012`, `tfds:<name>`: TFDS datasets read through `tfds.data_source`
(random access, no TensorFlow needed to read), their images decoded on demand (encoded.py);
the labels are read once without decoding any image and cached. Preparing a TFDS dataset
(download_and_prepare) needs TensorFlow and network access, and ImageNet needs its manual
download. imagenet2012's images are resized and centre-cropped to 224 unless `image_size`
says otherwise. Its settings (config.sources.tfds) name the TFDS splits read as the training
and test sets; an empty test_split reads imagenet2012's "validation", every other's "test".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from instars_jax.data.encoded import RecordImages, image_mode
from instars_jax.data.splits import (Dataset, DatasetError, Options, Split, default_cache_dir,
                                     stats_for)

NAMES = ("cifar10", "imagenet2012")  # the config.dataset values this source reads
PREFIX = "tfds:"  # and those it reads after this prefix
DEFAULTS = {"train_split": "train", "test_split": ""}

IMAGENET_SIZE = 224


def load(spec: str, options: Options, train_split: str = "train",
         test_split: str = "") -> Dataset:
  name = spec
  test_split = test_split or ("validation" if name == "imagenet2012" else "test")
  try:
    import tensorflow_datasets as tfds
  except ImportError as error:
    raise DatasetError(f"TFDS dataset {name!r} needs tensorflow-datasets: {error}") from None
  image_size = options.image_size or (IMAGENET_SIZE if name == "imagenet2012" else 0)
  splits = {}
  for split, tfds_split in (("train", train_split), ("test", test_split)):
    try:
      source = tfds.data_source(name, split=tfds_split, data_dir=options.data_dir or None,
                                download=False, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as error:
      raise DatasetError(f"TFDS dataset {name!r} is not prepared in "
                         f"{options.data_dir or 'the default TFDS data_dir'}: prepare it with "
                         f"TensorFlow installed (`tfds build {name}`; ImageNet needs its manual "
                         f"download), or set data_dir. ({type(error).__name__}: {error})") from None
    labels = _labels(source, f"{name}_{split}", options.cache_dir)
    where = f"TFDS {name} {tfds_split}"
    mode, shape = image_mode(source[0]["image"], f"{where} record 0")
    splits[split] = (RecordImages(source, where, "image", mode=mode, shape=shape,
                                  image_size=image_size, skip_corrupt=options.skip_corrupt),
                     labels)
  num_classes = int(max(splits["train"][1].max(), splits["test"][1].max())) + 1
  images = splits["train"][0]
  return Dataset(name, Split(*splits["train"]), Split(*splits["test"]), num_classes,
                 stats_for(images.mode, images.shape))


def _labels(source, name: str, cache_dir: str) -> np.ndarray:
  """The labels of a TFDS data source opened with SkipDecoding: read once (the images stay
  encoded bytes) and cached as .npy in the cache directory."""
  cache = (Path(cache_dir) if cache_dir else default_cache_dir()) / \
      f"tfds_{name}_{len(source)}_labels.npy"
  if cache.exists():
    return np.load(cache)
  labels = np.fromiter((int(source[i]["label"]) for i in range(len(source))), np.int32,
                       len(source))
  try:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + f".{os.getpid()}.tmp.npy")
    np.save(tmp, labels)
    os.replace(tmp, cache)
  except OSError:
    pass  # an unwritable cache costs the next run one more pass over the labels
  return labels
