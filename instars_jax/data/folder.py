"""`folder:PATH`: an ImageFolder tree, PATH/train/<class>/*.{jpg,png,...} and PATH/val/ or
PATH/test/ with the same class folders. Labels are the sorted class names' positions;
grayscale or RGB is read off the first training image. Decoded on demand (encoded.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from instars_jax.data.encoded import EncodedImages, image_mode
from instars_jax.data.splits import Dataset, DatasetError, Options, Split, stats_for

PREFIX = "folder:"  # the config.dataset values this source reads, after this prefix

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEST_FOLDERS = ("val", "test")


def load(spec: str, options: Options) -> Dataset:
  train, test, classes = folder_splits(spec, options.image_size, options.skip_corrupt)
  images = train[0]
  return Dataset(f"folder:{spec}", Split(*train), Split(*test), len(classes),
                 stats_for(images.mode, images.shape), tuple(classes))


class FolderImages(EncodedImages):
  def __init__(self, root: Path, names: np.ndarray, **kwargs):
    super().__init__(len(names), **kwargs)
    self.root, self.names = root, names

  def encoded(self, index: int) -> bytes:
    return (self.root / self.names[index].decode()).read_bytes()

  def where(self, index: int) -> str:
    return str(self.root / self.names[index].decode())


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
