"""The one registry of noise-stream ids.

Every random draw of the package comes from a key or a numpy generator derived from the
run's seed and one of these ids, so that no two purposes ever share noise. JAX keys fold the
id in (`jax.random.fold_in(key, Stream.X)`); numpy generators come from `numpy_rng`.
"""

from __future__ import annotations

import enum


@enum.unique
class Stream(enum.IntEnum):
  # Folded into the key of one sampler.certify / predict / search call.
  SELECT = 0  # CERTIFY's n0 selection samples
  ESTIMATE = 1  # CERTIFY's n estimation samples
  PREDICT = 2  # PREDICT's samples
  SEARCH = 3  # the σ search's samples (per_sigma, memory)
  # Folded into PRNGKey(seed), or the first id of a numpy generator of the seed.
  TRAIN_NOISE = 10  # Gaussian augmentation of a training step
  EVAL_NOISE = 11  # noisy test accuracy after an epoch
  TABLE_UPDATE = 12  # the σ table's profile noise and the slice each update visits
  CERTIFY = 20  # the key of a certification run
  ESTIMATOR_TEST = 30  # locally_constant: the estimator's CERTIFY
  CLASS_TEST = 31  # locally_constant: the class's CERTIFY
  ESTIMATOR_LABELS = 40  # the estimator's label profile
  ESTIMATOR_NOISE = 41  # the estimator's training noise and example order
  ESTIMATOR_ASSIGN = 42  # the σ the estimator assigns each training example (fine-tuning)
