"""Dataset sources, each found by name or prefix: npz, Debian's IDX files, the JPEG CIFAR-10
archive, ImageFolder trees, array_record, TFDS; their errors; deterministic batches."""

import gzip
import io
import logging
import struct
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

from configs import default
from helpers import write_npz, write_tree
from instars_jax import convert, data, models
from instars_jax.data import encoded


def test_npz_source(tmp_path):
  path = write_npz(tmp_path / "toy.npz")
  dataset = data.load_dataset(f"npz:{path}")
  assert dataset.num_classes == 3 and len(dataset.train) == 60 and len(dataset.test) == 20
  assert dataset.image_shape == (28, 28)
  batch = dataset.test.take(np.array([3, 5]))
  assert batch["image"].dtype == np.float32 and 0 <= batch["image"].min() <= batch["image"].max() <= 1
  np.testing.assert_array_equal(batch["index"], [3, 5])
  np.testing.assert_array_equal(batch["label"], [0, 2])
  assert data.load_dataset(f"npz:{path}", num_classes=5).num_classes == 5


def test_npz_errors(tmp_path):
  with pytest.raises(data.DatasetError, match="npz dataset not found"):
    data.load_dataset(f"npz:{tmp_path / 'missing.npz'}")
  np.savez(tmp_path / "partial.npz", x_train=np.zeros((2, 4, 4), np.uint8))
  with pytest.raises(data.DatasetError, match="lacks arrays"):
    data.load_dataset(f"npz:{tmp_path / 'partial.npz'}")
  np.savez(tmp_path / "float.npz", x_train=np.zeros((2, 4, 4)), y_train=np.zeros(2),
           x_test=np.zeros((2, 4, 4)), y_test=np.zeros(2))
  with pytest.raises(data.DatasetError, match="must be uint8"):
    data.load_dataset(f"npz:{tmp_path / 'float.npz'}")
  with pytest.raises(data.DatasetError, match="unknown dataset"):
    data.load_dataset("mnist_typo")
  with pytest.raises(data.DatasetError, match="num_classes=2"):
    data.load_dataset(f"npz:{write_npz(tmp_path / 'toy.npz')}", num_classes=2)


def test_a_source_module_outside_the_package_loads_by_its_dotted_path(tmp_path, monkeypatch):
  (tmp_path / "my_sources").mkdir()
  (tmp_path / "my_sources" / "__init__.py").write_text("")
  (tmp_path / "my_sources" / "arrays.py").write_text(
      "import dataclasses\n"
      "from instars_jax.data import npz\n"
      "def load(spec, options):\n"
      "  return dataclasses.replace(npz.load(spec, options), stats=((0.5,), (0.25,)))\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  path = write_npz(tmp_path / "toy.npz", n_train=12, n_test=4)
  dataset = data.load_dataset(f"my_sources.arrays:{path}")
  assert (len(dataset.train), len(dataset.test)) == (12, 4)
  # Its own normalisation, with no entry in models.DATASET_STATS, reaches the model.
  model = models.create_model("lenet", 10, "float32", dataset.stats)
  assert (model.mean, model.std) == ((0.5,), (0.25,))
  for bad in ("no_such_stats", ((0.5,), (0.0,)), ((0.5, 0.4), (0.2,))):
    with pytest.raises(ValueError, match="normalization stats"):
      models.create_model("lenet", 10, "float32", bad)
  with pytest.raises(data.DatasetError, match="cannot import the dataset source 'no_such.pkg'"):
    data.load_dataset("no_such.pkg:x")


def test_fashion_mnist_idx_reader(tmp_path):
  def idx(array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()
  rng = np.random.default_rng(0)
  images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
  for prefix in ("train", "t10k"):
    (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(images)))
    (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(labels))
  dataset = data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  np.testing.assert_array_equal(dataset.train.images, images)
  np.testing.assert_array_equal(dataset.test.labels, labels)
  assert dataset.stats == "fashion_mnist"
  with pytest.raises(data.DatasetError, match="IDX files not found"):
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "nowhere"))


def test_cifar10_jpeg_decodes_once_and_caches(tmp_path):
  archive = tmp_path / "cifar10-jpeg-q75.tar.xz"
  rng = np.random.default_rng(0)
  with tarfile.open(archive, "w:xz") as tar:
    for split, per_class in (("train", 2), ("test", 1)):
      for cls in ("airplane", "truck"):
        for k in range(per_class):
          buffer = io.BytesIO()
          Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
          info = tarfile.TarInfo(f"{split}/{cls}/{k:04d}.jpg")
          info.size = buffer.tell()
          buffer.seek(0)
          tar.addfile(info, buffer)
  cache = tmp_path / "cache"
  dataset = data.load_dataset("cifar10_jpeg", data_dir=str(archive), cache_dir=str(cache))
  assert dataset.train.images.shape == (4, 32, 32, 3) and dataset.num_classes == 10
  np.testing.assert_array_equal(dataset.train.labels, [0, 0, 9, 9])
  np.testing.assert_array_equal(dataset.test.labels, [0, 9])
  assert len(list(cache.glob("*.npz"))) == 1
  again = data.load_dataset("cifar10_jpeg", data_dir=str(archive), cache_dir=str(cache))
  np.testing.assert_array_equal(again.train.images, dataset.train.images)
  with pytest.raises(data.DatasetError, match="archive not found"):
    data.load_dataset("cifar10_jpeg", data_dir=str(tmp_path / "none.tar.xz"))


def test_folder_source_reads_labels_by_sorted_class_and_decodes_on_demand(tmp_path):
  written = write_tree(tmp_path / "tree")
  dataset = data.load_dataset(f"folder:{tmp_path / 'tree'}")
  assert dataset.classes == ("cat", "dog", "emu") and dataset.num_classes == 3
  assert len(dataset.train) == len(dataset.test) == 12
  assert dataset.image_shape == (10, 12, 3) and dataset.stats == "cifar10"
  np.testing.assert_array_equal(dataset.train.labels, np.repeat([0, 1, 2], 4))
  batch = dataset.test.take(np.array([5, 0]))  # PNG: lossless
  np.testing.assert_array_equal(batch["image"][0] * 255, written[("test", "dog", 1)])
  np.testing.assert_array_equal(batch["label"], [1, 0])
  assert isinstance(dataset.train.images, encoded.EncodedImages)  # nothing decoded up front

  gray = write_tree(tmp_path / "gray", mode="L", test_folder="val")
  dataset = data.load_dataset(f"folder:{tmp_path / 'gray'}")
  assert dataset.image_shape == (10, 12) and dataset.stats == "fashion_mnist"
  np.testing.assert_array_equal(dataset.test.read(11)[0], gray[("val", "emu", 3)])


def test_folder_source_resizes_and_crops_to_image_size(tmp_path):
  write_tree(tmp_path / "tree", size=(50, 30), per_class=1)
  dataset = data.load_dataset(f"folder:{tmp_path / 'tree'}", image_size=16)
  assert dataset.image_shape == (16, 16, 3)
  assert dataset.train.read(0, raw=True)[0].shape == (30, 50, 3)


def test_folder_errors_name_the_problem(tmp_path):
  with pytest.raises(data.DatasetError, match="is not a directory"):
    data.load_dataset(f"folder:{tmp_path / 'nowhere'}")
  (tmp_path / "flat" / "train").mkdir(parents=True)
  with pytest.raises(data.DatasetError, match="needs train/ and val/ or test/"):
    data.load_dataset(f"folder:{tmp_path / 'flat'}")
  for split in ("train", "test"):
    (tmp_path / "empty" / split / "a").mkdir(parents=True)
    (tmp_path / "empty" / split / "a" / "notes.txt").write_text("not an image")
  with pytest.raises(data.DatasetError, match=r"train holds no images \(.jpg"):
    data.load_dataset(f"folder:{tmp_path / 'empty'}")
  write_tree(tmp_path / "mismatch")
  (tmp_path / "mismatch" / "test" / "emu").rename(tmp_path / "mismatch" / "test" / "gnu")
  with pytest.raises(data.DatasetError, match=r"differ: only in train \['emu'\], only in test "
                                              r"\['gnu'\]"):
    data.load_dataset(f"folder:{tmp_path / 'mismatch'}")
  write_tree(tmp_path / "sizes", per_class=2)
  Image.new("RGB", (7, 7)).save(tmp_path / "sizes" / "test" / "cat" / "0001.png")
  dataset = data.load_dataset(f"folder:{tmp_path / 'sizes'}")
  with pytest.raises(data.DatasetError, match=r"test/cat/0001.png is 7x7, unlike the first "
                                              r"training image \(12x10\): set image_size"):
    dataset.test.take(np.arange(4))


def test_a_corrupt_image_is_named_or_skipped(tmp_path, caplog):
  write_tree(tmp_path / "tree", suffix=".jpg")
  bad = tmp_path / "tree" / "train" / "dog" / "0002.jpg"
  bad.write_bytes(bad.read_bytes()[:40])  # a truncated JPEG
  dataset = data.load_dataset(f"folder:{tmp_path / 'tree'}")
  with pytest.raises(data.DatasetError, match=f"corrupt image {bad}"):
    dataset.train.take(np.arange(12))
  skipping = data.load_dataset(f"folder:{tmp_path / 'tree'}", skip_corrupt=True)
  with caplog.at_level(logging.WARNING, logger="instars_jax"):
    batch = skipping.train.take(np.arange(12))
    skipping.train.take(np.array([6]))
  reports = [r for r in caplog.records if str(bad) in r.getMessage()]
  assert len(reports) == 1  # reported once, however often it is read
  np.testing.assert_array_equal(batch["image"][6], batch["image"][7])  # the next stands in
  np.testing.assert_array_equal(batch["index"], np.arange(12))
  assert batch["label"][6] == 1


def test_array_record_round_trip_from_npz_and_folder(tmp_path):
  npz = write_npz(tmp_path / "toy.npz", n_train=20, n_test=6, shape=(8, 8, 3))
  assert convert.main([f"npz:{npz}", str(tmp_path / "rec")]) == 0
  arrays, records = data.load_dataset(f"npz:{npz}"), data.load_dataset(
      f"array_record:{tmp_path / 'rec'}")
  for a, b in ((arrays.train, records.train), (arrays.test, records.test)):
    np.testing.assert_array_equal(a.take(np.arange(len(a)))["image"],
                                  b.take(np.arange(len(b)))["image"])
    np.testing.assert_array_equal(a.labels, b.labels)
  assert records.image_shape == (8, 8, 3) and records.num_classes == arrays.num_classes == 3

  write_tree(tmp_path / "tree", suffix=".jpg")
  assert convert.main([f"folder:{tmp_path / 'tree'}", str(tmp_path / "rec2")]) == 0
  folder = data.load_dataset(f"folder:{tmp_path / 'tree'}")
  again = data.load_dataset(f"array_record:{tmp_path / 'rec2'}")
  assert again.classes == ("cat", "dog", "emu")
  np.testing.assert_array_equal(folder.train.take(np.arange(12))["image"],
                                again.train.take(np.arange(12))["image"])  # the same JPEG bytes
  with pytest.raises(data.DatasetError, match="lacks meta.json"):
    data.load_dataset(f"array_record:{tmp_path}")
  assert convert.main([f"folder:{tmp_path / 'nowhere'}", str(tmp_path / "rec3")]) == 2


def test_tfds_labels_are_read_without_decoding_images(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (10, 6, 6, 3), dtype=np.uint8)
  encoded = []
  for p in pixels:
    buffer = io.BytesIO()
    Image.fromarray(p).save(buffer, format="PNG")
    encoded.append(buffer.getvalue())
  calls = []

  def data_source(name, *, split, decoders, **kwargs):
    calls.append((split, decoders))
    return [{"image": e, "label": i % 4} for i, e in enumerate(encoded)]

  monkeypatch.setattr(tfds, "data_source", data_source)
  dataset = data.load_dataset("tfds:toy", cache_dir=str(tmp_path))
  assert all(isinstance(d["image"], tfds.decode.SkipDecoding) for _, d in calls)
  assert [split for split, _ in calls] == ["train", "test"]
  np.testing.assert_array_equal(dataset.train.labels, np.arange(10) % 4)
  np.testing.assert_array_equal(dataset.test.read(3)[0], pixels[3])
  assert list(tmp_path.glob("tfds_toy_train_10_labels.npy"))  # read once, then cached
  # The source's own section (config.sources.tfds) picks the splits it reads.
  config = default.get_config()
  config.sources.tfds.test_split = "train[:50%]"
  calls.clear()
  data.load_dataset("tfds:toy", cache_dir=str(tmp_path), sources=config.sources)
  assert [split for split, _ in calls] == ["train", "train[:50%]"]
  calls.clear()
  data.load_dataset("imagenet2012", cache_dir=str(tmp_path))
  assert [split for split, _ in calls] == ["train", "validation"]


def test_shuffling_is_a_function_of_seed_and_epoch():
  a = data.epoch_order(100, seed=1, epoch=3, shuffle=True)
  np.testing.assert_array_equal(a, data.epoch_order(100, seed=1, epoch=3, shuffle=True))
  assert not np.array_equal(a, data.epoch_order(100, seed=1, epoch=4, shuffle=True))
  assert sorted(a) == list(range(100))


def test_batches_split_over_hosts_cover_every_example():
  split = data.Split(np.zeros((50, 2, 2), np.uint8), np.arange(50, dtype=np.int32))
  seen = []
  for host in range(2):
    for batch in data.batches(split, 8, seed=0, epoch=1, shuffle=True, drop_remainder=True,
                              host_id=host, host_count=2):
      assert len(batch["index"]) == 4
      seen.extend(batch["index"])
  assert len(seen) == 48 and len(set(seen)) == 48
  whole = list(data.batches(split, 8, shuffle=False))
  assert [len(b["index"]) for b in whole] == [8] * 6 + [2]
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in whole]), np.arange(50))


def test_batches_read_ahead_on_grain_threads_come_in_order():
  split = data.Split(np.arange(40 * 4, dtype=np.uint8).reshape(40, 2, 2),
                     np.arange(40, dtype=np.int32))
  order = data.epoch_order(40, seed=3, epoch=0, shuffle=True)
  read_ahead = types.SimpleNamespace(threads=3, prefetch=5)
  ahead = list(data.batches(split, 6, order=order, settings=read_ahead))
  here = list(data.batches(split, 6, order=order))
  assert len(ahead) == len(here) == 7
  for a, b in zip(ahead, here):
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["image"], split.take(b["index"])["image"])
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in ahead]), order)


def test_holdout_is_a_fixed_draw_kept_out_of_training(tmp_path):
  # round(0.25 · 12) = 3 examples move from train to holdout, the same ones for the same
  # seed, and the two parts partition the training set; on-demand images are read through.
  written = write_tree(tmp_path / "tree")
  full = data.load_dataset(f"folder:{tmp_path / 'tree'}")
  split = data.hold_out(full, 0.25, seed=7)
  assert (len(split.train), len(split.holdout)) == (9, 3)
  again = data.hold_out(full, 0.25, seed=7)
  np.testing.assert_array_equal(split.holdout.take(np.arange(3))["image"],
                                again.holdout.take(np.arange(3))["image"])
  pixels = lambda s: {s.read(i)[0].tobytes() for i in range(len(s))}
  assert pixels(split.train) | pixels(split.holdout) == pixels(full.train)
  assert not pixels(split.train) & pixels(split.holdout)
  labels = sorted(np.concatenate([split.train.labels, split.holdout.labels]))
  np.testing.assert_array_equal(labels, sorted(full.train.labels))
  assert written and data.hold_out(full, 0.0, seed=7) is full
  for fraction in (1.0, -0.1, 0.01):  # all, negative, rounds to none
    with pytest.raises(ValueError, match=rf"train.holdout={fraction} must lie in \[0, 1\)"):
      data.hold_out(full, fraction, seed=7)


def test_fewer_examples_keeps_a_fixed_draw_in_order():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (20, 4, 4), np.uint8)
  full = data.Dataset("toy", data.Split(images, np.arange(20) % 3), data.Split(images[:2],
                      np.zeros(2, int)), 3, "fashion_mnist")
  kept = data.fewer_examples(full, 8, seed=1)
  assert len(kept.train) == 8 and data.fewer_examples(full, 0, seed=1) is full
  rows = [int(np.flatnonzero((images == kept.train.images[i]).all(axis=(1, 2)))[0])
          for i in range(8)]
  assert rows == sorted(rows)  # in their original order
  np.testing.assert_array_equal(kept.train.labels, np.arange(20)[rows] % 3)
  assert data.fewer_examples(full, 8, seed=1).train.images.tobytes() == kept.train.images.tobytes()
  with pytest.raises(ValueError, match=r"train.examples=21 must lie in \[0, 20\]"):
    data.fewer_examples(full, 21, seed=1)
