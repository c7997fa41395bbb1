"""Gaussian augmentation (Cohen, Rosenfeld & Kolter, ICML 2019): the cross-entropy of the base
classifier at one noisy copy x + σε of each example, ε ~ N(0, I).

Its one copy is drawn from the example's key itself (state.gaussian_noise), as before the
loss family existed: training with this loss is bit-identical to the earlier versions.
"""

from __future__ import annotations

from instars_jax.train.losses._terms import accuracy, cross_entropy
from instars_jax.train.state import gaussian_noise

DEFAULTS = {}
SOFT_TARGETS = True
SEPARATE_PASSES = False


def validate() -> list:
  return []


def inputs(images, labels, sigma, keys, *, predict, epoch):
  del labels, predict, epoch
  return gaussian_noise(keys, images, sigma)[None]


def objective(logits, labels, sigma, *, epoch):
  del sigma, epoch
  return cross_entropy(logits[0], labels), {"noisy_accuracy": accuracy(logits, labels)}
