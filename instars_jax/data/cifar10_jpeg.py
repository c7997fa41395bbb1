"""`cifar10_jpeg`: CIFAR-10 re-encoded as JPEG (quality 75) in ../shared/data/
cifar10-jpeg-q75.tar.xz (or `data_dir`), laid out as train|test/<class>/NNNN.jpg; decoded once
with Pillow and cached as arrays under `cache_dir`. Held in memory.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from instars_jax.data.splits import (Dataset, DatasetError, Options, Split, default_cache_dir,
                                     stats_for)
from instars_jax.storage.files import write_npz_atomic

NAMES = ("cifar10_jpeg",)  # the config.dataset values this source reads

ARCHIVE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / \
    "cifar10-jpeg-q75.tar.xz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def load(spec: str, options: Options) -> Dataset:
  archive = Path(options.data_dir) if options.data_dir else ARCHIVE
  if archive.is_dir():
    archive = archive / "cifar10-jpeg-q75.tar.xz"
  if not archive.exists():
    raise DatasetError(f"CIFAR-10 JPEG archive not found at {archive}: set data_dir to "
                       "cifar10-jpeg-q75.tar.xz (it lives in ../shared/data/)")
  cache = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
  cached = cache / f"cifar10_jpeg_{archive.stat().st_size}.npz"
  if not cached.exists():
    write_npz_atomic(cached, **decode_archive(archive))
  with np.load(cached) as arrays:
    return Dataset(spec, Split(arrays["x_train"], arrays["y_train"]),
                   Split(arrays["x_test"], arrays["y_test"]), 10,
                   stats_for("RGB", arrays["x_train"].shape[1:]), CLASSES)


def decode_archive(archive: Path) -> dict:
  """Decodes every JPEG with Pillow, ordered by (class, file name) within each split."""
  from PIL import Image
  found = {"train": [], "test": []}
  with tarfile.open(archive) as tar:
    for member in tar:
      parts = Path(member.name).parts
      if not member.isfile() or len(parts) < 3 or parts[-3] not in found:
        continue
      label = CLASSES.index(parts[-2])
      pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
      found[parts[-3]].append((label, parts[-1], pixels))
  arrays = {}
  for split, items in found.items():
    items.sort(key=lambda item: (item[0], item[1]))
    arrays[f"x_{split}"] = np.stack([item[2] for item in items])
    arrays[f"y_{split}"] = np.array([item[0] for item in items], np.int32)
  return arrays
