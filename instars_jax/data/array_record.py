"""`array_record:PATH`: PATH/{train,test}.array_record of encoded images (one record each),
their labels in PATH/{train,test}_labels.npy and PATH/meta.json, written by
`python -m instars_jax.convert SOURCE PATH` from any other source. Decoded on demand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from instars_jax.data.encoded import RecordImages
from instars_jax.data.splits import Dataset, DatasetError, Options, Split, stats_for

PREFIX = "array_record:"  # the config.dataset values this source reads, after this prefix


def load(spec: str, options: Options) -> Dataset:
  train, test, classes = record_splits(spec, options.image_size, options.skip_corrupt)
  images = train[0]
  return Dataset(f"array_record:{spec}", Split(*train), Split(*test), len(classes),
                 stats_for(images.mode, images.shape), tuple(classes))


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
