"""Image splits that stay encoded on disk and decode one example at a time.

  folder:PATH        an ImageFolder tree: PATH/train/<class>/*.{jpg,png,...} and PATH/val/ or
                     PATH/test/ with the same class folders; labels are the sorted class names'
                     positions; grayscale or RGB is read off the first training image.
  array_record:PATH  PATH/{train,test}.array_record of encoded images (one record each), their
                     labels in PATH/{train,test}_labels.npy and PATH/meta.json: written by
                     `python -m instars_jax.convert SOURCE PATH` from a folder tree or an npz.
  TFDS               the images of a `tfds.data_source` opened with SkipDecoding (see data.py),
                     so that reading its labels never decodes an image.

Nothing here holds a decoded split in memory. A split's `read(i)` decodes example i and gives
its evaluation view: as stored when `image_size` is 0 (every image must then have the first
one's shape), else resized and centre-cropped to image_size (augment.resize_center_crop).
A corrupt image raises DatasetError naming it; with `skip_corrupt` it is reported once (a
logging warning naming the file) and the next readable example of the split stands in for it.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from instars_jax import augment

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEST_FOLDERS = ("val", "test")
GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
logger = logging.getLogger("instars_jax")


class DatasetError(ValueError):
  """A dataset that cannot be found or read; the message says what to install or set."""


class EncodedImages:
  """Random access to one split of encoded images; subclasses say where example i's bytes are
  (`encoded`) and how to name it in an error (`where`)."""

  def __init__(self, count: int, mode: str, shape: tuple, image_size: int, skip_corrupt: bool):
    self.count, self.mode, self.shape = count, mode, tuple(shape)
    self.image_size, self.skip_corrupt = image_size, skip_corrupt
    self._reported = set()

  def __len__(self) -> int:
    return self.count

  def encoded(self, index: int) -> bytes:
    raise NotImplementedError

  def where(self, index: int) -> str:
    raise NotImplementedError

  def decode(self, index: int) -> np.ndarray:
    """Example `index` as stored (uint8, HW or HWC), or DatasetError naming a corrupt file."""
    return decode_image(self.encoded(index), self.where(index), self.mode)

  def read(self, index: int, raw: bool = False) -> tuple[np.ndarray, int]:
    """(pixels, j): the decoded example j = index, or with skip_corrupt the first readable one
    after it; its evaluation view unless `raw`."""
    for j in (int(index) + k for k in range(self.count)):
      j %= self.count
      try:
        pixels = self.decode(j)
      except DatasetError as error:
        if not self.skip_corrupt:
          raise
        if j not in self._reported:
          self._reported.add(j)
          logger.warning("skipping %s (the next readable image stands in for it)", error)
        continue
      return (pixels if raw else self.view(pixels, j)), j
    raise DatasetError(f"no readable image in the split of {self.where(0)}")

  def view(self, pixels: np.ndarray, index: int) -> np.ndarray:
    if self.image_size:
      return augment.resize_center_crop(pixels, self.image_size)
    if pixels.shape != self.shape:
      raise DatasetError(f"{self.where(index)} is {pixels.shape[1]}x{pixels.shape[0]}, unlike the "
                         f"first training image ({self.shape[1]}x{self.shape[0]}): set image_size "
                         "to resize and crop every image to one size")
    return pixels

  def __getstate__(self):  # grain worker processes get a copy; warnings restart there
    return {k: v for k, v in self.__dict__.items() if k != "_reported"} | {"_reported": set()}


class FolderImages(EncodedImages):
  def __init__(self, root: Path, names: np.ndarray, **kwargs):
    super().__init__(len(names), **kwargs)
    self.root, self.names = root, names

  def encoded(self, index: int) -> bytes:
    return (self.root / self.names[index].decode()).read_bytes()

  def where(self, index: int) -> str:
    return str(self.root / self.names[index].decode())


class RecordImages(EncodedImages):
  """A split of a TFDS data source or an array_record file, bytes per record."""

  def __init__(self, records, name: str, field=None, **kwargs):
    super().__init__(len(records), **kwargs)
    self.records, self.name, self.field = records, name, field

  def encoded(self, index: int) -> bytes:
    record = self.records[index]
    return record[self.field] if self.field else record

  def where(self, index: int) -> str:
    return f"{self.name} record {index}"


def decode_image(encoded: bytes, where: str, mode: str = "") -> np.ndarray:
  """uint8 pixels of one encoded image in `mode` ('L' or 'RGB'; "": grayscale stays HW,
  anything else becomes RGB), or DatasetError naming `where`."""
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      mode = mode or ("L" if image.mode in GRAYSCALE_MODES else "RGB")
      return np.asarray(image.convert(mode))
  except (OSError, ValueError, SyntaxError) as error:
    raise DatasetError(f"corrupt image {where}: {_detail(error)}") from None


def image_mode(encoded: bytes, where: str) -> tuple[str, tuple]:
  """('L' or 'RGB', stored shape) of one encoded image."""
  pixels = decode_image(encoded, where)
  return ("L" if pixels.ndim == 2 else "RGB"), pixels.shape


def _detail(error: Exception) -> str:
  if isinstance(error, UnidentifiedImageError):  # its message names an in-memory buffer
    return "not an image format Pillow can read"
  return str(error)


def stats_for(mode: str, shape: tuple) -> str:
  """The models.DATASET_STATS normalization a folder or record dataset uses."""
  if mode == "L":
    return "fashion_mnist"
  return "cifar10" if max(shape[:2]) <= 64 else "imagenet"


# ---------------------------------------------------------------------------
# ImageFolder trees


def folder_splits(root: str, image_size: int, skip_corrupt: bool):
  """(train, test, classes) of the ImageFolder tree at `root`, as FolderImages and labels."""
  root_path = Path(root)
  if not root_path.is_dir():
    raise DatasetError(f"folder dataset {root} is not a directory")
  test_dirs = [root_path / name for name in TEST_FOLDERS if (root_path / name).is_dir()]
  if not (root_path / "train").is_dir() or not test_dirs:
    raise DatasetError(f"folder dataset {root} needs train/ and val/ or test/ subfolders, one "
                       "folder of images per class in each")
  train_dir, test_dir = root_path / "train", test_dirs[0]
  classes = _class_folders(train_dir)
  test_classes = _class_folders(test_dir)
  if classes != test_classes:
    only_train = sorted(set(classes) - set(test_classes))
    only_test = sorted(set(test_classes) - set(classes))
    raise DatasetError(f"class folders of {train_dir} and {test_dir} differ: only in train "
                       f"{only_train[:5]}, only in {test_dir.name} {only_test[:5]}")
  listed = {split: _image_files(directory, classes)
            for split, directory in (("train", train_dir), ("test", test_dir))}
  first = listed["train"][0][0]
  mode, shape = image_mode((root_path / first.decode()).read_bytes(), str(root_path / first.decode()))
  kwargs = dict(mode=mode, shape=shape, image_size=image_size, skip_corrupt=skip_corrupt)
  splits = {split: (FolderImages(root_path, names, **kwargs), labels)
            for split, (names, labels) in listed.items()}
  return splits["train"], splits["test"], classes


def _class_folders(directory: Path) -> list:
  classes = sorted(d.name for d in directory.iterdir() if d.is_dir())
  if not classes:
    raise DatasetError(f"{directory} has no class folders (expected {directory}/<class>/*.jpg)")
  return classes


def _image_files(directory: Path, classes: list) -> tuple[np.ndarray, np.ndarray]:
  """(names relative to the tree's root, as bytes; int32 labels), by class then file name."""
  names, labels = [], []
  for label, name in enumerate(classes):
    files = sorted(p.name for p in (directory / name).iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    names += [f"{directory.name}/{name}/{f}".encode() for f in files]
    labels += [label] * len(files)
  if not names:
    raise DatasetError(f"{directory} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class "
                       "folders")
  return np.array(names), np.array(labels, np.int32)


# ---------------------------------------------------------------------------
# array_record


def record_splits(root: str, image_size: int, skip_corrupt: bool):
  """(train, test, classes) of an array_record dataset written by `write_records`."""
  import grain
  root_path = Path(root)
  meta_path = root_path / "meta.json"
  if not meta_path.exists():
    raise DatasetError(f"array_record dataset {root} lacks meta.json: write it with "
                       "`python -m instars_jax.convert SOURCE OUT_DIR`")
  meta = json.loads(meta_path.read_text())
  splits = {}
  for split in ("train", "test"):
    path, labels_path = root_path / f"{split}.array_record", root_path / f"{split}_labels.npy"
    if not path.exists() or not labels_path.exists():
      raise DatasetError(f"array_record dataset {root} lacks {path.name} or {labels_path.name}")
    try:
      records = grain.sources.ArrayRecordDataSource(str(path))
      labels = np.load(labels_path).astype(np.int32)
    except Exception as error:  # noqa: BLE001 (array_record raises bare RuntimeErrors)
      raise DatasetError(f"cannot read {path}: {str(error).splitlines()[0][:160]}") from None
    if len(records) != len(labels):
      raise DatasetError(f"{path} holds {len(records)} records but {labels_path.name} "
                         f"{len(labels)} labels")
    splits[split] = (RecordImages(records, str(path), mode=meta["mode"], shape=meta["shape"],
                                  image_size=image_size, skip_corrupt=skip_corrupt), labels)
  return splits["train"], splits["test"], meta["classes"]


def write_records(train, test, classes, mode: str, shape, out: Path) -> None:
  """Writes `out` as an array_record dataset; train and test are (encoded bytes per example,
  labels) pairs. Each file is written under a temporary name and renamed when complete."""
  from array_record.python.array_record_module import ArrayRecordWriter
  out.mkdir(parents=True, exist_ok=True)
  for split, (images, labels) in (("train", train), ("test", test)):
    tmp = out / f".{split}.array_record.tmp"
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    for encoded in images:
      writer.write(encoded)
    writer.close()
    np.save(out / f"{split}_labels.npy", np.asarray(labels, np.int32))
    tmp.rename(out / f"{split}.array_record")
  (out / "meta.json").write_text(json.dumps({"classes": list(classes), "mode": mode,
                                             "shape": list(shape)}) + "\n")
