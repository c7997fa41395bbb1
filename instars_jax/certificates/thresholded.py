"""thresholded: σ from a grid σ_1 < … < σ_K by a chain of thresholded binary selectors, the
router's trained nodes (train with --config.train.estimator.router=True). Sound for the
input-dependent classifier G(x) = g_{σ(x)}(x).

Node k (k = K … 2), smoothed at its own σ (saved with it: σ_k × train.estimator.node_sigma_factor),
gives q_k(x), the probability of its bin "a lower σ" under that noise. The chain moves x down
from σ_k only where q_k(x) ≥ τ (`certify.thresholded.threshold`, τ ∈ (0, 1)): node K first,
then, where it moved, node K − 1, and so on; the first node that keeps x fixes σ(x) = σ_k,
and x that every node moves gets σ_1. (The package's one tie rule: q_k = τ moves, with radius
0.) Both routes take their radius from the distance to τ, not to 1/2, so τ sets the default
route and its price. τ > 1/2: the largest σ is the default, and a high τ moves an input only
where the selector is sure, keeping a large radius where it does not move it. τ < 1/2: "lower"
is the default, and a node keeps x at σ_k only where it is sure that q_k < τ (with one node,
K = 2, the chain starts at σ_1 and moves up). `python -m instars_jax.tune` picks τ on held-out
data from both sides, so the default route is the one most held-out images are best served by.

Certificate. For each node on the path, a two-sided Clopper–Pearson interval L ≤ q_k(x) ≤ U
from n samples. With σ'_k the node's own σ, the node moved x with radius σ'_k (Φ⁻¹(L) −
Φ⁻¹(τ)) where L ≥ τ, kept it with radius σ'_k (Φ⁻¹(τ) − Φ⁻¹(U)) where U < τ, and the
certificate abstains otherwise. Then

    R = min(the radii of the nodes on the path, the class radius of CERTIFY at σ(x)).

Proof. x ↦ Φ⁻¹(q_k(x)) is 1/σ'_k-Lipschitz (Salman et al., NeurIPS 2019, Lemma 2; the
statement behind Cohen et al.'s Theorem 1), so within its radius each node on the path
decides at x' as it did at x, the path is the same and σ(x') = σ(x); within the class radius
g_{σ(x)}(x') = c (Cohen et al., Theorem 1). So G(x') = c for ‖x' − x‖ < R.

Failure probability. β = `certify.estimator.beta_share` · α for the selector: β/(K − 1) per
node, fixed in advance for every node that may be evaluated, split β/(2(K − 1)) for each of
its two bounds; α − β for the class test (union bound). Each node draws its own n samples
(`certify.estimator.n`, 0: certify.n) from its own stream.

Shared samples (`certify.thresholded.shared_samples`). The class test at σ_k then draws its
estimation samples from the same standard normal vectors z_j as node k, the last node on the
path of an input kept at σ_k (node 2 for σ_1; the first min(node n, certify.n) of them where
the two n differ): the node sees x + σ'_k z_j, the class test x + σ_k z_j, so where
σ'_k = σ_k a selector head on the expert could answer both from one forward pass.
The α split is unchanged. Let E be the event that every node's interval holds at x; by the
union bound P(not E) ≤ β, whatever the samples are shared with. On E, each node that decides
decides as its true q_k(x) does, so a certificate that does not abstain has the true path,
which x alone fixes, and its class test is CERTIFY at the fixed σ*(x) of the fixed expert,
whose failure event F has P(F) ≤ α − β under the law of its own samples: z_j ~ N(0, I)
i.i.d., whatever the node did with them. A wrong certificate needs not E, or E and F: at
most β + (α − β) = α. No independence of the node's samples and the class test's is used
(DualRS, Theorem 4.2, does not assume it either). What the proof does not allow is a class
test that depends on the node's outcome beyond the path, for example one that counts only
the samples on which the node voted for the route taken: that is no longer CERTIFY on
N(0, I) samples at a fixed σ, and tests/test_soundness.py shows it certifying falsely where
this one does not.
"""

from __future__ import annotations

import jax
import numpy as np
from scipy import stats

from instars_jax.certificates import Certified, locally_constant, router
from instars_jax.smoothing import bounds, sampler
from instars_jax.smoothing.streams import Stream
from instars_jax.selection import estimator

NAME = __name__.rpartition(".")[2]  # the kind is named by its file
SOUND = True
MULTI_HOST = True
MEANING = ("sound for G(x) = g_sigma(x)(x) with sigma from the largest down, moved lower by "
           "binary smoothed selectors where their probability of 'lower' is at least the "
           "threshold tau (tau < 1/2: lower is the default): radius = min(each node's distance to tau on the path, class "
           "radius); failure probability alpha = beta (split over the nodes and their two "
           "bounds) + the class test's alpha")
DEFAULTS = {
    "threshold": 0.8,  # τ in (0, 1); below 1/2 the lower σ is the default route
    # the τ python -m instars_jax.tune tries, both default routes
    "sweep": (0.05, 0.1, 0.2, 0.3, 0.45, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95),
    # the class test at σ_k on the samples of node k, the last on its path (module doc)
    "shared_samples": False,
}
alpha_split = locally_constant.alpha_split
sigmas = locally_constant.sigmas


def validate(config) -> None:
  locally_constant.validate(config)
  tau = config.certify.thresholded.threshold
  if not 0.0 < tau < 1.0:
    raise ValueError(f"certify.thresholded.threshold must lie in (0, 1); got {tau}")


def file_stem(config) -> str:
  t = config.certify.thresholded
  return f"{NAME}_{t.threshold:g}" + ("_shared" if t.shared_samples else "")


def metadata(config, workdir) -> dict:
  t = config.certify.thresholded
  return router.metadata(config, workdir) | {
      "thresholded": {"threshold": t.threshold, "shared_samples": t.shared_samples}}


def prepare(smoothed, config):
  chain = router.loaded_nodes(smoothed, config)
  grid, beta = np.asarray(estimator.grid_of(config), np.float32), alpha_split(config)[1]
  t = config.certify.thresholded

  def certify(x, ids) -> Certified:
    return certify_thresholded(smoothed, chain, grid, x, ids, beta, t.threshold, t.shared_samples)

  return certify


def node_counts(smoothed, node, x, ids, key) -> np.ndarray:
  """int[b]: how many of the node's n samples fall in bin 0 ("lower")."""
  sigma = np.full(len(x), node.sigma, np.float32)
  return np.asarray(sampler.counts(node.fn, x, sigma, ids, key, num=node.n,
                                   batch_size=smoothed.batch_size, num_classes=2))[:, 0]


def node_decision(lower_counts, node, beta_node, tau):
  """(moves bool[b], keeps bool[b], radius float64[b]) of one node from its bin-0 counts: its
  interval on q (the probability of "lower") at β_node, and its distance to τ on the side it
  decided."""
  sigma = float(np.float32(node.sigma))
  lower = bounds.clopper_pearson_lower(lower_counts, node.n, beta_node / 2)
  upper = bounds.clopper_pearson_upper(lower_counts, node.n, beta_node / 2)
  moves, keeps = lower >= tau, upper < tau
  margin = np.where(moves, stats.norm.ppf(lower) - stats.norm.ppf(tau),
                    stats.norm.ppf(tau) - stats.norm.ppf(np.minimum(upper, tau)))
  return moves, keeps, np.where(moves | keeps, sigma * margin, 0.0)


def counts_key(node_stream, shared: bool):
  """The key of a node's counts from its stream's key: the stream itself, or with shared
  samples the estimation key a class test on that stream draws (sampler.certify's
  Stream.ESTIMATE), so that both see the same z_j."""
  return jax.random.fold_in(node_stream, Stream.ESTIMATE) if shared else node_stream


def shared_class_key(smoothed):
  """With shared samples, the class test's key at grid index k: the stream of node k, the
  last node on the path of an input kept at σ_k (node 2, index 1, for σ_1)."""
  return lambda k: router.node_key(smoothed.key, Stream.THRESHOLDED, max(int(k), 1))


def certify_thresholded(smoothed, chain, grid, x, ids, beta, tau, shared=False) -> Certified:
  """The thresholded chain's certificate (module doc): `chain` holds the nodes' Estimators
  from the top of `grid` down (the node for grid[k] at position K − 1 − k); `shared`: the
  class test on its path's last node's samples."""
  def decide(node, x, ids, key, beta_node):
    counts = node_counts(smoothed, node, x, ids, counts_key(key, shared))
    return node_decision(counts, node, beta_node, tau)
  return router.certify_chain(smoothed, chain, grid, x, ids, beta, Stream.THRESHOLDED, decide,
                              shared_class_key(smoothed) if shared else None)


def class_tests(smoothed, grid, x, ids, beta, shared=False) -> dict:
  """{float32 σ: sampler.Certificate over every input}: the chain's class test (CERTIFY at
  α − β on its stream, or with `shared` on the samples of the node that keeps an input at
  that σ) of every input at every grid σ."""
  keys = (shared_class_key(smoothed) if shared
          else lambda k: jax.random.fold_in(smoothed.key, Stream.CLASS_TEST))
  return {np.float32(s): smoothed.certify(x, s, ids, key=keys(k), alpha=smoothed.alpha - beta)
          for k, s in enumerate(grid)}


def chain_counts(smoothed, chain, grid, x, ids, shared=False) -> dict:
  """{id(node): int[b]}: every node's bin-0 counts over every input, on the streams the chain
  draws them from (certify_thresholded), one pass per node."""
  stream = lambda depth: router.node_key(smoothed.key, Stream.THRESHOLDED, len(grid) - 1 - depth)
  return {id(node): node_counts(smoothed, node, x, ids, counts_key(stream(depth), shared))
          for depth, node in enumerate(chain)}


def sweep(smoothed, chain, grid, x, ids, beta, thresholds, tests=None, shared=False,
          counts=None, decision=node_decision) -> dict:
  """{τ: Certified}: certify_thresholded at each τ of `thresholds`, from one pass of every node
  over every input (`chain_counts`, or `counts` drawn by it before) and one class test of
  every input at every grid σ (`class_tests`, or `tests` drawn by it before for the same
  inputs and run), on the same streams, so each τ's rows are those certify_thresholded writes
  (a tuning aid: K − 1 + K passes for any number of τ). `decision` replaces node_decision
  only to project what another n would give (bench/selector_levers.py), not to certify."""
  x, _, ids = sampler.validate_instances(x, 1.0, ids)
  row = {int(i): r for r, i in enumerate(ids)}
  lower = chain_counts(smoothed, chain, grid, x, ids, shared) if counts is None else counts
  tests = class_tests(smoothed, grid, x, ids, beta, shared) if tests is None else tests
  recorded = _Recorded(smoothed.key, smoothed.alpha, tests, row)
  found = {}
  for tau in thresholds:
    def decide(node, x_part, ids_part, key, beta_node, tau=tau):
      del x_part, key
      return decision(lower[id(node)][[row[int(i)] for i in ids_part]], node, beta_node, tau)
    found[tau] = router.certify_chain(recorded, chain, grid, x, ids, beta, Stream.THRESHOLDED,
                                      decide)
  return found


class _Recorded:
  """A run whose class tests were all drawn before: `certify` looks up each input's
  certificate at its σ (by id) in `tests` ({σ: sampler.Certificate over every input}),
  ignoring the key it is given: `tests` were drawn on the keys the chain would pass
  (class_tests, shared or not)."""

  def __init__(self, key, alpha, tests, row):
    self.key, self.alpha, self.tests, self.row = key, alpha, tests, row

  def certify(self, x, sigma, ids, *, key, alpha) -> sampler.Certificate:
    del x, key, alpha
    rows = [self.row[int(i)] for i in ids]
    fields = [np.stack([self.tests[np.float32(s)][f][r] for s, r in zip(sigma, rows)])
              for f in range(len(sampler.Certificate._fields))]
    return sampler.Certificate(*fields)
