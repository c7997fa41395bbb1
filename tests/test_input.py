"""The input pipeline: folder / array_record / TFDS sources, augmentation, grain batches."""

import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from configs import default
import instars_jax as ij
from instars_jax import convert, data
from instars_jax.data import augment, encoded, pipeline
from test_data_models import write_npz

ROOT = Path(__file__).resolve().parents[1]


def write_tree(root, classes=("cat", "dog", "emu"), per_class=4, size=(12, 10), mode="RGB",
               test_folder="test", suffix=".png", seed=0):
  """An ImageFolder tree of random images; returns {(split, class, i): pixels}."""
  rng = np.random.default_rng(seed)
  written = {}
  for split in ("train", test_folder):
    for name in classes:
      (root / split / name).mkdir(parents=True, exist_ok=True)
      for i in range(per_class):
        shape = size[::-1] + ((3,) if mode == "RGB" else ())
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name / f"{i:04d}{suffix}")
        written[(split, name, i)] = pixels
  return written


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
  np.testing.assert_array_equal(dataset.train.labels, np.arange(10) % 4)
  np.testing.assert_array_equal(dataset.test.read(3)[0], pixels[3])
  assert list(tmp_path.glob("tfds_toy_train_10_labels.npy"))  # read once, then cached


def test_augmentations_are_functions_of_seed_epoch_and_example():
  image = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
  views = [augment.crop_flip(image, augment.example_rng(0, 1, 7)) for _ in range(2)]
  np.testing.assert_array_equal(*views)
  assert views[0].shape == image.shape
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  windows = [padded[t: t + 32, l: l + 32] for t in range(9) for l in range(9)]
  others = [augment.crop_flip(image, augment.example_rng(0, e, 7)) for e in range(40)]
  for view in others:  # each view is a window of the padded image, possibly mirrored
    assert any(np.array_equal(view, w) or np.array_equal(view, w[:, ::-1]) for w in windows)
  assert len({v.tobytes() for v in others}) > 20

  photo = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
  crops = [augment.random_resized_crop(photo, augment.example_rng(0, e, 3), 224)
           for e in range(20)]
  assert all(c.shape == (224, 224, 3) and c.dtype == np.uint8 for c in crops)
  np.testing.assert_array_equal(
      crops[5], augment.random_resized_crop(photo, augment.example_rng(0, 5, 3), 224))
  assert augment.resize_center_crop(photo, 224).shape == (224, 224, 3)
  # The evaluation transform: shorter side to 256, then the central 224 x 224.
  ramp = np.tile(np.arange(500, dtype=np.float64)[None, :, None], (375, 1, 3))
  center = augment.resize_center_crop((ramp * 255 / 499).astype(np.uint8), 224)
  assert abs(center[:, 112].mean() - 127.5) < 2  # the centre column is the middle of the ramp


def test_random_resized_crop_falls_back_to_a_central_crop():
  # A 400 x 10 strip: no random box fits the ratio range, so the crop is its central 10 x 13.
  strip = np.zeros((400, 10), np.uint8)
  strip[180:220] = 255  # a band around the centre
  crop = augment.random_resized_crop(strip, augment.example_rng(0, 0, 0), 26)
  assert crop.shape == (26, 26) and crop.min() == 255  # only the band is in the crop
  assert augment._central_box(400, 10, (3 / 4, 4 / 3)) == (0, 193, 10, 206)


def grain_settings(**overrides):
  settings = default.get_config().input
  settings.update(overrides)
  return settings


def collect(step_batches, first, total, settings):
  with pipeline.train_stream(step_batches, first, total, settings) as stream:
    return list(stream)


def test_batches_do_not_depend_on_workers_threads_hosts_or_resumption(tmp_path):
  write_tree(tmp_path / "tree", per_class=8, suffix=".jpg")
  split = data.load_dataset(f"folder:{tmp_path / 'tree'}").train
  batching = pipeline.Batching(8, 3, seed=5, augmentation="crop_flip")
  make = lambda host=0, hosts=1: pipeline.StepBatches(split, batching, host, hosts)
  straight = collect(make(), 0, 6, grain_settings(threads=0))
  assert len(straight) == 6 and straight[0]["image"].dtype == np.uint8
  for epoch in (0, 1):  # every example once per epoch
    seen = np.concatenate([b["index"] for b in straight[3 * epoch: 3 * epoch + 3]])
    assert sorted(seen) == list(range(24))
  threaded = collect(make(), 0, 6, grain_settings(threads=3, prefetch=2))
  workers = collect(make(), 0, 6, grain_settings(workers=2))
  resumed = collect(make(), 4, 6, grain_settings(workers=1))
  two_hosts = [collect(make(h, 2), 0, 6, grain_settings()) for h in (0, 1)]
  for i, batch in enumerate(straight):
    for other in (threaded[i], workers[i]) + ((resumed[i - 4],) if i >= 4 else ()):
      for key in batch:
        np.testing.assert_array_equal(batch[key], other[key])
    joined = {k: np.concatenate([two_hosts[0][i][k], two_hosts[1][i][k]]) for k in batch}
    for key in batch:
      np.testing.assert_array_equal(batch[key], joined[key])
  assert not np.array_equal(straight[0]["image"], straight[3]["image"])


def test_a_corrupt_image_in_training_is_one_line_exit_2(tmp_path):
  write_tree(tmp_path / "tree", suffix=".jpg")
  bad = tmp_path / "tree" / "train" / "emu" / "0001.jpg"
  bad.write_bytes(b"not a jpeg at all")
  args = [sys.executable, "train.py", "--config=configs/default.py",
          f"--workdir={tmp_path / 'run'}", f"--config.dataset=folder:{tmp_path / 'tree'}",
          "--config.train.epochs=1", "--config.train.batch_size=4", "--config.input.workers=1",
          "--config.train.eval_examples=4"]
  done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr.strip().splitlines()[-1].startswith(f"error: corrupt image {bad}")
  assert "Traceback" not in done.stderr


def children(pid: int) -> list:
  """Process ids whose parent is `pid` (Linux /proc)."""
  found = []
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
      continue
    if parent == pid:
      found.append(int(stat.parent.name))
  return found


def alive(pid: int) -> bool:
  """Whether `pid` exists and is not a zombie."""
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return False


def test_sigkill_mid_epoch_resumes_to_the_same_parameters_and_sigma_table(tmp_path):
  """A real kill -9 in stage 2 of Insta-RS Train on a folder source, input in a worker
  process; the rerun (input in the trainer this time) ends where the straight run ends."""
  write_tree(tmp_path / "tree", per_class=16, suffix=".jpg")
  def train(workdir, workers, **popen):
    args = [sys.executable, "train.py", "--config=configs/default.py", f"--workdir={workdir}",
            f"--config.dataset=folder:{tmp_path / 'tree'}", "--config.train.epochs=3",
            "--config.train.batch_size=4", "--config.train.insta=True",
            "--config.train.stage1_epochs=1", "--config.train.augment=crop_flip",
            "--config.train.checkpoint_every_steps=1", "--config.train.eval_examples=4",
            f"--config.input.workers={workers}"]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            **popen)
  straight = train(tmp_path / "straight", 0)
  killed = train(tmp_path / "killed", 1)
  interim = tmp_path / "killed" / "interim" / "checkpoints"
  deadline = time.monotonic() + 240
  while killed.poll() is None and time.monotonic() < deadline:
    steps = [int(p.name) for p in interim.glob("*") if p.name.isdigit()] if interim.exists() else []
    if steps and 12 * 1 + 3 <= max(steps) < 12 * 2:  # in epoch 2, the first of stage 2
      workers = children(killed.pid)
      os.kill(killed.pid, signal.SIGKILL)
      break
    time.sleep(0.02)
  assert killed.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
  assert workers, "the killed run had no input worker process"
  deadline = time.monotonic() + 20
  while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(alive(pid) for pid in workers), "the killed trainer's input workers live on"
  assert straight.wait(timeout=240) == 0, straight.stderr.read()[-2000:]
  resumed = train(tmp_path / "killed", 0)
  assert resumed.wait(timeout=240) == 0, resumed.stderr.read()[-2000:]
  a, b = (ij.load_train_state(tmp_path / d) for d in ("straight", "killed"))
  for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(a.sigma_table, b.sigma_table)
  np.testing.assert_array_equal(a.sigma_profile, b.sigma_profile)
  assert int(a.step) == int(b.step) == 36 and np.ptp(np.asarray(a.sigma_profile)) > 0
