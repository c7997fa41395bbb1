"""MACER (Zhai et al., ICLR 2020): maximize the certified radius, on m noise copies x + σε_c.

    L = −log p̄_y + λ · 1[ŷ = y, ξ ≤ γ] · (σ/2) · (γ − ξ),   ξ = Φ⁻¹(q̄_(1)) − Φ⁻¹(q̄_(2)),

p̄ the mean softmax of the copies (classification), q̄ the mean of softmax(β · logits) (the
soft smoothed classifier), ŷ its top class and q̄_(1) ≥ q̄_(2) its two largest values: the
hinge on the radius σ/2 · ξ of each correctly classified example whose ξ is at most γ (the
authors' code, which also drops examples whose ξ is not finite), with the gradient through
both values. σ is each example's own σ. β scales float32 logits (the models' last layer
computes in float32 under bfloat16). The robustness term starts after `deferred_epochs`
epochs (jh-jeong/smoothing-consistency's --deferred: after the first learning-rate drop,
epoch 30 of 90).

Published settings, γ = 8 and β = 16 throughout:
  mnist     m = 16, λ = 16 at σ = 0.25 and 0.5, 6 at σ = 1.0, deferred 30 epochs
            (jh-jeong/smoothing-consistency's EXPERIMENTS.MD)
  cifar10   m = 16, λ = 12 at σ = 0.25 and 0.5, 4 at σ = 1.0, not deferred (Zhai et al. §4.1;
            RuntianZ/macer's main.py defaults, checked 2026-12-07: gauss_num 16, λ 12, γ 8,
            β 16, batch 64, lr 0.01, 440 epochs)
  imagenet  m = 2, λ = 3 at σ = 0.25 and 0.5, 1 at σ = 1.0, not deferred (Zhai et al. §4.1)
The CIFAR-10 λ = 4 at σ = 1.0 and the ImageNet values rest on the paper's §4.1 as cited; its
text was not at hand to check them again (RuntianZ/macer sets only the defaults above; a
third-party script in jh-jeong's style uses λ = 4 at σ = 0.5 instead, which nothing official
supports).
Their code takes all B examples with their m copies in one SGD step (macer.py): batching =
"whole" (losses/__init__.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from instars_jax.train.losses._terms import accuracy, noise_copies

DEFAULTS = {"preset": "", "batching": "whole", "num_noise_vec": 16, "lbd": 16.0, "gamma": 8.0,
            "beta": 16.0, "deferred_epochs": 30}
PRESETS = {
    "mnist": {
        0.25: {"num_noise_vec": 16, "lbd": 16.0, "gamma": 8.0, "beta": 16.0,
               "deferred_epochs": 30},
        0.5: {"num_noise_vec": 16, "lbd": 16.0, "gamma": 8.0, "beta": 16.0,
              "deferred_epochs": 30},
        1.0: {"num_noise_vec": 16, "lbd": 6.0, "gamma": 8.0, "beta": 16.0,
              "deferred_epochs": 30}},
    "cifar10": {
        0.25: {"num_noise_vec": 16, "lbd": 12.0, "gamma": 8.0, "beta": 16.0,
               "deferred_epochs": 0},
        0.5: {"num_noise_vec": 16, "lbd": 12.0, "gamma": 8.0, "beta": 16.0,
              "deferred_epochs": 0},
        1.0: {"num_noise_vec": 16, "lbd": 4.0, "gamma": 8.0, "beta": 16.0,
              "deferred_epochs": 0}},
    "imagenet": {
        0.25: {"num_noise_vec": 2, "lbd": 3.0, "gamma": 8.0, "beta": 16.0,
               "deferred_epochs": 0},
        0.5: {"num_noise_vec": 2, "lbd": 3.0, "gamma": 8.0, "beta": 16.0,
              "deferred_epochs": 0},
        1.0: {"num_noise_vec": 2, "lbd": 1.0, "gamma": 8.0, "beta": 16.0,
              "deferred_epochs": 0}},
}
SOFT_TARGETS = False  # its radius hinge needs the true class
SEPARATE_PASSES = False


def validate(num_noise_vec, lbd, gamma, beta, deferred_epochs) -> list:
  return ([f"num_noise_vec must be >= 1; got {num_noise_vec}"] * (num_noise_vec < 1)
          + [f"lbd must be >= 0; got {lbd}"] * (lbd < 0)
          + [f"gamma must be > 0; got {gamma}"] * (gamma <= 0)
          + [f"beta must be > 0; got {beta}"] * (beta <= 0)
          + [f"deferred_epochs must be >= 0; got {deferred_epochs}"] * (deferred_epochs < 0))


def inputs(images, labels, sigma, keys, *, predict, epoch, num_noise_vec, lbd, gamma, beta,
           deferred_epochs):
  del labels, predict, epoch, lbd, gamma, beta, deferred_epochs
  return images[None] + noise_copies(keys, images, sigma, num_noise_vec)


def robustness(logits, labels, sigma, *, gamma, beta):
  """float32[B]: the hinge (σ/2)(γ − ξ) where it applies, else 0."""
  soft = jax.nn.softmax(beta * logits).mean(axis=0)
  top, index = jax.lax.top_k(soft, 2)
  finite = (top[:, 0] < 1.0) & (top[:, 1] > 0.0)
  safe = jnp.where(finite[:, None], top, 0.5)  # no NaN gradients from the examples left out
  xi = ndtri(safe[:, 0]) - ndtri(safe[:, 1])
  applies = finite & (index[:, 0] == labels) & (xi <= gamma)
  return jnp.where(applies, sigma / 2 * (gamma - xi), 0.0)


def objective(logits, labels, sigma, *, epoch, num_noise_vec, lbd, gamma, beta, deferred_epochs):
  del num_noise_vec
  mean = jax.nn.softmax(logits).mean(axis=0)
  classification = -jnp.log(jnp.take_along_axis(mean, labels[:, None], axis=-1)[:, 0] + 1e-10)
  hinge = robustness(logits, labels, sigma, gamma=gamma, beta=beta)
  weight = jnp.where(epoch >= deferred_epochs, lbd, 0.0)
  return classification + weight * hinge, {"noisy_accuracy": accuracy(logits, labels),
                                           "cross_entropy": classification.mean(),
                                           "macer_robustness": hinge.mean()}
