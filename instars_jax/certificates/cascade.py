"""cascade: cascaded smoothing over a grid of σ (Jeong & Shin, "Multi-scale Diffusion
Denoised Smoothing", NeurIPS 2023, arXiv 2310.16779). Needs no σ-estimator: any trained run
works, Cohen models included.

The classifier G tries the levels from the largest σ down. Level k answers class c where its
smoothed classifier's probability p_{k,c}(x) is at least the threshold p₀
(`certify.cascade.threshold`); otherwise it passes x down. The lowest level answers its top
class where it is at least 1/2 (Cohen et al.'s g), and abstains otherwise. (The package's one
tie rule: a probability exactly at the threshold answers, with radius 0.)

Certificate. At the level k that answers, with class c, a lower bound L ≤ p_{k,c}(x); at every
level j above it, upper bounds U_{j,c'} ≥ p_{j,c'}(x) for every class c' ≠ c. Then

    R = min( σ_k (Φ⁻¹(L) − Φ⁻¹(p₀_k)),  min over j above k of σ_j (Φ⁻¹(p₀) − Φ⁻¹(max_{c'≠c} U_{j,c'})) ),

p₀_k = p₀ above the lowest level and 1/2 at it, and the certificate abstains where that
minimum is not positive for a level above. Proof (Jeong & Shin, Theorem 3.1, in the form
below): for every σ and class, x ↦ Φ⁻¹(p_{σ,c}(x)) is 1/σ-Lipschitz (Salman et al., NeurIPS
2019, Lemma 2; the statement behind Cohen et al.'s Theorem 1). So for ‖x' − x‖ < R,
p_{k,c}(x') > p₀_k, and level k answers c at x' (a class above p₀_k ≥ 1/2 is the top one),
while at every level above no other class reaches p₀: such a level either passes x' down or
answers c itself. Either way G(x') = c. Only the other classes need bounding above: the
class answered may rise above p₀ at a higher level without changing the answer (the official
code's `off_class_upper_radius`). Every input not answered at a level goes on down; whether
its certificate holds is decided at the level that answers.

Failure probability. The bounds of the K levels are all taken at levels fixed in advance,
α/K per level (the union bound over the levels that may be evaluated; an input's certificate
rests only on the levels it evaluated, but the split must not depend on which, since that
depends on the samples): above the lowest level, L at α/(2K) and each class's U at
α/(2KC); at the lowest, L at α/K. With probability ≥ 1 − α every bound an input uses holds.
Each level draws its own n0 selection and n estimation samples, from its own stream.
"""

from __future__ import annotations

import jax
import numpy as np
from scipy import stats

from instars_jax.certificates import Certified, padded_rows
from instars_jax.smoothing import bounds, sampler
from instars_jax.smoothing.streams import Stream

NAME = __name__.rpartition(".")[2]  # the kind is named by its file
SOUND = True
MULTI_HOST = True
MEANING = ("sound for the cascade classifier G (Jeong & Shin, NeurIPS 2023): levels tried "
           "from the largest sigma down, a level answering where its top class is certifiably "
           "at or above the threshold p0, the lowest at 1/2; radius = min(answering level's "
           "margin above p0, every level above it's margin of the other classes below p0); "
           "alpha split equally over the levels")
DEFAULTS = {
    "threshold": 0.6,  # p0 in (1/2, 1): where a level above the lowest answers
    "grid": (),  # the levels' σ, from the largest down; empty: train.table.grid
}


def grid_of(config) -> tuple:
  c = config.certify.cascade
  return tuple(float(s) for s in (c.grid or config.train.table.grid))


def validate(config) -> None:
  c = config.certify
  if not 0.5 < c.cascade.threshold < 1.0:
    raise ValueError(f"certify.cascade.threshold must lie in (1/2, 1); got {c.cascade.threshold}")
  grid = np.asarray(grid_of(config))
  if grid.ndim != 1 or len(grid) < 2 or np.any(grid <= 0) or np.any(np.diff(grid) <= 0):
    raise ValueError("certify.cascade.grid (or train.table.grid) must list at least two "
                     f"increasing σ > 0; got {tuple(grid)}")
  if c.sampling != "fixed":
    raise ValueError("the cascade certificate draws a fixed n per level: use "
                     "certify.sampling=fixed")


sigmas = grid_of


def file_stem(config) -> str:
  return f"cascade_{config.certify.cascade.threshold:g}"


def metadata(config, workdir) -> dict:
  del workdir
  grid = grid_of(config)
  return {"grid": list(grid), "cascade": {"threshold": config.certify.cascade.threshold,
                                          "alpha_per_level": config.certify.alpha / len(grid)}}


def prepare(smoothed, config):
  grid, threshold = grid_of(config), config.certify.cascade.threshold

  def certify(x, ids) -> Certified:
    return certify_cascade(smoothed, x, ids, grid, threshold)

  return certify


def certify_cascade(smoothed, x, ids, grid, threshold) -> Certified:
  """The cascade certificate (module doc) for a batch, with run's base model, key, n0, n, α."""
  x, _, ids = sampler.validate_instances(x, 1.0, ids)
  levels = sorted(grid, reverse=True)
  alpha_level = smoothed.alpha / len(levels)
  prediction = np.full(len(x), sampler.ABSTAIN, np.int32)
  radius = np.zeros(len(x))
  sigma = np.full(len(x), levels[-1], np.float32)
  samples = np.zeros(len(x), np.int64)
  margin = np.full((len(x), smoothed.num_classes), np.inf)  # [B, C]: over the levels passed, the
  #                    margin below p0 of every class but c, for each class c answered later
  active = np.arange(len(x))
  for k, level_sigma in enumerate(levels):
    lowest, level_sigma = k == len(levels) - 1, float(np.float32(level_sigma))
    guess, counts = level_counts(smoothed, x[active], ids[active], level_sigma, k)
    samples[active] += smoothed.n
    sigma[active] = level_sigma
    top = counts[np.arange(len(active)), guess]
    target = 0.5 if lowest else threshold
    lower = bounds.clopper_pearson_lower(top, smoothed.n,
                                         alpha_level if lowest else alpha_level / 2)
    above = margin[active, guess]  # > 0: no other class reaches p0 at a level above
    answers = (lower >= target) & (above > 0)
    own = level_sigma * (stats.norm.ppf(np.where(answers, lower, 0.5)) - stats.norm.ppf(target))
    prediction[active[answers]] = guess[answers]
    radius[active[answers]] = np.minimum(own[answers], above[answers])
    if lowest:
      break
    upper = bounds.clopper_pearson_upper(counts, smoothed.n, alpha_level / (2 * counts.shape[1]))
    margin[active] = np.minimum(margin[active], level_sigma * (
        stats.norm.ppf(threshold) - stats.norm.ppf(off_class_max(upper))))
    active = active[~answers & (lower < target)]
    if not len(active):
      break
  return Certified(prediction, radius, sigma, samples)


def off_class_max(values):
  """[B, C]: for each class c, the largest value over the other classes."""
  order = np.argsort(values, axis=1)
  first = np.take_along_axis(values, order[:, -1:], axis=1)
  second = np.take_along_axis(values, order[:, -2:-1], axis=1)
  return np.where(np.arange(values.shape[1]) == order[:, -1:], second, first)


def level_counts(smoothed, x, ids, sigma, level):
  """(guess int[b], counts int[b, C]) at one level: the class of n0 selection samples and the
  counts of n fresh estimation samples, from that level's own stream, by the classifier
  smoothed.model_at(σ) (instances padded: certificates.padded_rows)."""
  rows = padded_rows(np.arange(len(x)))
  key = jax.random.fold_in(jax.random.fold_in(smoothed.key, Stream.CASCADE), level)
  count = lambda stream, num: np.asarray(sampler.counts(
      smoothed.model_at(sigma), x[rows], np.full(len(rows), sigma, np.float32), ids[rows],
      jax.random.fold_in(key, stream), num=num, batch_size=smoothed.batch_size,
      num_classes=smoothed.num_classes))[: len(x)]
  guess = np.argmax(count(Stream.SELECT, smoothed.n0), axis=1).astype(np.int32)
  return guess, count(Stream.ESTIMATE, smoothed.n)
