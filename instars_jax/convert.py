"""`python -m instars_jax.convert SOURCE OUT_DIR`: writes a dataset as array_record files.

SOURCE is any `config.dataset` value (folder:PATH, npz:PATH, fashion_mnist, ...). Images of a
folder tree keep their encoded bytes; images held as arrays are stored as PNG (lossless).
The result is read with `--config.dataset=array_record:OUT_DIR` (instars_jax/data/array_record.py).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

from instars_jax import data
from instars_jax.data import array_record, encoded


def _png(pixels) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def _encoded(split):
  if isinstance(split.images, encoded.EncodedImages):
    return (split.images.encoded(i) for i in range(len(split)))
  return (_png(split.read(i)[0]) for i in range(len(split)))


def convert(source: str, out: str) -> str:
  dataset = data.load_dataset(source)
  first = dataset.train.read(0)[0]
  array_record.write_records((_encoded(dataset.train), dataset.train.labels),
                        (_encoded(dataset.test), dataset.test.labels),
                        dataset.classes or [str(c) for c in range(dataset.num_classes)],
                        "L" if first.ndim == 2 else "RGB", first.shape, Path(out))
  return f"wrote {len(dataset.train)} + {len(dataset.test)} examples of {source} to {out}"


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2:
    print("usage: python -m instars_jax.convert SOURCE OUT_DIR  (SOURCE: folder:PATH, npz:PATH, "
          "...)", file=sys.stderr)
    return 2
  try:
    print(convert(*argv))
  except (data.DatasetError, OSError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
