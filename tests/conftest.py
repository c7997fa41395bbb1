"""Shared fixtures: analytic base classifiers and the path to ../shared."""

import os
from pathlib import Path

# Many tests (and their subprocesses, which inherit the environment) compile the same
# programs: JAX's persistent compilation cache lets them compile each once per suite run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax.numpy as jnp
import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class LinearClassifier:
  """logits = [w·x + b, −(w·x + b)]: class 0 where w·x + b > 0.

  Under N(0, σ²I) noise, p_A = Φ(|w·x + b| / (σ‖w‖)), and the distance to the decision
  boundary is |w·x + b| / ‖w‖: the exact robust radius of the smoothed classifier.
  """

  def __init__(self, w, b):
    self.w = np.asarray(w, np.float32)
    self.b = float(b)

  def __call__(self, x):
    z = x.reshape(x.shape[0], -1) @ self.w + self.b
    return jnp.stack([z, -z], axis=-1)

  def distance(self, x):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return np.abs(x @ self.w + self.b) / np.linalg.norm(self.w)

  def points_at_distance(self, distances):
    """Points x with w·x + b = +distance·‖w‖ (so class 0, at that distance from the boundary)."""
    unit = self.w / np.linalg.norm(self.w)
    offset = -self.b / np.linalg.norm(self.w) * unit
    return (offset[None] + np.asarray(distances)[:, None] * unit[None]).astype(np.float32)


@pytest.fixture
def linear():
  w = np.zeros(8, np.float32)
  w[:3] = [1.0, -2.0, 2.0]
  return LinearClassifier(w, 0.3)


@pytest.fixture
def shared_dir():
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} is absent: the shared fixtures (Cohen et al.'s published outputs) "
                "are not available on this machine")
  return SHARED
