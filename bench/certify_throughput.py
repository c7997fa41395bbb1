"""Noisy forward passes per second through `sample_counts`, against the bare jitted forward
pass of the same model at the same batch size; for models with BatchNorm, the same with
BatchNorm folded into the convolutions (what certification runs) against unfolded, as a ratio
in one run; and the noise's share of a `sample_counts` call (the same call with its noise
pre-drawn, common.predrawn_noise). Timed calls alternate between the variants of a model
(common.interleaved_medians). Prints JSON.

    python bench/certify_throughput.py [--models lenet,resnet20] [--batch 400] [--num 4000]
        [--noise-share lenet,resnet20]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import instars_jax as ij
from instars_jax.smoothing import sampler
from common import (device_info, emit, has_batch_norm, initialised_model, interleaved_medians,
                    predrawn_noise)


def measure(name: str, batch: int, num: int, instances: int, dtype: str, repeats: int,
            noise_share: bool) -> dict:
  """The rates of `name`, unfolded and (with BatchNorm) folded; the noise's share is that of
  the model certification runs (folded where there is BatchNorm)."""
  variants = (False, True) if has_batch_norm(name) else (False,)
  calls = {}
  for folded in variants:
    apply_fn, shape, num_classes = initialised_model(name, dtype, folded)
    forward = jax.jit(lambda x, f=apply_fn: jnp.argmax(f(x), -1))
    images = jax.random.uniform(jax.random.PRNGKey(1), (batch,) + shape)
    x = np.random.default_rng(0).uniform(size=(instances,) + shape).astype(np.float32)
    calls[("forward", folded)] = lambda f=forward, i=images: f(i)
    calls[("sample_counts", folded)] = lambda f=apply_fn, x=x: ij.sample_counts(
        f, x, 0.25, jax.random.PRNGKey(2), num=num, batch_size=batch, num_classes=num_classes)
  seconds = interleaved_medians(calls, repeats)
  certified = variants[-1]
  row = {"model": name, "dtype": dtype, "batch": batch, "instances_per_call": instances,
         "samples_per_instance": num, "repeats": repeats}
  for folded in variants:
    forward_rate = batch / seconds[("forward", folded)]
    sampling_rate = instances * num / seconds[("sample_counts", folded)]
    row["folded" if folded else "unfolded"] = {
        "bare_forward_images_per_s": round(forward_rate, 1),
        "sample_counts_images_per_s": round(sampling_rate, 1),
        "ratio": round(sampling_rate / forward_rate, 3)}
  if certified:
    row["folded_over_unfolded"] = {
        what: round(seconds[(what, False)] / seconds[(what, True)], 3)
        for what in ("forward", "sample_counts")}
  if noise_share:
    chunk = sampler.samples_per_pass(batch, instances, num)
    with predrawn_noise(instances, chunk, shape):
      predrawn = interleaved_medians({"predrawn": calls[("sample_counts", certified)]},
                                     repeats)["predrawn"]
    drawn = seconds[("sample_counts", certified)]
    row["noise"] = {"model": "folded" if certified else "unfolded",
                    "predrawn_images_per_s": round(instances * num / predrawn, 1),
                    "share_of_sample_counts": round(1 - predrawn / drawn, 3)}
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--models", default="lenet,resnet20")
  parser.add_argument("--batch", type=int, default=400)
  parser.add_argument("--num", type=int, default=4000)
  parser.add_argument("--instances", type=int, default=8)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--noise-share", default="lenet,resnet20",
                      help="models whose noise share is measured too")
  args = parser.parse_args()
  rows = [measure(m, args.batch, args.num, args.instances, args.dtype, args.repeats,
                  m in args.noise_share.split(",")) for m in args.models.split(",")]
  emit({"benchmark": "certify_throughput", **device_info(), "results": rows})


if __name__ == "__main__":
  main()
