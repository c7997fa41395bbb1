"""Image transforms of the input pipeline, on the host, in numpy (uint8 in, uint8 out).

Training augmentations draw from `example_rng(seed, epoch, index)`, so the augmented view of
example `index` in `epoch` is a pure function of those three numbers: it does not depend on
batch size, worker count, host count or on where a run was resumed.

  crop_flip            Cohen et al.'s CIFAR-10 augmentation: a random 32x32 crop of the image
                       zero-padded by 4 pixels, then a horizontal flip with probability 1/2.
  random_resized_crop  torchvision's RandomResizedCrop(size) (area scale 0.08-1, aspect ratio
                       3/4-4/3, 10 tries, else a central crop) then RandomHorizontalFlip: the
                       ImageNet training transform of Cohen et al. and most of the field.
Evaluation (`resize_center_crop`): resize the shorter side to size·256/224, then crop the
central size x size (torchvision's Resize(256) + CenterCrop(224) at size 224).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from instars_jax.smoothing.streams import Stream, numpy_rng

AUGMENTATIONS = ("none", "crop_flip", "random_resized_crop")
CIFAR_PAD = 4


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  return numpy_rng(seed, Stream.AUGMENT, epoch, index)


def crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int = CIFAR_PAD) -> np.ndarray:
  height, width = image.shape[:2]
  padding = ((pad, pad), (pad, pad)) + ((0, 0),) * (image.ndim - 2)
  top, left = rng.integers(0, 2 * pad + 1, size=2)
  crop = np.pad(image, padding)[top: top + height, left: left + width]
  return crop[:, ::-1] if rng.random() < 0.5 else crop


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  height, width = image.shape[:2]
  box = _central_box(height, width, ratio)
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      box = (left, top, left + w, top + h)
      break
  crop = _resize(image, (size, size), box)
  return crop[:, ::-1] if rng.random() < 0.5 else crop


def _central_box(height: int, width: int, ratio) -> tuple:
  """torchvision's fallback: the largest central crop whose aspect ratio lies within `ratio`."""
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif aspect > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return (left, top, left + w, top + h)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  height, width = image.shape[:2]
  short = round(size * 256 / 224)
  scale = short / min(height, width)
  resized = (max(short, round(width * scale)), max(short, round(height * scale)))
  left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
  return _resize(image, resized)[top: top + size, left: left + size]


def _resize(image: np.ndarray, size_wh: tuple, box=None) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize(size_wh, Image.BILINEAR, box=box))


def train_view(image: np.ndarray, augment: str, key: tuple, size: int) -> np.ndarray:
  """The training view of one decoded image under `augment` (see the module docstring), drawn
  from example_rng(*key) with key = (seed, epoch, index); `size` is the output side for
  random_resized_crop."""
  if augment == "crop_flip":
    return crop_flip(image, example_rng(*key))
  if augment == "random_resized_crop":
    return random_resized_crop(image, example_rng(*key), size)
  return image
