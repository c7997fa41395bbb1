"""`npz:/path/file.npz`: arrays x_train, y_train, x_test, y_test (uint8 images, [N, H, W] or
[N, H, W, C]). Held in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from instars_jax.data.splits import Dataset, DatasetError, Options, Split, mode_of, stats_for

PREFIX = "npz:"  # the config.dataset values this source reads, after this prefix


def load(spec: str, options: Options) -> Dataset:
  del options
  path = spec
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
  shape = arrays["x_train"].shape[1:]
  stats = stats_for(mode_of(shape), shape)
  return Dataset(f"npz:{path}", Split(arrays["x_train"], arrays["y_train"].astype(np.int32)),
                 Split(arrays["x_test"], arrays["y_test"].astype(np.int32)), num_classes, stats)
