"""The training input pipeline (instars_jax/data/pipeline.py): decode + augment throughput, the
training loop's share of time waiting on input, and memory. Prints JSON.

    python bench/input_pipeline.py [--folder DIR] [--workers 0,1,2]

  * decode_augment: images/s through the grain stream on the CIFAR-10-JPEG ImageFolder tree
    (32x32 JPEG, pad-crop-flip) and on synthetic 500x375 JPEGs (random-resized crop to 224 +
    flip), with 0, 1 and 2 worker processes;
  * resnet20_training: ResNet-20 train steps (batch 128) fed by the CIFAR-10-JPEG stream; the
    share of the loop's wall time spent waiting in `next`, and the wall-time ratio against the
    same steps fed one cached batch;
  * memory: RSS before and after one pass over the 50,000 training images of the tree.
The tree comes from ../shared/data/cifar10-jpeg-q75.tar.xz, unpacked into a temporary
directory unless --folder names an unpacked copy.
"""

import argparse
import itertools
import tarfile
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from configs import default
from instars_jax import data
from instars_jax.data import pipeline
from instars_jax.storage.workdir import TrainingFacts
from instars_jax.train import steps as train_steps
from instars_jax.train.state import create_train_state
from common import device_info, emit

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-q75.tar.xz"


def rss_mb() -> float:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024
  return float("nan")


def settings(workers: int):
  config = default.get_config().input
  config.workers = workers
  return config


def throughput(split, augmentation, image_size, workers, batch, steps) -> dict:
  batches = pipeline.StepBatches(split, pipeline.Batching(batch, len(split) // batch, 0,
                                                         augmentation, image_size))
  with pipeline.train_stream(batches, 0, steps + 2, settings(workers)) as stream:
    next(stream)  # workers started and the first batch decoded
    began = time.perf_counter()
    for _ in itertools.islice(stream, steps):
      pass
    seconds = time.perf_counter() - began
  return {"workers": workers, "images_per_s": round(steps * batch / seconds, 1)}


def synthetic_jpegs(root: Path, count: int) -> Path:
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    folder = root / split / "class0"
    folder.mkdir(parents=True)
    for i in range(count if split == "train" else 1):
      smooth = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)  # photo-like: mostly smooth
      image = Image.fromarray(smooth).resize((500, 375), Image.BICUBIC)
      noise = rng.integers(-8, 9, (375, 500, 3))
      pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
  return root


def training_share(split, workers, steps, batch=128) -> dict:
  config = default.get_config()
  config.model.name = "resnet20"
  state = create_train_state(config, TrainingFacts((32, 32, 3), 10, "cifar10", len(split), 100,
                                             "synthetic"))
  batches = pipeline.StepBatches(split, pipeline.Batching(batch, len(split) // batch, 0,
                                                         "crop_flip"))
  key = jax.random.PRNGKey(0)
  cached = batches(0)
  states = [state]

  def run(feed) -> float:
    began = time.perf_counter()
    for b in feed:
      states[0], metrics = train_steps.train_step(states[0], b, key)
    jax.block_until_ready(states[0].params)
    return time.perf_counter() - began

  run([cached] * 3)  # compile
  with pipeline.train_stream(batches, 0, steps + 1, settings(workers)) as stream:
    next(stream)
    clock = pipeline.WaitClock()
    streamed = run(clock(stream))
  alone = run([cached] * steps)
  return {"workers": workers, "steps": steps, "batch": batch,
          "train_images_per_s": round(steps * batch / streamed, 1),
          "input_wait_share": round(clock.seconds / streamed, 4),
          "wall_time_vs_cached_batch": round(streamed / alone, 4)}


def memory(split, batch=500) -> dict:
  batches = pipeline.StepBatches(split, pipeline.Batching(batch, len(split) // batch, 0,
                                                         "crop_flip"))
  before = rss_mb()
  peak = before
  with pipeline.train_stream(batches, 0, len(split) // batch, settings(0)) as stream:
    for i, _ in enumerate(stream):
      if i % 10 == 0:
        peak = max(peak, rss_mb())
  return {"images": len(split), "rss_before_mb": round(before, 1),
          "rss_peak_growth_mb": round(peak - before, 1),
          "rss_after_growth_mb": round(rss_mb() - before, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--folder", default="", help="an unpacked CIFAR-10-JPEG tree")
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--steps", type=int, default=40, help="ResNet-20 training steps")
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  if not args.folder and not ARCHIVE.exists():
    parser.exit(2, f"error: {ARCHIVE} is absent: pass --folder with an unpacked CIFAR-10-JPEG "
                   "tree\n")
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(args.folder) if args.folder else Path(tmp) / "cifar10"
    if not args.folder:
      with tarfile.open(ARCHIVE) as tar:
        tar.extractall(folder, filter="data")
    cifar = data.load_dataset(f"folder:{folder}")
    photos = data.load_dataset(f"folder:{synthetic_jpegs(Path(tmp) / 'photos', 800)}",
                               image_size=224)
    record = {"benchmark": "input_pipeline", **device_info(),
              "memory": memory(cifar.train),
              "decode_augment": {
                  "cifar10_jpeg_folder_crop_flip_batch_256": [
                      throughput(cifar.train, "crop_flip", 0, w, 256, 100) for w in workers],
                  "synthetic_500x375_jpeg_random_resized_crop_224_batch_32": [
                      throughput(photos.train, "random_resized_crop", 224, w, 32, 24)
                      for w in workers]},
              "resnet20_training": [training_share(cifar.train, w, args.steps) for w in workers]}
  emit(record)


if __name__ == "__main__":
  main()
