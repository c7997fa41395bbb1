"""Consistency regularization (Jeong & Shin, NeurIPS 2020), on m noise copies x + σε_c:

    L = (1/m) Σ_c CE(f(x + σε_c), y) + λ · (1/m) Σ_c KL(p̄ ‖ p_c) + η · H(p̄),

p_c the softmax of copy c and p̄ their mean (the "default" form of their code's
consistency_loss). Published settings (jh-jeong/smoothing-consistency): MNIST m = 2, λ = 5
(also 10 and 20 in their runs), η = 0.5; CIFAR-10 m = 2, η = 0.5, λ = 20 or 10 at σ = 0.25,
10 at σ = 0.5, 10 or 5 at σ = 1.0; ImageNet m = 2, λ = 5 or 10, η = 0.5 or 0.1.
Their code splits each batch of B into m SGD steps of B/m examples; here one step takes all B
examples with their m copies (B·m images per forward pass), so an epoch has the Gaussian
recipe's steps at m times the images.
"""

from __future__ import annotations

from instars_jax.train.losses._terms import (accuracy, consistency_terms, cross_entropy,
                                             noise_copies)

DEFAULTS = {"num_noise_vec": 2, "lbd": 5.0, "eta": 0.5}
SOFT_TARGETS = True


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
