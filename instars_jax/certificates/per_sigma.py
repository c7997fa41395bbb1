"""per_sigma: Insta-RS as published. σ per input by the multi-start search (smoothing/search.py,
on its own samples), then CERTIFY at that σ with fresh samples.

NOT a certificate of the input-dependent classifier G(x) = g_{σ(x)}(x) that such a system
deploys: the radius holds for g_σ at the σ chosen for x, and a nearby x' may get another σ
and another answer (Súkeník, Kuvshinov & Günnemann, ICML 2022; tests/test_certificates.py
builds inputs on which it certifies intersecting balls of different classes). Shown only as
a labelled, unsound extra.
"""

import jax

from instars_jax.certificates import Certified
from instars_jax.smoothing import search
from instars_jax.smoothing.streams import Stream

NAME = __name__.rpartition(".")[2]  # the kind is named by its file
SOUND = False
MULTI_HOST = True
MEANING = ("certifies g_sigma at the chosen sigma; not a certificate of the input-dependent "
           "classifier G(x) = g_sigma(x)(x) (Insta-RS as published; see Sukenik et al., "
           "ICML 2022)")
SECTION = "search"  # config.certify.search, shared with memory
DEFAULTS = {
    "sigma_min": 0.05,
    "sigma_max": 1.0,
    "starts": 4,
    "steps": 6,  # evaluations per start (golden section + a fresh check)
    "samples_per_step": 0,  # 0: the search uses 10% of certify.n
    "estimate_alpha": 0.01,  # caution in the search's estimate of p_A
}


def search_arguments(config) -> dict:
  """The σ-search parameters of `config.certify.search`, with the 10%-of-n default resolved."""
  s, c = config.certify.search, config.certify
  samples = s.samples_per_step or search.default_samples_per_step(c.n, s.starts, s.steps)
  return {"sigma_min": s.sigma_min, "sigma_max": s.sigma_max, "starts": s.starts,
          "steps": s.steps, "samples_per_step": samples, "estimate_alpha": s.estimate_alpha}


def validate(config) -> None:
  c = config.certify
  search.validate_search(**search_arguments(config), n=c.n, alpha=c.alpha, batch_size=c.batch)


def sigmas(config) -> None:
  del config  # σ anywhere in [sigma_min, sigma_max], found by the search


def search_range(config) -> str:
  s = config.certify.search
  return f"{s.sigma_min:g}-{s.sigma_max:g}"


def file_stem(config) -> str:
  return f"{NAME}_{search_range(config)}"


def metadata(config, workdir) -> dict:
  del workdir
  c, arguments = config.certify, search_arguments(config)
  budget = search.search_budget(c.search.starts, c.search.steps, arguments["samples_per_step"])
  return {"search": arguments, "search_samples_per_instance": budget,
          "search_share_of_samples": budget / (budget + c.n0 + c.n)}


def prepare(smoothed, config):
  arguments = search_arguments(config)

  def certify(x, ids) -> Certified:
    sigma = search.search_sigma(smoothed.apply_fn, x,
                                jax.random.fold_in(smoothed.key, Stream.SEARCH), **arguments,
                                n=smoothed.n, alpha=smoothed.alpha, batch_size=smoothed.batch_size,
                                num_classes=smoothed.num_classes, ids=ids)
    cert = smoothed.certify(x, sigma, ids)
    return Certified(cert.prediction, cert.radius, cert.sigma, cert.num_samples)

  return certify
