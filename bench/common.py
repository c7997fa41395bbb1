"""Timing helpers shared by the benchmarks: medians of repeated, synchronized runs."""

import contextlib
import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from instars_jax import models
from instars_jax.smoothing import sampler

# Benchmark input shape, classes and normalization statistics of each architecture.
INPUTS = {"lenet": ((28, 28), 10, "fashion_mnist"), "resnet20": ((32, 32, 3), 10, "cifar10"),
          "resnet110": ((32, 32, 3), 10, "cifar10"), "resnet50": ((224, 224, 3), 1000, "imagenet")}


def median_seconds(fn, repeats: int = 5) -> float:
  """Median wall time of fn() (its outputs blocked on) after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int = 3) -> dict:
  """{name: median wall time of fn()} over `repeats` rounds that call every fn in turn, after
  one warm-up call of each: a load that comes and goes on a shared machine then touches all
  of them alike, so their ratios hold better than those of back-to-back medians."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def device_info() -> dict:
  return {"backend": jax.default_backend(), "devices": [d.device_kind for d in jax.local_devices()],
          "jax": jax.__version__, "host": platform.processor() or platform.machine()}


def emit(record: dict) -> None:
  print(json.dumps(record, indent=2))


@functools.lru_cache(maxsize=None)
def initialised_model(name: str, dtype: str = "float32", folded: bool = False):
  """(apply_fn: x -> logits, input shape, classes) of a freshly initialised architecture,
  with `folded` its BatchNorm folded into the convolutions (models.fold_batch_norm, as
  certification runs it). apply_fn carries its weights as arguments (models.bind_variables),
  and one object per (name, dtype, folded), so that calls of one shape share a program."""
  shape, num_classes, stats = INPUTS[name]
  model = models.create_model(name, num_classes, dtype, stats)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  if folded:
    model, variables = models.fold_batch_norm(model, variables)
  return models.bind_variables(model.apply, variables), shape, num_classes


def has_batch_norm(name: str) -> bool:
  shape, num_classes, stats = INPUTS[name]
  return isinstance(models.create_model(name, num_classes, "float32", stats), models.ResNet)


@contextlib.contextmanager
def predrawn_noise(instances: int, chunk: int, shape: tuple, pool: int = 4):
  """sample_counts with its noise drawn beforehand: inside, instance i's ε for samples s is
  row s mod (pool · chunk) of a pre-drawn array, read from memory instead of generated, and
  everything else the call does is unchanged. The time saved is the noise's share. Each chunk
  reads other rows than the one before: with one array for every chunk, the whole chunk
  (noise, network, counts) would not depend on the loop's index and XLA would run it once
  (a first version measured a "share" of 0.94 that way). (Instances must be numbered
  0..instances-1, sample_counts' default ids.)"""
  rows = pool * chunk
  eps = jax.random.normal(jax.random.PRNGKey(0), (instances, rows) + tuple(shape))
  drawn = sampler.instance_noise
  sampler.instance_noise = lambda key, instance_id, sample_ids, shape: eps[instance_id][
      sample_ids % rows]
  jax.clear_caches()  # the programs traced with the drawn noise would be found again
  try:
    yield
  finally:
    sampler.instance_noise = drawn
    jax.clear_caches()


def multiply_adds(name: str) -> int:
  """Multiply-adds of one forward pass of `name` on one input, counted layer by layer from
  each convolution's and dense layer's output shape and kernel, padding taps included (the
  textbook count: ResNet-110 about 253 M, ResNet-50 about 4.1 G)."""
  import flax.linen as nn
  import numpy as np
  shape, num_classes, stats = INPUTS[name]
  model = models.create_model(name, num_classes, "float32", stats)
  total = []

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
      inputs = args[0].shape[-1]
      window = int(np.prod(module.kernel_size)) if isinstance(module, nn.Conv) else 1
      total.append(int(np.prod(out.shape[1:])) * window * inputs)
    return out

  with nn.intercept_methods(count):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  return sum(total)
