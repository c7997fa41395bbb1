"""What several losses share: their noise copies, cross-entropy, the consistency terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from instars_jax.smoothing.streams import ExampleStream


def noise_copies(keys, images, sigma, copies: int):
  """float32[copies, B, ...]: σ_i ε_ic, copy c of example i drawn from
  fold_in(fold_in(key_i, COPIES), c), so it depends only on (key, example, copy)."""
  def example(key, s):
    stream = jax.random.fold_in(key, ExampleStream.COPIES)
    eps = jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(stream, c), images.shape[1:]))(
        jnp.arange(copies))
    return s * eps
  return jnp.swapaxes(jax.vmap(example)(keys, sigma), 0, 1)


def soft(labels) -> bool:
  """Whether `labels` are targets over the classes (float [B, C], such as the σ-estimators'
  weighted soft labels) rather than class indices (int [B])."""
  return jnp.issubdtype(labels.dtype, jnp.floating)


def cross_entropy(logits, labels):
  """float32[...]: −Σ_c t_c log softmax(logits)_c over the leading axes of `logits`, t the
  one-hot label or the given targets."""
  if soft(labels):
    return optax.softmax_cross_entropy(logits, jnp.broadcast_to(labels, logits.shape))
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.broadcast_to(labels, logits.shape[:-1]))


def accuracy(logits, labels):
  """The share of the copies [m, B] whose top logit is the label (the targets' top class)."""
  return jnp.mean(jnp.argmax(logits, -1) == (jnp.argmax(labels, -1) if soft(labels) else labels))


def consistency_terms(logits):
  """(KL, H), each float32[B], of Jeong & Shin (NeurIPS 2020): the mean over the m copies of
  KL(p̄ ‖ p_c), p_c = softmax of copy c and p̄ their mean, and the entropy H(p̄)."""
  log_p = jax.nn.log_softmax(logits)
  mean = jnp.exp(log_p).mean(axis=0)
  log_mean = jnp.log(jnp.clip(mean, 1e-20))
  kl = jnp.sum(mean * (log_mean - log_p), axis=-1).mean(axis=0)
  return kl, -jnp.sum(mean * log_mean, axis=-1)
