"""Image-classification datasets as in-memory or random-access splits, and deterministic batches.

Sources (`config.dataset`):
  fashion_mnist   IDX files of Debian's `dataset-fashion-mnist` (or `data_dir`); TFDS otherwise
  cifar10_jpeg    ../shared/data/cifar10-jpeg-q75.tar.xz (or `data_dir`), decoded once and cached
  npz:/path.npz   arrays x_train, y_train, x_test, y_test (uint8 images, HWC or HW)
  folder:PATH, array_record:PATH
                  encoded images decoded on demand (instars_jax/sources.py)
  cifar10, imagenet2012, tfds:<name>
                  TFDS, read through `tfds.data_source` (random access, no TensorFlow needed
                  to read), images decoded on demand; the labels are read once without
                  decoding any image and cached. Preparing a TFDS dataset (download_and_prepare)
                  needs TensorFlow and network access, and ImageNet needs its manual download.
The small sources (fashion_mnist, cifar10_jpeg, npz) are held in memory as arrays; the others
never hold a decoded split. `image_size` > 0 resizes and centre-crops every image of an
on-demand source to that side (ImageNet: 224); `skip_corrupt` replaces an unreadable image
by the next readable one, with a warning naming it, instead of stopping.

Every example carries its index in its split; shuffling is a pure function of (seed, epoch);
each host reads only its own slice of every global batch.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from instars_jax import sources
from instars_jax.sources import DatasetError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_JPEG_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / \
    "cifar10-jpeg-q75.tar.xz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
IMAGENET_SIZE = 224


@dataclass
class Split:
  """Images (uint8, [N, H, W] or [N, H, W, C]) and labels, addressable by index.

  `images` is an array, or a sources.EncodedImages decoded example by example.
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


@dataclass
class Dataset:
  name: str
  train: Split
  test: Split
  num_classes: int
  stats: str  # the models.DATASET_STATS entry its normalization uses
  classes: tuple = ()  # class names, when the source has them

  @property
  def image_shape(self) -> tuple:
    return self.train.read(0)[0].shape


# ---------------------------------------------------------------------------
# Batches


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  """The example order of one epoch: a pure function of (seed, epoch)."""
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(split: Split, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = False,
            drop_remainder: bool = False, host_id: int = 0, host_count: int = 1,
            order=None) -> Iterator[dict]:
  """Global batches of `batch_size` examples, of which this host yields its contiguous slice.

  The examples come in `order` (split indices) when given, else in the epoch's order."""
  if batch_size % host_count:
    raise ValueError(f"batch size {batch_size} must divide by the host count {host_count}")
  if order is None:
    order = epoch_order(len(split), seed, epoch, shuffle)
  stop = len(order) - len(order) % batch_size if drop_remainder else len(order)
  per_host = batch_size // host_count
  for start in range(0, stop, batch_size):
    indices = order[start: min(start + batch_size, stop)]
    mine = indices[host_id * per_host: (host_id + 1) * per_host] if len(indices) == batch_size \
        else np.array_split(indices, host_count)[host_id]
    yield split.take(mine)


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
  return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


# ---------------------------------------------------------------------------
# Sources


def from_config(config) -> Dataset:
  """The dataset that `config` (dataset, data_dir, cache_dir, ...) names."""
  return load_dataset(config.dataset, data_dir=config.data_dir, cache_dir=config.cache_dir,
                      num_classes=config.num_classes, image_size=config.image_size,
                      skip_corrupt=config.corrupt_images == "skip")


def load_dataset(name: str, *, data_dir: str = "", cache_dir: str = "", num_classes: int = 0,
                 image_size: int = 0, skip_corrupt: bool = False) -> Dataset:
  """The dataset `name` (see the module docstring); num_classes 0 means infer it."""
  on_demand = dict(image_size=image_size, skip_corrupt=skip_corrupt)
  if name == "fashion_mnist":
    dataset = _fashion_mnist(data_dir)
  elif name == "cifar10_jpeg":
    dataset = _cifar10_jpeg(data_dir, cache_dir)
  elif name.startswith("npz:"):
    dataset = _npz(name[4:])
  elif name.startswith("folder:"):
    dataset = _encoded(name, *sources.folder_splits(name[7:], **on_demand))
  elif name.startswith("array_record:"):
    dataset = _encoded(name, *sources.record_splits(name[13:], **on_demand))
  elif name in ("cifar10", "imagenet2012") or name.startswith("tfds:"):
    if name == "imagenet2012":
      on_demand["image_size"] = image_size or IMAGENET_SIZE
    dataset = _tfds(name.removeprefix("tfds:"), data_dir, cache_dir, **on_demand)
  else:
    raise DatasetError(f"unknown dataset {name!r}: use fashion_mnist, cifar10_jpeg, cifar10, "
                       "imagenet2012, npz:/path/file.npz, folder:DIR, array_record:DIR or "
                       "tfds:<name>")
  if num_classes:
    seen = int(max(dataset.train.labels.max(), dataset.test.labels.max())) + 1
    if num_classes < seen:
      raise DatasetError(f"num_classes={num_classes} but {name} has labels up to {seen - 1}")
    dataset.num_classes = num_classes
  return dataset


def _read_idx(path: Path) -> np.ndarray:
  with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
    data = f.read()
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise DatasetError(f"{path} is not an IDX file of unsigned bytes")
  shape = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(data_dir: str) -> Dataset:
  directory = Path(data_dir) if data_dir else FASHION_MNIST_DIR
  def find(stem):
    for candidate in (directory / f"{stem}.gz", directory / stem):
      if candidate.exists():
        return candidate
    return None
  files = {s: find(s) for s in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
  if all(files.values()):
    x_train, y_train, x_test, y_test = (_read_idx(p) for p in files.values())
    return Dataset("fashion_mnist", Split(x_train, y_train.astype(np.int32)),
                   Split(x_test, y_test.astype(np.int32)), 10, "fashion_mnist",
                   FASHION_MNIST_CLASSES)
  if data_dir:
    raise DatasetError(f"Fashion-MNIST IDX files not found in data_dir={data_dir}")
  try:
    dataset = _tfds("fashion_mnist", "", "")
  except DatasetError as error:
    raise DatasetError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: install it with "
                       f"`apt-get install -y dataset-fashion-mnist` (or set data_dir); "
                       f"TFDS fallback failed too: {error}") from None
  dataset.stats, dataset.classes = "fashion_mnist", FASHION_MNIST_CLASSES
  return dataset


def default_cache_dir() -> Path:
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "instars_jax"


def _cifar10_jpeg(data_dir: str, cache_dir: str) -> Dataset:
  archive = Path(data_dir) if data_dir else CIFAR10_JPEG_ARCHIVE
  if archive.is_dir():
    archive = archive / "cifar10-jpeg-q75.tar.xz"
  if not archive.exists():
    raise DatasetError(f"CIFAR-10 JPEG archive not found at {archive}: set data_dir to "
                       "cifar10-jpeg-q75.tar.xz (it lives in ../shared/data/)")
  cache = Path(cache_dir) if cache_dir else default_cache_dir()
  cached = cache / f"cifar10_jpeg_{archive.stat().st_size}.npz"
  if not cached.exists():
    arrays = _decode_cifar10_jpeg(archive)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.stem + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, cached)
  with np.load(cached) as arrays:
    return Dataset("cifar10_jpeg", Split(arrays["x_train"], arrays["y_train"]),
                   Split(arrays["x_test"], arrays["y_test"]), 10, "cifar10", CIFAR10_CLASSES)


def _decode_cifar10_jpeg(archive: Path) -> dict:
  """Decodes every JPEG with Pillow, ordered by (class, file name) within each split."""
  from PIL import Image
  found = {"train": [], "test": []}
  with tarfile.open(archive) as tar:
    for member in tar:
      parts = Path(member.name).parts
      if not member.isfile() or len(parts) < 3 or parts[-3] not in found:
        continue
      label = CIFAR10_CLASSES.index(parts[-2])
      pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
      found[parts[-3]].append((label, parts[-1], pixels))
  arrays = {}
  for split, items in found.items():
    items.sort(key=lambda item: (item[0], item[1]))
    arrays[f"x_{split}"] = np.stack([item[2] for item in items])
    arrays[f"y_{split}"] = np.array([item[0] for item in items], np.int32)
  return arrays


def _npz(path: str) -> Dataset:
  if not Path(path).exists():
    raise DatasetError(f"npz dataset not found: {path}")
  with np.load(path) as f:
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(f.files)
    if missing:
      raise DatasetError(f"{path} lacks arrays {sorted(missing)}")
    arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) != len(y):
      raise DatasetError(f"{path}: x_{split} must be uint8 [N, H, W] or [N, H, W, C] with one "
                         f"label per image; got {x.dtype} {x.shape} and {len(y)} labels")
  num_classes = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
  stats = "fashion_mnist" if arrays["x_train"].ndim == 3 else "cifar10"
  return Dataset(f"npz:{path}", Split(arrays["x_train"], arrays["y_train"].astype(np.int32)),
                 Split(arrays["x_test"], arrays["y_test"].astype(np.int32)), num_classes, stats)


def _encoded(name: str, train, test, classes) -> Dataset:
  """A Dataset of two (EncodedImages, labels) splits."""
  images = train[0]
  return Dataset(name, Split(*train), Split(*test), len(classes),
                 sources.stats_for(images.mode, images.shape), tuple(classes))


def _tfds(name: str, data_dir: str, cache_dir: str, image_size: int = 0,
          skip_corrupt: bool = False) -> Dataset:
  try:
    import tensorflow_datasets as tfds
  except ImportError as error:
    raise DatasetError(f"TFDS dataset {name!r} needs tensorflow-datasets: {error}") from None
  splits = {}
  for split, tfds_split in (("train", "train"), ("test", "validation" if name == "imagenet2012"
                                                   else "test")):
    try:
      source = tfds.data_source(name, split=tfds_split, data_dir=data_dir or None,
                                download=False, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as error:
      raise DatasetError(f"TFDS dataset {name!r} is not prepared in "
                         f"{data_dir or 'the default TFDS data_dir'}: prepare it with TensorFlow "
                         f"installed (`tfds build {name}`; ImageNet needs its manual download), "
                         f"or set data_dir. ({type(error).__name__}: {error})") from None
    labels = _tfds_labels(source, f"{name}_{split}", cache_dir)
    where = f"TFDS {name} {tfds_split}"
    mode, shape = sources.image_mode(source[0]["image"], f"{where} record 0")
    splits[split] = (sources.RecordImages(source, where, "image", mode=mode, shape=shape,
                                          image_size=image_size, skip_corrupt=skip_corrupt),
                     labels)
  num_classes = int(max(splits["train"][1].max(), splits["test"][1].max())) + 1
  stats = {"imagenet2012": "imagenet", "fashion_mnist": "fashion_mnist", "mnist": "fashion_mnist"}
  return Dataset(name, Split(*splits["train"]), Split(*splits["test"]), num_classes,
                 stats.get(name, "cifar10"))


def _tfds_labels(source, name: str, cache_dir: str) -> np.ndarray:
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
