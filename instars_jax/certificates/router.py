"""router: σ from a grid σ_1 < … < σ_K, picked by a tree of binary σ-estimators, each certified
(train with --config.train.estimator.router=True). Sound for the input-dependent classifier
G(x) = g_{σ(x)}(x).

Node k (k = K … 2) decides "σ_k" against "a lower σ", smoothed at σ'_k: σ_k, the largest σ it
decides between, or a multiple of it (train.estimator.node_sigma_factor; the σ saved with the
node is the one its radius uses): node K first; where it says "lower", node K − 1; and so on
down to σ_1. Each
node is a smoothed classifier over two bins certified like locally_constant's estimator
(`locally_constant.certify_estimator`: its decision with the radius within which it holds,
or an abstention where the node is unsure: with two bins there is no undecided route, so a
node's whole budget goes to CERTIFY). A node at σ_k sees the input through less noise than
an estimator at the top of the grid, so it can tell apart inputs that only a small σ
certifies well. Its radius is at most σ'_k Φ⁻¹((β/(K−1))^(1/n)) (all n samples in one bin),
below the class test's cap σ_k Φ⁻¹((α−β)^(1/n)) whenever σ'_k = σ_k and β/(K−1) < α − β: on
inputs whose class radius reaches the cap, the node's cap binds (a larger σ'_k lifts it).

Guarantee. The radius is min(radii of the nodes on the path, class radius). With probability
≥ 1 − β every node on the path decides as certified within its radius (each node's tests at
β/(K − 1), fixed in advance: the union bound over the nodes that may be evaluated), so inside
the smaller ball the path is the same at every x', hence σ(x') = σ(x) (the proof of
locally_constant, node by node); and with probability ≥ 1 − (α − β), CERTIFY of the base
model at that σ holds within the class radius. By the union bound, G(x') = c for every x'
in the ball with probability ≥ 1 − α. A node that abstains makes the certificate abstain.
"""

from __future__ import annotations

import jax
import numpy as np

from instars_jax import certificates
from instars_jax.certificates import Certified, locally_constant
from instars_jax.smoothing import sampler
from instars_jax.smoothing.streams import Stream
from instars_jax.selection import estimator

NAME = __name__.rpartition(".")[2]  # the kind is named by its file
SOUND = True
MULTI_HOST = True
MEANING = ("sound for G(x) = g_sigma(x)(x) with sigma picked by a tree of smoothed, certified "
           "binary sigma estimators, node k deciding sigma_k against lower, smoothed at its own "
           "sigma (sigma_k unless train.estimator.node_sigma_factor says otherwise): "
           "radius = min(radii of the nodes on the path, class radius); failure probability "
           "alpha = beta (split equally over the nodes) + the class test's alpha")
validate = locally_constant.validate
sigmas = locally_constant.sigmas
alpha_split = locally_constant.alpha_split


def file_stem(config) -> str:
  del config
  return NAME


def nodes(config, workdir) -> list:
  """[(Estimator, saved settings with the checkpoint "step")] of the router nodes from the top
  of the grid down; ValueError where the trained nodes were made for another grid,
  FileNotFoundError where one is missing."""
  grid = estimator.grid_of(config)
  found = []
  for k in range(len(grid) - 1, 0, -1):
    chooser = estimator.router_node(workdir, grid, k)
    saved = estimator.checkpointed_settings(chooser.directory)
    if tuple(saved["grid"]) != grid or saved.get("node") != k:
      raise ValueError(f"the router node in {chooser.directory} was trained for grid "
                       f"{tuple(saved['grid'])} (node {saved.get('node')}), not "
                       f"train.table.grid={grid} (node {k})")
    found.append((chooser, saved))
  return found


def metadata(config, workdir) -> dict:
  alpha_class, beta = alpha_split(config)
  c, trained = config.certify, nodes(config, workdir)
  return {"grid": list(estimator.grid_of(config)),
          "router": {"nodes": [saved for _, saved in trained], "n": c.estimator.n or c.n,
                     "beta_per_node": beta / len(trained)},
          "alpha_split": {"alpha_class": alpha_class, "beta_estimator": beta, "total": c.alpha}}


def loaded_nodes(smoothed, config) -> list:
  """The trained nodes as Estimators from the top of the grid down, each at the checkpoint
  the results' metadata records, tested with certify.estimator.n samples (0: certify.n)."""
  n, found = config.certify.estimator.n or smoothed.n, []
  steps = {node["node"]: node["step"] for node in smoothed.metadata["router"]["nodes"]}
  for chooser, _ in nodes(config, smoothed.workdir):
    fn, saved = estimator.load(chooser.directory, smoothed.workdir, steps[chooser.node])
    found.append(chooser.loaded(fn, n, saved["sigma"]))
  return found


def prepare(smoothed, config):
  tree = loaded_nodes(smoothed, config)
  grid, beta = np.asarray(estimator.grid_of(config), np.float32), alpha_split(config)[1]

  def certify(x, ids) -> Certified:
    return certify_router(smoothed, tree, grid, x, ids, beta)

  return certify


def certify_router(smoothed, tree, grid, x, ids, beta) -> Certified:
  """The router certificate (module doc): `tree` holds the nodes' Estimators from the top of
  `grid` down (node for grid[k] at position K − 1 − k)."""
  def decide(node, x, ids, key, beta_node):
    decision, radius = locally_constant.certify_estimator(smoothed, node, x, ids, key, beta_node)
    return decision == 0, decision == 1, radius
  return certify_chain(smoothed, tree, grid, x, ids, beta, Stream.ROUTER, decide)


def node_key(key, stream, k):
  """The key of the chain's node for grid index k: its own stream."""
  return jax.random.fold_in(jax.random.fold_in(key, stream), k)


def certify_chain(smoothed, nodes, grid, x, ids, beta, stream, decide,
                  class_key=None) -> Certified:
  """A certificate of G(x) = g_{σ(x)}(x) with σ(x) from a chain of binary selectors over
  `grid`, node K (for grid[K − 1]) first: `decide(node, x, ids, key, β_node)` gives, for each
  input at a node, (goes lower, stays at the node's σ, radius within which that decision
  holds), neither where it abstains. Radius = min(radii on the path, class radius); the nodes
  share β equally, each with its own stream, and the class test gets α − β, on its own stream
  or, with `class_key(k)`, on the key that function gives for grid index k (the inputs of
  each chosen σ tested apart: the noise of an input depends only on its key and id)."""
  x, _, ids = sampler.validate_instances(x, 1.0, ids)
  if not 0 < beta < smoothed.alpha:
    raise ValueError(f"beta must lie in (0, alpha={smoothed.alpha}); got {beta}")
  level = np.zeros(len(x), np.int32)  # the grid index chosen: σ_1 unless a node keeps x
  path = np.full(len(x), np.inf)  # min radius over the nodes on the path
  abstain = np.zeros(len(x), bool)
  active = np.arange(len(x))
  for depth, node in enumerate(nodes):
    k = len(grid) - 1 - depth
    key = node_key(smoothed.key, stream, k)
    lower, stays, radius = decide(node, x[active], ids[active], key, beta / len(nodes))
    path[active] = np.minimum(path[active], radius)
    abstain[active[~lower & ~stays]] = True
    level[active[stays]] = k
    active = active[lower]
    if not len(active):
      break
  sigma = grid[level]
  cls = class_test(smoothed, x, sigma, ids, level, beta, class_key)
  certified = ~abstain & (cls.prediction != sampler.ABSTAIN)
  radius = np.where(certified, np.minimum(path, cls.radius), 0.0)
  prediction = np.where(certified, cls.prediction, sampler.ABSTAIN).astype(np.int32)
  return Certified(prediction, radius, sigma, cls.num_samples)


def class_test(smoothed, x, sigma, ids, level, beta, class_key=None) -> sampler.Certificate:
  """CERTIFY at α − β of every input at its chosen σ: on the class-test stream, or on
  `class_key(k)` for the inputs at grid index k (certify_chain)."""
  if class_key is None:
    return smoothed.certify(x, sigma, ids, key=jax.random.fold_in(smoothed.key, Stream.CLASS_TEST),
                            alpha=smoothed.alpha - beta)
  parts = {sigma[level == k][0]: smoothed.certify(x[level == k], sigma[level == k],
                                                  ids[level == k], key=class_key(k),
                                                  alpha=smoothed.alpha - beta)
           for k in np.unique(level)}
  return sampler.Certificate(*(certificates.stitch(sigma, {s: part[f] for s, part in parts.items()})
                               for f in range(len(sampler.Certificate._fields))))
