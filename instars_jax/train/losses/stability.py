"""Stability training (Li, Chen, Wang & Carin, NeurIPS 2019), as the randomized-smoothing
literature trains it (jh-jeong/smoothing-consistency's train_stab.py): the clean image and one
noisy copy x + σε in one pass,

    L = CE(f(x), y) + λ · KL(p_clean ‖ p_noisy),

with the gradient through both predictions. (That code uses the cross-entropy
H(p_clean, p_noisy) = KL + H(p_clean) as its term; this is the KL of the paper.) Published:
λ = 2 on MNIST and CIFAR-10 (λ = 1 also at σ = 1.0 on CIFAR-10).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instars_jax.train.losses._terms import accuracy, cross_entropy, noise_copies

DEFAULTS = {"lbd": 2.0}
SOFT_TARGETS = True


def validate(lbd) -> list:
  return [f"lbd must be >= 0; got {lbd}"] * (lbd < 0)


def inputs(images, labels, sigma, keys, *, predict, epoch, lbd):
  del labels, predict, epoch, lbd
  return jnp.stack([images, images + noise_copies(keys, images, sigma, 1)[0]])


def objective(logits, labels, sigma, *, epoch, lbd):
  del sigma, epoch
  log_clean, log_noisy = jax.nn.log_softmax(logits[0]), jax.nn.log_softmax(logits[1])
  kl = jnp.sum(jnp.exp(log_clean) * (log_clean - log_noisy), axis=-1)
  classification = cross_entropy(logits[0], labels)
  return classification + lbd * kl, {"noisy_accuracy": accuracy(logits[1:], labels),
                                     "cross_entropy": classification.mean(),
                                     "stability_kl": kl.mean()}
