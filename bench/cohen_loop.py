"""Against what users would otherwise run: Cohen et al.'s PyTorch certification loop (one test
image at a time, 400 noisy copies per forward pass, argmax counted on the host), on the same
architecture, against instars_jax's sample_counts (many instances per forward pass). Both count
`num` samples for each of `images` test images; the FLOPs per sample are the same.

    pip install -r bench/requirements.txt
    python bench/cohen_loop.py [--models lenet,resnet20] [--num 2000] [--images 8]
"""

import argparse
import time

import jax
import numpy as np
import torch

import instars_jax as ij
from common import INPUTS, device_info, emit, initialised_model, median_seconds
from torch_models import MODELS


TORCH_MODELS = {name: MODELS[name] for name in ("lenet", "resnet20")}


def cohen_counts(model, image, sigma, num, batch):
  """Cohen et al.'s Smooth._sample_noise: one image, `batch` noisy copies per pass."""
  counts = np.zeros(10, dtype=int)
  with torch.no_grad():
    remaining = num
    while remaining > 0:
      this_batch = min(batch, remaining)
      remaining -= this_batch
      copies = image.repeat((this_batch, 1, 1, 1))
      noise = torch.randn_like(copies) * sigma
      predictions = model(copies + noise).argmax(1)
      counts += np.bincount(predictions.cpu().numpy(), minlength=10)
  return counts


def measure(name, num, images, batch, threads):
  torch.set_num_threads(threads)
  shape, num_classes, _ = INPUTS[name]
  torch_model = TORCH_MODELS[name]().eval().to(memory_format=torch.channels_last)
  chw = (shape[-1], *shape[:2]) if len(shape) == 3 else (1, *shape)
  x = np.random.default_rng(0).uniform(size=(images,) + shape).astype(np.float32)
  torch_images = torch.from_numpy(x.reshape(images, *shape[:2], -1)).permute(0, 3, 1, 2) \
      .contiguous(memory_format=torch.channels_last)
  assert torch_images.shape[1:] == chw
  cohen_counts(torch_model, torch_images[:1], 0.25, batch, batch)  # warm-up
  start = time.perf_counter()
  for i in range(images):
    cohen_counts(torch_model, torch_images[i: i + 1], 0.25, num, batch)
  torch_s = time.perf_counter() - start

  apply_fn, _, _ = initialised_model(name)
  jax_s = median_seconds(lambda: ij.sample_counts(apply_fn, x, 0.25, jax.random.PRNGKey(1),
                                                  num=num, batch_size=batch,
                                                  num_classes=num_classes), repeats=3)
  samples = images * num
  return {"model": name, "batch": batch, "samples": samples,
          "cohen_torch_loop_images_per_s": round(samples / torch_s, 1),
          "instars_jax_images_per_s": round(samples / jax_s, 1),
          "speedup": round(torch_s / jax_s, 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--models", default="lenet,resnet20")
  parser.add_argument("--num", type=int, default=2000)
  parser.add_argument("--images", type=int, default=8)
  parser.add_argument("--batch", type=int, default=400)
  parser.add_argument("--threads", type=int, default=torch.get_num_threads())
  args = parser.parse_args()
  emit({"benchmark": "cohen_loop", **device_info(), "torch": torch.__version__,
        "torch_threads": args.threads,
        "results": [measure(m, args.num, args.images, args.batch, args.threads)
                    for m in args.models.split(",")]})


if __name__ == "__main__":
  main()
