"""Timing helpers shared by the benchmarks: medians of repeated, synchronized runs."""

import json
import platform
import statistics
import time

import jax


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
