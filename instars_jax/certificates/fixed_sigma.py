"""fixed_sigma: Cohen et al.'s CERTIFY with one σ (`certify.sigma`; unset: the run's
`train.sigma`, the σ a Cohen model was trained at) for every input.

Sound (Cohen, Rosenfeld & Kolter 2019, Theorem 1 with a Clopper–Pearson bound at level α):
with probability ≥ 1 − α the smoothed classifier g_σ returns the prediction everywhere
within the radius. The whole α goes to the one test.
"""

import numpy as np

from instars_jax.certificates import Certified

NAME = __name__.rpartition(".")[2]  # the kind is named by its file
SOUND = True
MULTI_HOST = True
MEANING = ("sound: Cohen et al. CERTIFY of the smoothed classifier g_sigma, one sigma for "
           "every input")


def sigma_of(config) -> float:
  """certify.sigma, or the run's train.sigma where it is unset (None)."""
  sigma = config.certify.sigma
  return float(config.train.sigma if sigma is None else sigma)


def validate(config) -> None:
  sigma = sigma_of(config)
  if not (np.isfinite(sigma) and sigma > 0):
    raise ValueError(f"certify.sigma must be finite and > 0; got {sigma}")


def sigmas(config) -> tuple:
  return (sigma_of(config),)


def file_stem(config) -> str:
  return f"sigma_{sigma_of(config):g}"


def metadata(config, workdir) -> dict:
  del workdir
  return {"sigma": sigma_of(config)}


def prepare(smoothed, config):
  sigma = sigma_of(config)

  def certify(x, ids) -> Certified:
    cert = smoothed.certify(x, sigma, ids)
    return Certified(cert.prediction, cert.radius, cert.sigma, cert.num_samples)

  return certify
