"""SmoothAdv (Salman et al., NeurIPS 2019): cross-entropy on m noise copies of an adversarial
point x̂ + σε_c, where x̂ is found by PGD against the smoothed soft classifier with those same
copies, and trained on with them:

    x̂ = argmax_{‖x' − x‖₂ ≤ ε, x' ∈ [0, 1]}  −log (1/m) Σ_c softmax(f(x' + σε_c))_y

(jh-jeong/smoothing-consistency's SmoothAdv_PGD: `num_steps` steps of size 2ε/num_steps along
each example's own normalised gradient from x, each projected onto the ε-ball and clipped to
[0, 1]; the model in evaluation mode, x̂ a constant of the training gradient). ε grows
linearly over the first `warmup` epochs, ε·min(1, (epoch + 1)/warmup).
With lbd > 0 the consistency terms of consistency.py are added (λ · KL + η · H: "SmoothAdv +
consistency", Jeong & Shin 2020; η is used only then).

Published settings, 10 PGD steps and a 10-epoch warm-up unless named (ε in the code's 256ths):
  mnist     m = 4, ε = 255/256 at σ = 0.25, 0.5, 1.0 (jh-jeong/smoothing-consistency's
            EXPERIMENTS.MD)
  cifar10   σ = 0.25: m = 8, ε = 255/256; σ = 0.5: m = 4, ε = 2; σ = 1.0: m = 2, ε = 2
            (ResNet-110: the highest ACR of Hadisalman/smoothing-adversarial's 10-step PGD
            runs, data/certify/cifar10/PGD_10steps_multiNoiseSamples)
  imagenet  1 step, m = 1; ε = 255/256 at σ = 0.25 and 0.5, 2 at σ = 1.0 (the highest ACR of
            their data/certify/imagenet/PGD_1step; no warm-up is published, it stays unset)
SmoothAdv + consistency (Jeong & Shin's EXPERIMENTS.MD and data/, η = 0.5 throughout: the
default): MNIST m = 4, λ = 1 with the MNIST attack above; CIFAR-10 σ = 0.25: m = 4, ε = 255/256,
λ = 2; σ = 0.5 and 1.0: m = 2, ε = 2, λ = 1. The presets fill the attack; λ and such an m are
explicit settings. Both references split each batch of B into m SGD steps of B/m examples
(train_salman.py, train_pgd.py --train-multi-noise): batching = "split" (losses/__init__.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instars_jax.train.losses._terms import (accuracy, consistency_terms, cross_entropy,
                                             noise_copies)

DEFAULTS = {"preset": "", "batching": "split", "num_noise_vec": 4, "epsilon": 1.0,
            "num_steps": 10, "warmup": 10, "lbd": 0.0, "eta": 0.5}
PRESETS = {
    "mnist": {
        0.25: {"num_noise_vec": 4, "epsilon": 0.99609375, "num_steps": 10, "warmup": 10},
        0.5: {"num_noise_vec": 4, "epsilon": 0.99609375, "num_steps": 10, "warmup": 10},
        1.0: {"num_noise_vec": 4, "epsilon": 0.99609375, "num_steps": 10, "warmup": 10}},
    "cifar10": {
        0.25: {"num_noise_vec": 8, "epsilon": 0.99609375, "num_steps": 10, "warmup": 10},
        0.5: {"num_noise_vec": 4, "epsilon": 2.0, "num_steps": 10, "warmup": 10},
        1.0: {"num_noise_vec": 2, "epsilon": 2.0, "num_steps": 10, "warmup": 10}},
    "imagenet": {
        0.25: {"num_noise_vec": 1, "epsilon": 0.99609375, "num_steps": 1},
        0.5: {"num_noise_vec": 1, "epsilon": 0.99609375, "num_steps": 1},
        1.0: {"num_noise_vec": 1, "epsilon": 2.0, "num_steps": 1}},
}
SOFT_TARGETS = False  # its attack raises the loss of the true class
SEPARATE_PASSES = False


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
  if not lbd:
    return classification, metrics
  kl, entropy = consistency_terms(logits)
  return classification + lbd * kl + eta * entropy, metrics | {"consistency_kl": kl.mean()}
