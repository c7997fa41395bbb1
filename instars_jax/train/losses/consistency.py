"""Consistency regularization (Jeong & Shin, NeurIPS 2020), on m noise copies x + σε_c:

    L = (1/m) Σ_c CE(f(x + σε_c), y) + λ · (1/m) Σ_c KL(p̄ ‖ p_c) + η · H(p̄),

p_c the softmax of copy c and p̄ their mean (the "default" form of their code's
consistency_loss), with the gradient through p̄ as well as each p_c.

Published settings (jh-jeong/smoothing-consistency), m = 2 and η = 0.5 unless named:
  mnist     λ = 10 at σ = 0.25, 5 at σ = 0.5 and 1.0 (EXPERIMENTS.MD)
  cifar10   λ = 20 at σ = 0.25, 10 at σ = 0.5 and 1.0 (ResNet-110: the λ of the highest ACR
            among their data/certify/cifar10/consistency/cohen runs at each σ)
  imagenet  λ = 5; η = 0.5 at σ = 0.5, 0.1 at σ = 1.0 (data/certify/imagenet; no σ = 0.25 run)
Their code splits each batch of B into m SGD steps of B/m examples with m copies each
(train_consistency.py): batching = "split" (losses/__init__.py).
"""

from __future__ import annotations

from instars_jax.train.losses._terms import (accuracy, consistency_terms, cross_entropy,
                                             noise_copies)

DEFAULTS = {"preset": "", "batching": "split", "num_noise_vec": 2, "lbd": 5.0, "eta": 0.5}
PRESETS = {
    "mnist": {0.25: {"num_noise_vec": 2, "lbd": 10.0, "eta": 0.5},
              0.5: {"num_noise_vec": 2, "lbd": 5.0, "eta": 0.5},
              1.0: {"num_noise_vec": 2, "lbd": 5.0, "eta": 0.5}},
    "cifar10": {0.25: {"num_noise_vec": 2, "lbd": 20.0, "eta": 0.5},
                0.5: {"num_noise_vec": 2, "lbd": 10.0, "eta": 0.5},
                1.0: {"num_noise_vec": 2, "lbd": 10.0, "eta": 0.5}},
    "imagenet": {0.5: {"num_noise_vec": 2, "lbd": 5.0, "eta": 0.5},
                 1.0: {"num_noise_vec": 2, "lbd": 5.0, "eta": 0.1}},
}
SOFT_TARGETS = True
SEPARATE_PASSES = False


def validate(num_noise_vec, lbd, eta) -> list:
  return ([f"num_noise_vec must be >= 1; got {num_noise_vec}"] * (num_noise_vec < 1)
          + [f"lbd must be >= 0; got {lbd}"] * (lbd < 0)
          + [f"eta must be >= 0; got {eta}"] * (eta < 0))


def inputs(images, labels, sigma, keys, *, predict, epoch, num_noise_vec, lbd, eta):
  del labels, predict, epoch, lbd, eta
  return images[None] + noise_copies(keys, images, sigma, num_noise_vec)


def objective(logits, labels, sigma, *, epoch, num_noise_vec, lbd, eta):
  del sigma, epoch, num_noise_vec
  kl, entropy = consistency_terms(logits)
  classification = cross_entropy(logits, labels).mean(axis=0)
  return classification + lbd * kl + eta * entropy, {
      "noisy_accuracy": accuracy(logits, labels), "cross_entropy": classification.mean(),
      "consistency_kl": kl.mean(), "entropy": entropy.mean()}
