"""The one registry of noise-stream ids.

Every random draw of the package comes from a key or a numpy generator derived from the
run's seed and one of these ids, so that no two purposes ever share noise. JAX keys fold the
id in (`jax.random.fold_in(key, Stream.X)`); numpy generators come from `numpy_rng`.
"""

from __future__ import annotations

import enum

import numpy as np

# numpy_rng's entropy has this many ids after (seed, stream), padded with zeros: numpy's
# SeedSequence ignores trailing zeros, so keys of different lengths could otherwise coincide
# ([seed, s] and [seed, s, 0, 0] give the same generator).
NUMPY_IDS = 2


@enum.unique
class Stream(enum.IntEnum):
  # Folded into the key of one sampler.certify / predict / search call.
  SELECT = 0  # CERTIFY's n0 selection samples
  ESTIMATE = 1  # CERTIFY's n estimation samples
  PREDICT = 2  # PREDICT's samples
  SEARCH = 3  # the σ search's samples
  # Folded into PRNGKey(seed), or the first id of a numpy generator of the seed.
  TRAIN_NOISE = 10  # Gaussian augmentation of a training step
  EVAL_NOISE = 11  # noisy test accuracy after an epoch
  TABLE_UPDATE = 12  # the σ table's profile noise and the slice each update visits
  AUGMENT = 13  # crop, flip and resized crop of a training example (numpy)
  EPOCH_ORDER = 14  # the order of the training examples in an epoch (numpy)
  HOLDOUT = 15  # which training examples are held out from training (numpy)
  FEWER_EXAMPLES = 16  # which training examples train.examples keeps (numpy)
  CERTIFY = 20  # the key of a certification run
  ESTIMATOR_TEST = 30  # the σ-estimator's CERTIFY (an instance-wise certificate)
  CLASS_TEST = 31  # the class's CERTIFY at the σ the estimator chose
  ESTIMATOR_LABELS = 40  # the estimator's label profile
  ESTIMATOR_NOISE = 41  # the estimator's training noise and example order
  ESTIMATOR_ASSIGN = 42  # the σ the estimator assigns each training example (fine-tuning)
  ESTIMATOR_HOLDOUT = 43  # the held-out examples' label profile
  ESTIMATOR_HOLDOUT_VOTES = 44  # the estimator's votes on the held-out examples
  CASCADE = 50  # a cascade's levels, each folded in by its index
  ROUTER = 60  # a router tree's nodes, each folded in by its grid index
  THRESHOLDED = 70  # a thresholded chain's nodes, each folded in by its grid index


@enum.unique
class ExampleStream(enum.IntEnum):
  """Folded into one training example's key, fold_in(step's noise key, example index): the
  draws each example makes in a training step. (Copy-free Gaussian augmentation draws its
  noise from the example's key itself.)"""
  GRID_SIGMA = 2  # the grid σ an exploring example trains at
  EXPLORE = 3  # whether the example explores (trains at a random grid σ)
  COPIES = 4  # the noise copies of a multi-copy loss, each then folded in by its index


def numpy_rng(seed: int, stream: Stream, *ids: int) -> np.random.Generator:
  """A numpy generator that is a pure function of (seed, stream, ids), for up to NUMPY_IDS
  non-negative ids; distinct arguments give distinct generators."""
  if len(ids) > NUMPY_IDS:
    raise ValueError(f"numpy_rng takes at most {NUMPY_IDS} ids; got {len(ids)}")
  padded = [int(i) for i in ids] + [0] * (NUMPY_IDS - len(ids))
  return np.random.default_rng([int(seed), int(stream), *padded])
