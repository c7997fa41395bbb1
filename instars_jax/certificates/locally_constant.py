"""locally_constant: σ from a grid, picked by a smoothed σ-estimator that is certified too
(Dual Randomized Smoothing, Sun, Mao & Vechev, ICLR 2026). Sound for the input-dependent
classifier G(x) = g_{σ_ẽ(x)}(x).

The radius is min(estimator radius, class radius): inside it the estimator's choice ẽ is
constant, so G is g at one σ there, and that g is constant too. The failure probability α
(`certify.alpha`) is split by the union bound: β = `certify.estimator.beta_share` · α for the
estimator's tests, α − β for the class test (`certify_locally_constant`). The estimator
(selection/estimator.py) is trained by train.py (`train.estimator.epochs`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from scipy import stats

from instars_jax.certificates import Certified
from instars_jax.smoothing import bounds, sampler
from instars_jax.smoothing.streams import Stream
from instars_jax.selection import estimator
from instars_jax.selection.estimator import Estimator

NAME = __name__.rpartition(".")[2]  # the kind is named by its file
SOUND = True
MULTI_HOST = True
MEANING = ("sound for G(x) = g_sigma_e(x)(x) with a smoothed, certified sigma estimator e "
           "(Dual Randomized Smoothing; e = the bin above 1/2, else the smallest sigma): "
           "radius = min(estimator radius, class radius); failure probability alpha = beta "
           "(estimator) + the class test's alpha")
SECTION = "estimator"  # config.certify.estimator, shared with router and thresholded
DEFAULTS = {
    "n": 0,  # the selector's CERTIFY samples; 0: certify.n
    # certify.alpha is the failure probability of the whole certificate: the selector's tests
    # get beta = beta_share * alpha, the class test alpha - beta (union bound).
    "beta_share": 0.5,
}


def validate(config) -> None:
  e = config.certify.estimator
  if e.n < 0 or not 0 < e.beta_share < 1:
    raise ValueError("certify.estimator.n must be >= 0 (0: certify.n) and "
                     "certify.estimator.beta_share must lie in (0, 1); got "
                     f"{e.n}, {e.beta_share}")


sigmas = estimator.grid_of


def file_stem(config) -> str:
  del config
  return NAME


def alpha_split(config) -> tuple[float, float]:
  """(class test's α, estimator's β); they sum to certify.alpha."""
  c = config.certify
  beta = c.alpha * c.estimator.beta_share
  return c.alpha - beta, beta


def metadata(config, workdir) -> dict:
  """The trained estimator's settings (FileNotFoundError when there is none), its n, and the
  split of α."""
  alpha_class, beta = alpha_split(config)
  c = config.certify
  return {"estimator": dict(estimator.checkpointed_settings(workdir.estimator_dir),
                            n=c.estimator.n or c.n),
          "alpha_split": {"alpha_class": alpha_class, "beta_estimator": beta, "total": c.alpha}}


def prepare(smoothed, config):
  fn, saved = estimator.load(smoothed.workdir.estimator_dir, smoothed.workdir,
                             smoothed.metadata["estimator"]["step"])
  chooser = Estimator(tuple(saved["grid"]), saved["sigma"], fn=fn,
                      n=config.certify.estimator.n or smoothed.n)
  beta = alpha_split(config)[1]

  def certify(x, ids) -> Certified:
    cert = certify_locally_constant(smoothed, chooser, x, ids, beta)
    return Certified(cert.prediction, cert.radius, cert.sigma, cert.num_samples)

  return certify


class LocallyConstantCertificate(NamedTuple):
  prediction: np.ndarray  # int32[B], ABSTAIN where either test fails
  radius: np.ndarray  # float64[B]: min(estimator radius, class radius)
  sigma: np.ndarray  # float32[B]: the grid σ the estimator certified (bin 0 on abstention)
  estimator_radius: np.ndarray
  class_radius: np.ndarray
  num_samples: np.ndarray  # int64[B]: the class test's estimation samples


def certify_estimator(smoothed, chooser: Estimator, x, ids, key, beta):
  """(bin int32[B], radius float64[B]) on which the smoothed estimator's choice ẽ is constant,
  bin = ABSTAIN where neither route below certifies it (n0 and batch size from `smoothed`).

  ẽ(x) is the bin whose probability under N(0, σ_e²I) noise is at least 1/2, or bin 0 (the
  smallest σ) when every bin's is below 1/2 (the package's one tie rule: a probability of
  exactly 1/2 answers, with radius 0). Two routes on the same n samples, with the failure
  budget β split by the union bound:
    decided    CERTIFY at β/2: bin k with p_k ≥ p_lower ≥ 1/2 and, by Cohen et al.'s
               Theorem 1, p_k(x') > 1/2 (so ẽ(x') = k) for ‖x' − x‖ < σ_e Φ⁻¹(p_lower);
    undecided  one-sided Clopper–Pearson upper bounds u_k, each at β/(2K): if every u_k < 1/2,
               the same theorem applied to each bin gives p_k(x') < 1/2 for all k, so
               ẽ(x') = 0, for ‖x' − x‖ < σ_e Φ⁻¹(1 − max_k u_k).
  The routes cannot both hold (a lower bound never exceeds an upper bound), and an input
  whose estimator is unsure gets the smallest σ with a radius instead of an abstention.
  With two bins the undecided route can never fire (the larger upper bound is at least the
  larger frequency, ≥ 1/2), so CERTIFY gets the whole β. Radii use float32(σ_e), the σ the
  noise was drawn at."""
  num_bins, n = len(chooser.bin_sigmas), chooser.n
  undecided_route = num_bins > 2
  decided = sampler.certify(chooser.fn, x, chooser.sigma, key, n0=smoothed.n0, n=n,
                            alpha=beta / 2 if undecided_route else beta,
                            batch_size=smoothed.batch_size, num_classes=num_bins, ids=ids)
  if not undecided_route:
    return decided.prediction, decided.radius
  counts = np.asarray(decided.counts)
  upper = bounds.clopper_pearson_upper(counts, n, beta / (2 * num_bins))
  undecided = upper.max(axis=1) < 0.5
  bin_ = np.where(decided.prediction != sampler.ABSTAIN, decided.prediction,
                  np.where(undecided, 0, sampler.ABSTAIN)).astype(np.int32)
  undecided_radius = float(np.float32(chooser.sigma)) * stats.norm.ppf(
      1.0 - np.minimum(upper.max(axis=1), 0.5))
  radius = np.where(decided.prediction != sampler.ABSTAIN, decided.radius,
                    np.where(undecided, undecided_radius, 0.0))
  return bin_, radius


def certify_locally_constant(smoothed, chooser: Estimator, x, ids,
                             beta) -> LocallyConstantCertificate:
  """A sound certificate for the input-dependent classifier G(x) = g_{σ_{ẽ(x)}}(x), with the
  base model and CERTIFY settings of `smoothed` (certificates.SmoothedModel) and the σ-estimator
  `chooser`
  (ẽ: `certify_estimator`, the bin of probability above 1/2 under its noise, else the
  smallest σ).

  Guarantee (Sun, Mao & Vechev, ICLR 2026, Theorem: min of the two radii, failure α + β).
  smoothed.alpha is the failure probability of the whole certificate; the estimator's tests run
  at β = `beta` and the class's at α − β. `certify_estimator` returns a bin k and R_e such
  that, with probability ≥ 1 − β, ẽ(x') = k for all ‖x' − x‖ < R_e. CERTIFY of the base
  classifier at σ_k returns c and R_c such that, with probability ≥ 1 − (α − β),
  g_{σ_k}(x') = c for all ‖x' − x‖ < R_c. By the union bound both hold with probability
  ≥ 1 − α, and then for every ‖x' − x‖ < min(R_e, R_c): G(x') = g_{σ_{ẽ(x')}}(x') =
  g_{σ_k}(x') = c. If either test abstains, so does G's certificate. The tests use
  independent noise. The run's stopping rule applies to the class test; the estimator's test
  draws its fixed chooser.n samples.
  """
  if not 0 < beta < smoothed.alpha:
    raise ValueError(f"beta must lie in (0, alpha={smoothed.alpha}); got {beta}")
  bin_, estimator_radius = certify_estimator(
      smoothed, chooser, x, ids, jax.random.fold_in(smoothed.key, Stream.ESTIMATOR_TEST), beta)
  selected = bin_ != sampler.ABSTAIN
  sigma = np.asarray(chooser.bin_sigmas, np.float32)[np.where(selected, bin_, 0)]
  cls = smoothed.certify(x, sigma, ids, key=jax.random.fold_in(smoothed.key, Stream.CLASS_TEST),
                         alpha=smoothed.alpha - beta)
  certified = selected & (cls.prediction != sampler.ABSTAIN)
  radius = np.where(certified, np.minimum(estimator_radius, cls.radius), 0.0)
  prediction = np.where(certified, cls.prediction, sampler.ABSTAIN).astype(np.int32)
  return LocallyConstantCertificate(prediction, radius, sigma,
                                    estimator_radius, cls.radius, cls.num_samples)
