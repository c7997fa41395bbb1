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


@functools.lru_cache(maxsize=None)
def initialised_model(name: str, dtype: str = "float32"):
  """(apply_fn: x -> logits, input shape, classes) of a freshly initialised architecture.
  apply_fn carries its weights as arguments (models.bind_variables, as certification does),
  and one object per (name, dtype), so that calls of one shape share a compiled program."""
  shape, num_classes, stats = INPUTS[name]
  model = models.create_model(name, num_classes, dtype, stats)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  return models.bind_variables(model.apply, variables), shape, num_classes


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
