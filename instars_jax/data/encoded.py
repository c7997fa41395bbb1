"""Image splits that stay encoded (on disk, in a record file or a TFDS source) and decode
one example at a time; nothing here holds a decoded split in memory.

A split's `read(i)` decodes example i and gives its evaluation view: as stored when
`image_size` is 0 (every image must then have the first one's shape), else resized and
centre-cropped to image_size (augment.resize_center_crop). A corrupt image raises
DatasetError naming it; with `skip_corrupt` it is reported once (a logging warning naming the
file) and the next readable example of the split stands in for it.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, UnidentifiedImageError

from instars_jax.data import augment
from instars_jax.data.splits import DatasetError, mode_of

GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "F")
logger = logging.getLogger("instars_jax")


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
  return mode_of(pixels.shape), pixels.shape


def _detail(error: Exception) -> str:
  if isinstance(error, UnidentifiedImageError):  # its message names an in-memory buffer
    return "not an image format Pillow can read"
  return str(error)
