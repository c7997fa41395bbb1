"""Shared fixtures: a linear base classifier, a toy run's config and the path to ../shared
(helpers.py holds the code they share)."""

import os
from pathlib import Path

# Many tests (and their subprocesses, which inherit the environment) compile the same
# programs: JAX's persistent compilation cache lets them compile each once per suite run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The suite's programs are tiny: compiling them dominates its time, and LLVM's cheapest
# optimization level compiles them about a quarter faster.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import numpy as np
import pytest

from helpers import LinearClassifier, make_toy_config

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def linear():
  w = np.zeros(8, np.float32)
  w[:3] = [1.0, -2.0, 2.0]
  return LinearClassifier(w, 0.3)


@pytest.fixture
def toy_config(tmp_path):
  return make_toy_config(tmp_path)


@pytest.fixture
def shared_dir():
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} is absent: the shared fixtures (Cohen et al.'s published outputs) "
                "are not available on this machine")
  return SHARED


# The files that take longest go first, so that the two xdist workers (--dist loadfile, whole
# files) do not end with one of them alone on a long file; the rest keep their order.
# The order of the quick tier's per-file times (pytest --durations=0, 2026-12-08).
LONGEST_FIRST = ("test_cli.py", "test_recipe.py", "test_sequential.py", "test_certification.py",
                 "test_losses.py", "test_certificates.py", "test_soundness.py",
                 "test_training.py", "test_models.py", "test_search.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
