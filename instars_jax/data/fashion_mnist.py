"""`fashion_mnist`: the IDX files of Debian's `dataset-fashion-mnist` (or `data_dir`); TFDS's
prepared copy otherwise. Held in memory.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from instars_jax.data import tfds
from instars_jax.data.splits import Dataset, DatasetError, Options, Split, stats_for

NAMES = ("fashion_mnist",)  # the config.dataset values this source reads

DIRECTORY = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")


def load(spec: str, options: Options) -> Dataset:
  directory = Path(options.data_dir) if options.data_dir else DIRECTORY
  def find(stem):
    for candidate in (directory / f"{stem}.gz", directory / stem):
      if candidate.exists():
        return candidate
    return None
  files = {s: find(s) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
  if all(files.values()):
    x_train, y_train, x_test, y_test = (read_idx(p) for p in files.values())
    return Dataset(spec, Split(x_train, y_train.astype(np.int32)),
                   Split(x_test, y_test.astype(np.int32)), 10,
                   stats_for("L", x_train.shape[1:]), CLASSES)
  if options.data_dir:
    raise DatasetError(f"Fashion-MNIST IDX files not found in data_dir={options.data_dir}")
  try:
    dataset = tfds.load(spec, Options())
  except DatasetError as error:
    raise DatasetError(f"Fashion-MNIST not found in {DIRECTORY}: install it with "
                       f"`apt-get install -y dataset-fashion-mnist` (or set data_dir); "
                       f"TFDS fallback failed too: {error}") from None
  dataset.classes = CLASSES
  return dataset


def read_idx(path: Path) -> np.ndarray:
  with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
    data = f.read()
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise DatasetError(f"{path} is not an IDX file of unsigned bytes")
  shape = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
