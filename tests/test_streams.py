"""The one registry of noise-stream ids: every purpose has its own, and no two generators of
different purposes coincide."""

import enum

import numpy as np

from instars_jax.smoothing.streams import NUMPY_IDS, Stream, numpy_rng


def test_stream_ids_are_unique():
  values = [s.value for s in Stream]
  assert len(values) == len(set(values)) == len(Stream.__members__)
  enum.unique(Stream)  # raises if two names share a value


def test_numpy_generators_of_different_keys_differ():
  # numpy's SeedSequence ignores trailing zeros: [seed, 12] and [seed, 12, 0, 0] were one
  # generator, the σ-table update's permutation and epoch 0, example 0's augmentation.
  first = lambda rng: tuple(rng.integers(0, 2**31, 4))
  keys = [(0, s) for s in Stream] + [(0, Stream.AUGMENT, e, i) for e in range(3) for i in range(3)
                                     if (e, i) != (0, 0)]
  keys += [(0, Stream.EPOCH_ORDER, e) for e in range(1, 20)] + [(1, Stream.EPOCH_ORDER, 0)]
  padded = {key + (0,) * (2 + NUMPY_IDS - len(key)) for key in keys}  # one key, one generator
  assert len(padded) == len(keys)
  draws = {first(numpy_rng(*key)) for key in keys}
  assert len(draws) == len(keys)
  old_table = first(np.random.default_rng([0, 12]))
  old_augment = first(np.random.default_rng([0, 12, 0, 0]))
  assert old_table == old_augment  # the collision this registry removed
  assert first(numpy_rng(0, Stream.TABLE_UPDATE)) != first(numpy_rng(0, Stream.AUGMENT, 0, 0))


def test_numpy_rng_takes_a_bounded_number_of_ids():
  numpy_rng(0, Stream.AUGMENT, *range(NUMPY_IDS))
  try:
    numpy_rng(0, Stream.AUGMENT, *range(NUMPY_IDS + 1))
  except ValueError as error:
    assert "at most" in str(error)
  else:
    raise AssertionError("numpy_rng accepted too many ids")
