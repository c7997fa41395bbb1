"""A binary σ-selection node trained for its certified radius at the thresholded chain's τ
(certificates/thresholded.py), on m noise copies x + σε_c. Bin 0 is "a lower σ", bin 1 the
node's own σ:

    L = (1/m) Σ_c CE(f(x + σε_c), t) + λ · (1/m) Σ_c KL(p̄ ‖ p_c)
        + μ · w · 1[sξ > 0] · max(0, γ − sξ),        ξ = Φ⁻¹(q̄_0) − Φ⁻¹(τ),

t the target (the selector's gain-weighted soft label, w = Σ_c t_c its weight; a class index
counts as a one-hot target of weight 1), s = +1 where t's top bin is "lower" and −1 where it
is "stay", p_c the softmax of copy c and p̄ their mean, q̄ the mean of softmax(β · logits)
over the copies (MACER's soft smoothed classifier, Zhai et al., ICLR 2020). sξ is the node's
radius over its σ at threshold τ on the side its label prefers: σ(Φ⁻¹(q) − Φ⁻¹(τ)) moving,
σ(Φ⁻¹(τ) − Φ⁻¹(q)) keeping, the certificate's formulas with q in place of its bounds. The
hinge is MACER's radius hinge moved from 1/2 to τ: on each example the node already routes
as its label says, it pushes the radius to a margin γ (in units of σ), where the chain's
cap on the class radius binds. The first two terms are the σ-estimators' default loss,
consistency (Jeong & Shin, NeurIPS 2020), with its λ; μ = 0 gives that loss exactly.
Gradient through q̄ and p̄; examples whose ξ is not finite add no hinge (as MACER's code).
No published settings: a lever of this project (docs/results.md), one step for all B
examples with their m copies (batching = "whole").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from instars_jax.train.losses._terms import (accuracy, consistency_terms, cross_entropy,
                                             noise_copies, soft)

DEFAULTS = {"batching": "whole", "num_noise_vec": 4, "lbd": 10.0, "mu": 1.0, "gamma": 1.0,
            "beta": 16.0, "threshold": 0.8}
SOFT_TARGETS = True
SEPARATE_PASSES = False


def validate(num_noise_vec, lbd, mu, gamma, beta, threshold) -> list:
  return ([f"num_noise_vec must be >= 1; got {num_noise_vec}"] * (num_noise_vec < 1)
          + [f"lbd must be >= 0; got {lbd}"] * (lbd < 0)
          + [f"mu must be >= 0; got {mu}"] * (mu < 0)
          + [f"gamma must be > 0; got {gamma}"] * (gamma <= 0)
          + [f"beta must be > 0; got {beta}"] * (beta <= 0)
          + [f"threshold must lie in (0, 1); got {threshold}"] * (not 0 < threshold < 1))


def inputs(images, labels, sigma, keys, *, predict, epoch, num_noise_vec, lbd, mu, gamma, beta,
           threshold):
  del labels, predict, epoch, lbd, mu, gamma, beta, threshold
  return images[None] + noise_copies(keys, images, sigma, num_noise_vec)


def route_margin(logits, labels, *, beta, threshold):
  """(sξ float32[B], w float32[B]): each example's radius over σ at τ on its label's side,
  from the soft smoothed q̄_0 of its copies, and its target weight."""
  q_lower = jax.nn.softmax(beta * logits.astype(jnp.float32)).mean(axis=0)[:, 0]
  xi = ndtri(q_lower) - ndtri(jnp.float32(threshold))
  if soft(labels):
    top, weight = jnp.argmax(labels, -1), labels.sum(-1)
  else:
    top, weight = labels, jnp.ones(labels.shape, jnp.float32)
  return jnp.where(top == 0, xi, -xi), weight


def objective(logits, labels, sigma, *, epoch, num_noise_vec, lbd, mu, gamma, beta, threshold):
  del sigma, epoch, num_noise_vec
  if logits.shape[-1] != 2:
    raise ValueError("node_margin trains binary σ-selection nodes (train.estimator.router=True); "
                     f"these logits have {logits.shape[-1]} classes")
  kl, _ = consistency_terms(logits)
  classification = cross_entropy(logits, labels).mean(axis=0)
  margin, weight = route_margin(logits, labels, beta=beta, threshold=threshold)
  hinged = jnp.isfinite(margin) & (margin > 0)
  hinge = jnp.where(hinged, jnp.maximum(0.0, gamma - jnp.where(hinged, margin, 0.0)), 0.0)
  return classification + lbd * kl + mu * weight * hinge, {
      "noisy_accuracy": accuracy(logits, labels), "cross_entropy": classification.mean(),
      "consistency_kl": kl.mean(), "route_margin": jnp.where(jnp.isfinite(margin), margin, 0).mean(),
      "hinged_share": hinged.mean()}
