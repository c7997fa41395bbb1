"""Accelerator figures from one script: CIFAR-10 ResNet-110 and ImageNet ResNet-50 certified at
N = 100,000, against a Cohen-style PyTorch loop on the same device. Prints one JSON.

    python bench/accelerator.py            # one GPU; sized to finish in about 8 minutes
    python bench/accelerator.py --tiny     # seconds on a CPU: the same code paths, tiny sizes
    make bench-accelerator

1. ResNet-110 (32×32, random weights: the time does not depend on them), `--n` samples for
   each of `--images` images, in float32 and bfloat16: seconds per image with the compilation
   reported apart, noisy images per second, and achieved TFLOP/s from the model's counted
   multiply-adds (2 FLOPs each, common.multiply_adds) against the device's bf16 peak.
2. The same model as a Cohen-style PyTorch loop on the same device (Smooth._sample_noise: the
   noisy copies of one image per forward pass), channels_last, bf16 autocast, torch.compile,
   its batch swept; and our speed-up over it at the same dtype. Fewer images, the same n.
3. ResNet-50 at 224×224 in bfloat16: seconds per image at `--n50` samples (the figure at
   N = 100,000 is extrapolated linearly when n50 is smaller: compute is linear in n).
4. For each model, the batch size (noisy images per forward pass) and instances per call
   that maximise throughput, from a short sweep; those are the configs' GPU defaults.
Sequential certification on a trained model is bench/sequential.py's job (it needs the
model's own p_A): run it with `--workdir` of a trained ResNet-20 in the same session.
"""

import argparse
import time

import jax
import numpy as np

import instars_jax as ij
from common import device_info, emit, initialised_model, multiply_adds

# Dense bf16 peaks (TFLOP/s) from NVIDIA's datasheets (SXM parts), for the achieved share.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def peak_tflops() -> float | None:
  kind = jax.local_devices()[0].device_kind
  return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in kind), None)


def timed(fn) -> float:
  began = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - began


def jax_rate(name, dtype, n, images, batch, instances) -> dict:
  """sample_counts over `images` images, `instances` per call: seconds per image (after a
  first call that compiles), the compile's seconds, images/s and TFLOP/s."""
  apply_fn, shape, classes = initialised_model(name, dtype)
  x = np.random.default_rng(0).uniform(size=(images,) + shape).astype(np.float32)
  count = lambda part, num: ij.sample_counts(apply_fn, part, 0.25, jax.random.PRNGKey(1),
                                             num=num, batch_size=batch, num_classes=classes)
  first = timed(lambda: count(x[:instances], n))
  seconds = sum(timed(lambda s=s: count(x[s: s + instances], n))
                for s in range(0, images, instances))
  steady = seconds / images * instances
  flops = 2.0 * multiply_adds(name) * n * images
  peak = peak_tflops()
  return {"model": name, "dtype": dtype, "n": n, "images": images, "batch": batch,
          "instances_per_call": instances, "seconds_per_image": seconds / images,
          "compile_seconds": max(0.0, first - steady),
          "noisy_images_per_s": n * images / seconds, "tflops": flops / seconds / 1e12,
          "share_of_bf16_peak": None if peak is None else flops / seconds / 1e12 / peak}


def sweep(name, dtype, n, batches, instances) -> dict:
  """The (batch, instances) of the highest throughput at a short n, from a small grid."""
  rates = [jax_rate(name, dtype, n, i, b, i) for b in batches for i in instances]
  best = max(rates, key=lambda r: r["noisy_images_per_s"])
  return {"batch": best["batch"], "instances_per_call": best["instances_per_call"],
          "tried": [(r["batch"], r["instances_per_call"], round(r["noisy_images_per_s"]))
                    for r in rates]}


def torch_rate(name, dtype, n, images, batch, compile_model) -> dict:
  """Cohen et al.'s loop on the same device: one image's noisy copies per forward pass."""
  import torch
  from torch_models import MODELS
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = MODELS[name]().eval().to(device).to(memory_format=torch.channels_last)
  if compile_model:
    model = torch.compile(model)
  shape = initialised_model(name)[1]
  channels_first = (shape[-1], *shape[:2]) if len(shape) == 3 else (1, *shape)
  image = torch.rand((1, *channels_first), device=device).contiguous(
      memory_format=torch.channels_last)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def certify_one():
    counts = torch.zeros(1000, dtype=torch.long, device=device)
    with torch.no_grad(), autocast:
      for start in range(0, n, batch):
        copies = image.repeat((min(batch, n - start), 1, 1, 1))
        predictions = model(copies + 0.25 * torch.randn_like(copies)).argmax(1)
        counts += torch.bincount(predictions, minlength=1000)
    return counts.cpu()

  certify_one()  # compiles, warms up
  began = time.perf_counter()
  for _ in range(images):
    certify_one()
  seconds = (time.perf_counter() - began) / images
  return {"model": name, "dtype": dtype, "n": n, "images": images, "batch": batch,
          "torch_compile": compile_model, "seconds_per_image": seconds,
          "noisy_images_per_s": n / seconds, "torch": torch.__version__}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="CPU sizes: seconds, same code paths")
  args = parser.parse_args(argv)
  if args.tiny:
    s = dict(model="lenet", n=64, images=2, torch_images=1, model50="lenet", n50=64,
             images50=2, batches=(32,), instances=(2,), torch_batches=(32,),
             compile_torch=(False,))
  else:
    s = dict(model="resnet110", n=100_000, images=100, torch_images=10, model50="resnet50",
             n50=100_000, images50=10, batches=(2000, 4000, 8000), instances=(4, 8, 16),
             torch_batches=(400, 2000, 4000), compile_torch=(False, True))
  best = sweep(s["model"], "bfloat16", s["n"] // 50 if s["n"] > 3200 else s["n"], s["batches"],
               s["instances"])
  batch, instances = best["batch"], best["instances_per_call"]
  ours = {dtype: jax_rate(s["model"], dtype, s["n"], s["images"], batch, instances)
          for dtype in ("float32", "bfloat16")}
  theirs = {dtype: min((torch_rate(s["model"], dtype, s["n"], s["torch_images"], b, c)
                        for b in s["torch_batches"] for c in s["compile_torch"]),
                       key=lambda r: r["seconds_per_image"])
            for dtype in ("float32", "bfloat16")}
  best50 = sweep(s["model50"], "bfloat16", s["n50"] // 50 if s["n50"] > 3200 else s["n50"],
                 s["batches"][:2], s["instances"][:2])
  fifty = jax_rate(s["model50"], "bfloat16", s["n50"], s["images50"], best50["batch"],
                   min(best50["instances_per_call"], s["images50"]))
  fifty["seconds_per_image_at_100000"] = fifty["seconds_per_image"] * 100_000 / s["n50"]
  emit({"benchmark": "accelerator", **device_info(), "tiny": args.tiny,
        "certify": ours, "torch_loop": theirs,
        "speedup_over_torch": {d: theirs[d]["seconds_per_image"] / ours[d]["seconds_per_image"]
                               for d in ours},
        "imagenet": fifty, "best_settings": {s["model"]: best, s["model50"]: best50}})


if __name__ == "__main__":
  main()
