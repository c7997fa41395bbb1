"""The training input pipeline: augmentations keyed by (seed, epoch, example), grain batches
that do not depend on workers, threads, hosts or resumption, and a kill -9 with an input
worker running."""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from configs import default
from helpers import alive, children, start_cli, write_tree
from instars_jax import data
from instars_jax.data import augment, pipeline
from instars_jax.train import loop


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_to_the_same_parameters_and_sigma_table(tmp_path):
  """A real kill -9 of train.py in stage 2 of Insta-RS Train on a folder source, input in a
  worker process; the rerun (here in the test's process, input in the trainer) ends where a
  straight run ends, and the killed trainer's input worker does not live on."""
  write_tree(tmp_path / "tree", per_class=8, suffix=".jpg")  # 6 steps per epoch
  overrides = {"dataset": f"folder:{tmp_path / 'tree'}", "train.epochs": 3,
               "train.batch_size": 4, "train.insta": True, "train.stage1_epochs": 1,
               "train.augment": "crop_flip", "train.checkpoint_every_steps": 1,
               "train.eval_examples": 4}
  killed = start_cli("train.py", "--config=configs/default.py", f"--workdir={tmp_path / 'killed'}",
                     "--config.input.workers=1",
                     *(f"--config.{k}={v}" for k, v in overrides.items()),
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  saved = tmp_path / "killed" / "checkpoints"
  deadline, workers = time.monotonic() + 240, []
  while killed.poll() is None and time.monotonic() < deadline:
    steps = [int(p.name) for p in saved.glob("*") if p.name.isdigit()] if saved.exists() else []
    if steps and 6 + 2 <= max(steps) < 6 * 2:  # in epoch 2, the first of stage 2
      workers = children(killed.pid)
      os.kill(killed.pid, signal.SIGKILL)
      break
    time.sleep(0.02)
  assert killed.wait(timeout=60) == -signal.SIGKILL, killed.stderr.read()[-2000:]
  assert workers, "the killed run had no input worker process"
  deadline = time.monotonic() + 20
  while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(alive(pid) for pid in workers), "the killed trainer's input workers live on"
  config = default.get_config()
  config.update_from_flattened_dict(overrides)
  straight = loop.train_and_evaluate(config, tmp_path / "straight")
  resumed = loop.train_and_evaluate(config, tmp_path / "killed")
  for x, y in zip(jax.tree_util.tree_leaves(straight.params),
                  jax.tree_util.tree_leaves(resumed.params)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(straight.sigma_table, resumed.sigma_table)
  np.testing.assert_array_equal(straight.sigma_profile, resumed.sigma_profile)
  assert int(straight.step) == int(resumed.step) == 18
  assert np.ptp(np.asarray(straight.sigma_profile)) > 0
