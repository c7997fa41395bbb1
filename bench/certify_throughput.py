"""Noisy forward passes per second through `sample_counts`, against the bare jitted forward
pass of the same model at the same batch size. Prints JSON.

    python bench/certify_throughput.py [--models lenet,resnet20] [--batch 400] [--num 4000]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import instars_jax as ij
from common import device_info, emit, initialised_model, median_seconds


def measure(name: str, batch: int, num: int, instances: int, dtype: str) -> dict:
  apply_fn, shape, num_classes = initialised_model(name, dtype)

  forward = jax.jit(lambda x: jnp.argmax(apply_fn(x), -1))
  images = jax.random.uniform(jax.random.PRNGKey(1), (batch,) + shape)
  forward_s = median_seconds(lambda: forward(images))

  x = np.random.default_rng(0).uniform(size=(instances,) + shape).astype(np.float32)
  count = lambda: ij.sample_counts(apply_fn, x, 0.25, jax.random.PRNGKey(2), num=num,
                                   batch_size=batch, num_classes=num_classes)
  counts_s = median_seconds(count, repeats=3)

  forward_rate = batch / forward_s
  sampling_rate = instances * num / counts_s
  return {"model": name, "dtype": dtype, "batch": batch, "instances_per_call": instances,
          "samples_per_instance": num, "bare_forward_images_per_s": round(forward_rate, 1),
          "sample_counts_images_per_s": round(sampling_rate, 1),
          "ratio": round(sampling_rate / forward_rate, 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--models", default="lenet,resnet20")
  parser.add_argument("--batch", type=int, default=400)
  parser.add_argument("--num", type=int, default=4000)
  parser.add_argument("--instances", type=int, default=8)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  rows = [measure(m, args.batch, args.num, args.instances, args.dtype)
          for m in args.models.split(",")]
  emit({"benchmark": "certify_throughput", **device_info(), "results": rows})


if __name__ == "__main__":
  main()
