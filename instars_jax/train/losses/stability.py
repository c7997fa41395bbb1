"""Stability training (Li, Chen, Wang & Carin, NeurIPS 2019), as the randomized-smoothing
literature trains it (jh-jeong/smoothing-consistency's train_stab.py): the clean image and one
noisy copy x + σε,

    L = CE(f(x), y) + λ · H(p_clean, p_noisy),   H(p, q) = −Σ_k p_k log q_k,

the cross-entropy of their code, with the gradient through both predictions (no detach: it
adds λ · ∇H(p_clean) to the gradient of the paper's KL, since H(p, q) = KL(p ‖ q) + H(p)).
`term = "kl"` trains on KL(p_clean ‖ p_noisy) instead. As in their code, the clean and the
noisy images go through the model in two passes (SEPARATE_PASSES): BatchNorm normalises each
by its own batch statistics and updates its running statistics after each, clean first.
Published: λ = 2 on MNIST at σ = 0.25, 0.5 and 1.0 (EXPERIMENTS.MD) and on CIFAR-10
(train_stab.py's default, their data/certify/cifar10/stab runs); none on ImageNet.
Their code takes one SGD step per batch: it has no `batching`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instars_jax.train.losses._terms import accuracy, cross_entropy, noise_copies

DEFAULTS = {"preset": "", "lbd": 2.0, "term": "cross_entropy"}
PRESETS = {"mnist": {0.25: {"lbd": 2.0}, 0.5: {"lbd": 2.0}, 1.0: {"lbd": 2.0}},
           "cifar10": {0.25: {"lbd": 2.0}, 0.5: {"lbd": 2.0}, 1.0: {"lbd": 2.0}}}
SOFT_TARGETS = True
SEPARATE_PASSES = True
TERMS = ("cross_entropy", "kl")


def validate(lbd, term) -> list:
  return ([f"lbd must be >= 0; got {lbd}"] * (lbd < 0)
          + [f"term must be one of {TERMS}; got {term!r}"] * (term not in TERMS))


def inputs(images, labels, sigma, keys, *, predict, epoch, lbd, term):
  del labels, predict, epoch, lbd, term
  return jnp.stack([images, images + noise_copies(keys, images, sigma, 1)[0]])


def objective(logits, labels, sigma, *, epoch, lbd, term):
  del sigma, epoch
  log_clean, log_noisy = jax.nn.log_softmax(logits[0]), jax.nn.log_softmax(logits[1])
  clean = jnp.exp(log_clean)
  divergence = -jnp.sum(clean * log_noisy, axis=-1)  # H(p_clean, p_noisy)
  if term == "kl":
    divergence += jnp.sum(clean * log_clean, axis=-1)  # − H(p_clean)
  classification = cross_entropy(logits[0], labels)
  return classification + lbd * divergence, {"noisy_accuracy": accuracy(logits[1:], labels),
                                             "cross_entropy": classification.mean(),
                                             "stability_term": divergence.mean()}
