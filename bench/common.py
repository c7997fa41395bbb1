"""Timing helpers shared by the benchmarks: medians of repeated, synchronized runs."""

import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from instars_jax import models

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


def device_info() -> dict:
  return {"backend": jax.default_backend(), "devices": [d.device_kind for d in jax.local_devices()],
          "jax": jax.__version__, "host": platform.processor() or platform.machine()}


def emit(record: dict) -> None:
  print(json.dumps(record, indent=2))


def initialised_model(name: str, dtype: str = "float32"):
  """(apply_fn: x -> logits, input shape, classes) of a freshly initialised architecture."""
  shape, num_classes, stats = INPUTS[name]
  model = models.create_model(name, num_classes, dtype, stats)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  return functools.partial(model.apply, variables, train=False), shape, num_classes
