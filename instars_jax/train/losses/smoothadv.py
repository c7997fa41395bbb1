"""SmoothAdv (Salman et al., NeurIPS 2019): cross-entropy on m noise copies of an adversarial
point x̂ + σε_c, where x̂ is found by PGD against the smoothed soft classifier with those same
copies:

    x̂ = argmax_{‖x' − x‖₂ ≤ ε, x' ∈ [0, 1]}  −log (1/m) Σ_c softmax(f(x' + σε_c))_y

(their SmoothAdv_PGD: `num_steps` steps of size 2ε/num_steps along the example's normalised
gradient from x, each projected onto the ε-ball and clipped to [0, 1]; the model in evaluation
mode). ε grows linearly over the first `warmup` epochs, ε·min(1, (epoch + 1)/warmup).
With lbd > 0 the consistency terms of consistency.py are added (λ · KL + η · H: "SmoothAdv +
consistency", Jeong & Shin 2020). Published: MNIST ε = 1.0 (255/256 in their code), 10 steps,
m = 4, warm-up 10 epochs (+ consistency: λ = 1 or 5, η = 0.5); CIFAR-10 ResNet-20 at σ = 0.5:
ε = 1.0, 10 steps, m = 8, or ε = 2.0, 10 steps, m = 2 (jh-jeong/smoothing-consistency's
data); ImageNet: ε = 1.0 or 2.0, 1 step, m = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instars_jax.train.losses._terms import (accuracy, consistency_terms, cross_entropy,
                                             noise_copies)

DEFAULTS = {"num_noise_vec": 4, "epsilon": 1.0, "num_steps": 10, "warmup": 10, "lbd": 0.0,
            "eta": 0.0}
SOFT_TARGETS = False  # its attack raises the loss of the true class


def validate(num_noise_vec, epsilon, num_steps, warmup, lbd, eta) -> list:
  return ([f"num_noise_vec must be >= 1; got {num_noise_vec}"] * (num_noise_vec < 1)
          + [f"epsilon must be >= 0; got {epsilon}"] * (epsilon < 0)
          + [f"num_steps must be >= 0; got {num_steps}"] * (num_steps < 0)
          + [f"warmup must be >= 0; got {warmup}"] * (warmup < 0)
          + [f"lbd must be >= 0; got {lbd}"] * (lbd < 0)
          + [f"eta must be >= 0; got {eta}"] * (eta < 0))


def smoothed_nll(predict, points, labels, noise):
  """float32[B]: −log of the mean softmax of the label over the copies points + noise."""
  logits = predict((points[None] + noise).reshape((-1,) + points.shape[1:]))
  mean = jax.nn.softmax(logits.reshape(noise.shape[:2] + logits.shape[1:])).mean(axis=0)
  return -jnp.log(jnp.clip(jnp.take_along_axis(mean, labels[:, None], axis=-1)[:, 0], 1e-20))


def attack(predict, images, labels, noise, epsilon, num_steps: int):
  """SmoothAdv's PGD: the points x̂ within ε of `images` (L2, in [0, 1]) after `num_steps`."""
  if num_steps == 0:
    return images

  def norms(a):  # each example's L2 norm, shaped to broadcast against `a`
    return jnp.linalg.norm(a.reshape(a.shape[0], -1), axis=1).reshape((-1,) + (1,) * (a.ndim - 1))

  def step(_, adv):
    grad = jax.grad(lambda x: smoothed_nll(predict, x, labels, noise).sum())(adv)
    delta = adv + (2 * epsilon / num_steps) * grad / (norms(grad) + 1e-8) - images
    length = norms(delta)
    delta = delta * jnp.where(length > epsilon, epsilon / jnp.maximum(length, 1e-12), 1.0)
    return jnp.clip(images + delta, 0.0, 1.0)

  # Unrolled: a few steps, and XLA's CPU backend ran the rolled loop's body 4x slower.
  return jax.lax.fori_loop(0, num_steps, step, images, unroll=True)


def inputs(images, labels, sigma, keys, *, predict, epoch, num_noise_vec, epsilon, num_steps,
           warmup, lbd, eta):
  del lbd, eta
  noise = noise_copies(keys, images, sigma, num_noise_vec)
  ramp = jnp.minimum(1.0, (epoch + 1) / warmup) if warmup else 1.0
  return attack(predict, images, labels, noise, epsilon * ramp, num_steps)[None] + noise


def objective(logits, labels, sigma, *, epoch, num_noise_vec, epsilon, num_steps, warmup, lbd,
              eta):
  del sigma, epoch, num_noise_vec, epsilon, num_steps, warmup
  classification = cross_entropy(logits, labels).mean(axis=0)
  metrics = {"noisy_accuracy": accuracy(logits, labels), "cross_entropy": classification.mean()}
  if not (lbd or eta):
    return classification, metrics
  kl, entropy = consistency_terms(logits)
  return classification + lbd * kl + eta * entropy, metrics | {"consistency_kl": kl.mean()}
