"""Accelerator figures from one script: CIFAR-10 ResNet-110 and ImageNet ResNet-50 certified at
N = 100,000, against a Cohen-style PyTorch loop on the same device. Prints one JSON.

    python bench/accelerator.py                       # one GPU; about 5 minutes
    python bench/accelerator.py --out figures.jsonl   # and each part as soon as it is measured
    python bench/accelerator.py --tiny                # seconds on a CPU: same code, tiny sizes
    make bench-accelerator

The parts, most wanted first (a device lease is short: each is written to --out when done,
and a part that would start after --budget seconds is skipped and named in the report):
1. ResNet-110 (32×32, random weights: the time does not depend on them) in bfloat16: a short
   sweep of the noisy images per forward pass (`--n-sweep` samples, compilation timed apart),
   then `--n` samples for each of `--images` images at the best setting: seconds per image,
   noisy images per second, and achieved TFLOP/s from the model's counted multiply-adds
   (2 FLOPs each, common.multiply_adds) against the device's bf16 peak.
2. The same model as a Cohen-style PyTorch loop on the same device (Smooth._sample_noise: the
   noisy copies of one image per forward pass), channels_last, cudnn.benchmark, bf16
   autocast, its batch swept; then our speed-up over it at the same dtype.
3. The same two in float32 (TF32 convolutions in both frameworks, their defaults).
4. ResNet-50 at 224×224 in bfloat16: a short sweep, then seconds per image at `--n50` samples,
   extrapolated linearly to N = 100,000 where smaller (compute is linear in n).
5. The PyTorch loop under torch.compile at its best batch, each dtype (compilation apart;
   not at --tiny sizes, where inductor's compile on a CPU would be most of the run).
Sequential certification on a trained model is bench/sequential.py's job.
"""

import argparse
import json
import time

import jax
import numpy as np

import instars_jax as ij
from common import device_info, emit, initialised_model, multiply_adds

# Dense bf16 peaks (TFLOP/s) from NVIDIA's datasheets (SXM parts), for the achieved share.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}

SIZES = {
    "gpu": dict(model="resnet110", n=100_000, images=20, images_f32=10, n_sweep=10_000,
                batches=(5_000, 20_000), instances=10, torch_images=2,
                torch_batches=(2_000, 10_000), model50="resnet50", n50=20_000, images50=4,
                batches50=(512, 2_048), instances50=4, torch_compile=True),
    "tiny": dict(model="lenet", n=64, images=2, images_f32=2, n_sweep=64, batches=(32,),
                 instances=2, torch_images=1, torch_batches=(32,), model50="lenet", n50=64,
                 images50=2, batches50=(32,), instances50=2, torch_compile=False),
}


def peak_tflops() -> float | None:
  kind = jax.local_devices()[0].device_kind
  return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in kind), None)


def timed(fn) -> float:
  began = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - began


def jax_rate(name, dtype, n, images, batch, instances) -> dict:
  """sample_counts over `images` images, `instances` per call: seconds per image after a
  first call (which compiles, unless a call of the same shapes already did), the first
  call's excess over a steady call, images/s and TFLOP/s."""
  apply_fn, shape, classes = initialised_model(name, dtype)
  x = np.random.default_rng(0).uniform(size=(images,) + shape).astype(np.float32)
  count = lambda part: ij.sample_counts(apply_fn, part, 0.25, jax.random.PRNGKey(1), num=n,
                                        batch_size=batch, num_classes=classes)
  first = timed(lambda: count(x[:instances]))
  seconds = sum(timed(lambda s=s: count(x[s: s + instances]))
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
  """The batch of the highest throughput at a short n; each setting compiles once, and the
  full-length run at the chosen batch reuses its program."""
  rates = [jax_rate(name, dtype, n, instances, b, instances) for b in batches]
  best = max(rates, key=lambda r: r["noisy_images_per_s"])
  return {"batch": best["batch"], "instances_per_call": instances,
          "tried": [{k: r[k] for k in ("batch", "noisy_images_per_s", "compile_seconds")}
                    for r in rates]}


def torch_rate(name, dtype, n, images, batch, compile_model) -> dict:
  """Cohen et al.'s loop on the same device: one image's noisy copies per forward pass."""
  import torch
  from torch_models import MODELS
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cudnn.benchmark = True
  model = MODELS[name]().eval().to(device).to(memory_format=torch.channels_last)
  if compile_model:
    torch._dynamo.reset()
    model = torch.compile(model)
  shape = initialised_model(name)[1]
  channels_first = (shape[-1], *shape[:2]) if len(shape) == 3 else (1, *shape)
  image = torch.rand((1, *channels_first), device=device).contiguous(
      memory_format=torch.channels_last)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def certify_one(num):
    counts = torch.zeros(1000, dtype=torch.long, device=device)
    with torch.no_grad(), autocast:
      for start in range(0, num, batch):
        copies = image.repeat((min(batch, num - start), 1, 1, 1))
        predictions = model(copies + 0.25 * torch.randn_like(copies)).argmax(1)
        counts += torch.bincount(predictions, minlength=1000)
    return counts.cpu()

  began = time.perf_counter()
  certify_one(2 * batch)  # compiles (torch.compile), picks cudnn's algorithms, warms up
  sync()
  warm_up = time.perf_counter() - began
  began = time.perf_counter()
  for _ in range(images):
    certify_one(n)
  seconds = (time.perf_counter() - began) / images
  return {"model": name, "dtype": dtype, "n": n, "images": images, "batch": batch,
          "torch_compile": compile_model, "seconds_per_image": seconds,
          "warm_up_seconds": warm_up, "noisy_images_per_s": n / seconds,
          "torch": torch.__version__}


class Report:
  """The parts measured so far: each appended to `out` (JSON lines) as it completes, and
  parts that would start after `budget` seconds skipped by name."""

  def __init__(self, out, budget):
    self.out, self.budget, self.began = out, budget, time.perf_counter()
    self.skipped = []

  def part(self, name, measure):
    if time.perf_counter() - self.began > self.budget:
      self.skipped.append(name)
      return None
    result = measure()
    if self.out:
      with open(self.out, "a") as f:
        f.write(json.dumps({"part": name, **device_info(), "elapsed_s":
                            time.perf_counter() - self.began, "result": result}) + "\n")
    return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tiny", action="store_true", help="CPU sizes: seconds, same code paths")
  parser.add_argument("--out", help="append each part to this JSON-lines file when measured")
  parser.add_argument("--budget", type=float, default=float("inf"),
                      help="seconds after which no further part starts")
  args = parser.parse_args(argv)
  s = SIZES["tiny" if args.tiny else "gpu"]
  report = Report(args.out, args.budget)
  model, n = s["model"], s["n"]

  best = report.part("sweep_bfloat16", lambda: sweep(model, "bfloat16", s["n_sweep"],
                                                      s["batches"], s["instances"]))
  batch, instances = best["batch"], best["instances_per_call"]
  ours, theirs = {}, {}
  ours["bfloat16"] = report.part("certify_bfloat16", lambda: jax_rate(
      model, "bfloat16", n, s["images"], batch, instances))
  eager = lambda dtype: lambda: min(
      (torch_rate(model, dtype, n, s["torch_images"], b, False) for b in s["torch_batches"]),
      key=lambda r: r["seconds_per_image"])
  theirs["bfloat16"] = report.part("torch_bfloat16", eager("bfloat16"))
  ours["float32"] = report.part("certify_float32", lambda: jax_rate(
      model, "float32", n, s["images_f32"], batch, instances))
  theirs["float32"] = report.part("torch_float32", eager("float32"))

  best50 = report.part("sweep50_bfloat16", lambda: sweep(
      s["model50"], "bfloat16", min(s["n50"], 2 * max(s["batches50"]) // s["instances50"]),
      s["batches50"], s["instances50"]))
  fifty = report.part("imagenet", lambda: jax_rate(
      s["model50"], "bfloat16", s["n50"], s["images50"], best50["batch"], s["instances50"]))
  if fifty:
    fifty["seconds_per_image_at_100000"] = fifty["seconds_per_image"] * 100_000 / s["n50"]

  for dtype in ("bfloat16", "float32"):
    if s["torch_compile"] and theirs.get(dtype):
      compiled = report.part(f"torch_compile_{dtype}", lambda d=dtype: torch_rate(
          model, d, n, s["torch_images"], theirs[d]["batch"], True))
      if compiled and compiled["seconds_per_image"] < theirs[dtype]["seconds_per_image"]:
        theirs[dtype] = compiled

  emit({"benchmark": "accelerator", **device_info(), "tiny": args.tiny,
        "certify": ours, "torch_loop": theirs,
        "speedup_over_torch": {d: theirs[d]["seconds_per_image"] / ours[d]["seconds_per_image"]
                               for d in ours if ours[d] and theirs.get(d)},
        "imagenet": fifty, "best_settings": {model: best, s["model50"]: best50},
        "skipped": report.skipped})


if __name__ == "__main__":
  main()
