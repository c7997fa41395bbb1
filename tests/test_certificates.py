"""Instance-wise certificates: per_sigma is unsound for the input-dependent classifier;
memory and locally_constant are not; every kind answers through one interface."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import instars_jax as ij
from helpers import LinearClassifier, prepared, recorded_bounds, x7_nodes
from instars_jax import certificates
from instars_jax.smoothing import bounds
from instars_jax.certificates import SmoothedModel, locally_constant
from instars_jax.certificates import memory as memory_kind
from instars_jax.selection.estimator import Estimator
from instars_jax.storage.parts import Parts

DIM = 16


class Island:
  """Class 0 inside a ball of radius rho around c, class 1 outside: only a small σ sees it."""
  rho = 1.0

  def __init__(self):
    self.c = np.zeros(DIM, np.float32)

  def __call__(self, z):
    inside = jnp.linalg.norm(z.reshape(z.shape[0], -1) - self.c, axis=1) < self.rho
    score = jnp.where(inside, 1.0, -1.0)
    return jnp.stack([score, -score], axis=-1)


def sigma_rule(x):
  """σ jumps across the hyperplane x_0 = 0: tiny on one side, large on the other."""
  return np.where(x[:, 0] < 0, 0.1, 2.0).astype(np.float32)


def half_space_estimator(x):
  """σ-estimator base function: bin 1 (σ = 2) where x_0 >= 0, bin 0 (σ = 0.1) elsewhere."""
  z = x.reshape(x.shape[0], -1)[:, 0]
  return jnp.stack([-z, z], axis=-1) * 100.0


@pytest.fixture(scope="module")
def island_points():
  rng = np.random.default_rng(0)
  directions = rng.normal(size=(120, DIM))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  return (directions * rng.uniform(0.05, 0.6, size=(120, 1))).astype(np.float32)


def per_sigma_answers(points):
  cert = ij.certify(Island(), points, sigma_rule(points), jax.random.PRNGKey(0), n0=64, n=2000,
                    alpha=0.001, batch_size=8192, num_classes=2)
  return cert.prediction, cert.radius


def test_per_sigma_certifies_intersecting_balls_of_different_classes(island_points):
  prediction, radius = per_sigma_answers(island_points)
  assert set(prediction[island_points[:, 0] < 0]) == {0}  # the island, seen at σ = 0.1
  assert set(prediction[island_points[:, 0] >= 0]) == {1}  # σ = 2 drowns it
  clashes = certificates.intersecting_pairs(island_points, prediction, radius)
  assert clashes > 1000  # of 7,140 pairs: the published certificate contradicts itself


def test_memory_never_certifies_intersecting_balls(island_points):
  prediction, radius = per_sigma_answers(island_points)
  for order_seed in range(3):  # any fixed answering order
    order = np.random.default_rng(order_seed).permutation(len(island_points))
    memory = memory_kind.Memory.empty(DIM)
    answers = []
    for i in order:
      p, r, memory = memory_kind.answer_with_memory(memory, island_points[i], int(prediction[i]),
                                                     float(radius[i]), int(i))
      answers.append((p, r))
    p, r = map(np.asarray, zip(*answers))
    assert certificates.intersecting_pairs(island_points[order], p, r) == 0
    kept = p == prediction[order]  # an answer kept is never certified further than per_sigma did
    assert np.all(r[kept] <= radius[order][kept] + 1e-6)
    points = island_points[order]
    for i in np.flatnonzero(~kept):  # an answer taken from an earlier ball lies inside it
      inside = [j for j in range(i) if p[j] == p[i] and
                r[i] + np.linalg.norm(points[i] - points[j]) <= r[j] + 1e-6]
      assert inside, f"answer {i} changed class without lying inside an earlier ball"
    assert np.sum(r > 0) > 20 and kept.sum() > 20  # still certifies, mostly its own answers


def test_memory_rules_by_hand():
  memory = memory_kind.Memory.empty(2)
  p, r, memory = memory_kind.answer_with_memory(memory, [0.0, 0.0], 0, 1.0, 0)
  assert (p, r) == (0, 1.0)
  # A ball of another class meeting the stored one is cut back to touch it.
  p, r, memory = memory_kind.answer_with_memory(memory, [3.0, 0.0], 1, 2.5, 1)
  assert p == 1 and r == pytest.approx(2.0, rel=1e-5)
  # A point inside a stored ball of another class takes that ball's answer.
  p, r, memory = memory_kind.answer_with_memory(memory, [0.25, 0.0], 1, 0.9, 2)
  assert p == 0 and r == pytest.approx(0.75, rel=1e-5)
  # So does an abstention.
  p, r, memory = memory_kind.answer_with_memory(memory, [3.5, 0.0], ij.ABSTAIN, 0.0, 3)
  assert p == 1 and r == pytest.approx(1.5, rel=1e-5)
  # Outside every ball, an abstention stays one and is not stored.
  size = len(memory.ids)
  p, r, memory = memory_kind.answer_with_memory(memory, [10.0, 10.0], ij.ABSTAIN, 0.0, 4)
  assert (p, r, len(memory.ids)) == (ij.ABSTAIN, 0.0, size)


def test_memory_round_trips_in_appended_parts(tmp_path):
  memory, directory = memory_kind.Memory.empty(3), tmp_path / "m.memory"
  for i in range(4):
    stored = len(memory.ids)
    _, _, memory = memory_kind.answer_with_memory(memory, np.full(3, 10.0 * i), i % 2, 1.0, i)
    memory_kind.append_memory(directory, memory, stored)
  assert len(list(directory.glob("part_*.npz"))) == 4  # one part per append, none rewritten
  for a, b in zip(memory, memory_kind.load_memory(directory, 3)):
    np.testing.assert_array_equal(a, b)
  # Resuming keeps only the points whose rows were written, consolidated into one part.
  kept = memory_kind.load_memory(directory, 3, keep_ids={0, 2})
  np.testing.assert_array_equal(kept.ids, [0, 2])
  assert len(list(directory.glob("part_*.npz"))) == 1
  np.testing.assert_array_equal(memory_kind.load_memory(directory, 3).ids, [0, 2])
  for i in (4, 5):  # numbered after the consolidated part: in order, none overwritten
    stored = len(kept.ids)
    _, _, kept = memory_kind.answer_with_memory(kept, np.full(3, 10.0 * i), 0, 1.0, i)
    memory_kind.append_memory(directory, kept, stored)
  np.testing.assert_array_equal(memory_kind.load_memory(directory, 3).ids, [0, 2, 4, 5])
  assert len(memory_kind.load_memory(tmp_path / "none.memory", 3).ids) == 0


def test_parts_of_other_settings_are_removed_and_a_reader_never_writes(tmp_path):
  Parts(tmp_path / "p", "n=10").append(rows=np.arange(3))
  Parts(tmp_path / "p", "n=10", writer=False).append(rows=np.arange(2))
  assert [p["rows"].tolist() for p in Parts(tmp_path / "p", "n=10").load()] == [[0, 1, 2]]
  reader = Parts(tmp_path / "p", "n=20", writer=False)
  assert reader.paths() and reader.load() == []  # a reader removes nothing, and reads none
  assert Parts(tmp_path / "p", "n=20").load() == [] and not (tmp_path / "p").exists()


def test_locally_constant_never_certifies_intersecting_balls(island_points):
  smoothed = SmoothedModel(Island(), 2, jax.random.PRNGKey(0),
                           n0=64, n=2000, alpha=0.001, batch_size=8192)
  chooser = Estimator((0.1, 2.0), 0.1, fn=half_space_estimator, n=2000)
  cert = locally_constant.certify_locally_constant(smoothed, chooser, island_points, None, 0.0005)
  assert certificates.intersecting_pairs(island_points, cert.prediction, cert.radius) == 0
  certified = cert.prediction != ij.ABSTAIN
  assert certified.sum() > 60
  np.testing.assert_array_equal(cert.radius[certified],
                                np.minimum(cert.estimator_radius, cert.class_radius)[certified])
  # The estimator's radius never crosses the hyperplane where σ jumps.
  assert np.all(cert.radius[certified] <= np.abs(island_points[certified, 0]) + 1e-6)


@pytest.mark.slow
def test_sound_modes_never_exceed_the_true_radius_of_G(linear):
  # A linear base classifier is its own smoothed classifier at every σ, so G equals it
  # whatever σ(x) is, and its exact robust radius is the distance to the hyperplane.
  rng = np.random.default_rng(1)
  distances = rng.uniform(-1.0, 1.0, size=1000)
  x = linear.points_at_distance(distances) + rng.normal(scale=0.3, size=(1000, 8)).astype(
      np.float32) * (linear.w == 0)
  truth = linear.distance(x)
  sigma = np.where(x[:, 7] > 0, 0.25, 0.5).astype(np.float32)  # σ jumps with an unrelated feature
  cert = ij.certify(linear, x, sigma, jax.random.PRNGKey(2), n0=64, n=1000, alpha=0.001,
                    batch_size=65536, num_classes=2)
  memory = memory_kind.Memory.empty(8)
  for i in range(len(x)):
    _, r, memory = memory_kind.answer_with_memory(memory, x[i], int(cert.prediction[i]),
                                                   float(cert.radius[i]), i)
    assert r <= truth[i] + 1e-6
  estimator = lambda z: jnp.stack([-z[:, 7], z[:, 7]], axis=-1) * 100.0
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(3),
                           n0=64, n=1000, alpha=0.001, batch_size=65536)
  chooser = Estimator((0.25, 0.5), 0.25, fn=estimator, n=1000)
  local = locally_constant.certify_locally_constant(smoothed, chooser, x, None, 0.0005)
  assert np.all(local.radius <= truth + 1e-6)
  assert np.mean(local.prediction != ij.ABSTAIN) > 0.5


def test_bad_grid_or_alpha_split_is_rejected(linear):
  with pytest.raises(ValueError, match="sigma_grid"):
    Estimator((0.5,), 0.25, fn=linear, n=8)
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(0), n0=8, n=8, alpha=0.01, batch_size=8)
  chooser = Estimator((0.25, 0.5), 0.25, fn=linear, n=8)
  for beta in (0.01, 0.0):
    with pytest.raises(ValueError, match="beta must lie in"):
      locally_constant.certify_locally_constant(smoothed, chooser, np.zeros((1, 8), np.float32),
                                                None, beta)


def test_every_kind_declares_the_interface_and_answers_through_it(linear, tmp_path, monkeypatch):
  from configs import default
  config = default.get_config()
  config.certify.update(n0=32, n=500, batch=4096, sigma=0.25)
  config.certify.search.update(sigma_min=0.1, sigma_max=1.0, starts=2, steps=3,
                               samples_per_step=16)
  estimator = lambda z: jnp.stack([-z[:, 0], z[:, 0]], axis=-1) * 100.0
  monkeypatch.setattr(locally_constant.estimator, "load", lambda directory, workdir, step: (
      estimator, {"grid": [0.25, 0.5], "sigma": 0.5}))
  # The router's nodes: node k (directory router/node_k) trained for the config's grid.
  monkeypatch.setattr(locally_constant.estimator, "checkpointed_settings", lambda directory: {
      "grid": list(config.train.table.grid), "step": 1,
      "node": int(Path(directory).name.split("_")[1]) if "node_" in str(directory) else None})
  from instars_jax.storage.workdir import Workdir
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(0),
                           n0=32, n=500, alpha=0.001, batch_size=4096,
            workdir=Workdir(tmp_path), results_path=tmp_path / "results.tsv", image_size=8)
  x = linear.points_at_distance(np.array([0.5, 1.0, -0.3]))
  for name in certificates.kinds():
    kind = certificates.get(name)
    assert kind.NAME == name and isinstance(kind.SOUND, bool) and kind.MEANING
    kind.validate(config)
    assert kind.file_stem(config)
    assert kind.sigmas(config) in {None, (0.25,), tuple(config.train.table.grid)}
    out = prepared(kind, smoothed, config)(x, np.arange(3))
    assert out.prediction.shape == out.radius.shape == out.sigma.shape == (3,)
    assert np.all(out.radius <= linear.distance(x) + 1e-6)  # sound for a linear f, any kind
    assert np.sum(out.radius > 0) >= 2


class Bands:
  """A 3-bin σ-estimator on z = x_0: bin 0 for z < −a, bin 1 for |z| ≤ a, bin 2 for z > a.

  Under N(0, σ_e²I), p_0 = Φ((−a − z)/σ_e) and p_2 = Φ((z − a)/σ_e), so ẽ (the bin above 1/2,
  else bin 0) is bin 2 exactly for z > a, bin 0 for z < −a (decided) and for |z| < a
  (undecided: p_0, p_2 < 1/2 and p_1 < 1/2 as a < 0.67 σ_e). The exact radius on which ẽ is
  constant is | |z| − a |."""
  a = 0.5

  def __call__(self, x):
    z = x.reshape(x.shape[0], -1)[:, 0]
    bins = jnp.where(z < -self.a, 0, jnp.where(z > self.a, 2, 1))
    return jax.nn.one_hot(bins, 3) * 100.0


def test_estimator_routes_never_exceed_the_exact_radius_of_its_choice():
  z = np.linspace(-1.5, 1.5, 61)
  x = np.zeros((len(z), 4), np.float32)
  x[:, 0] = z
  smoothed = SmoothedModel(Bands(), 3, jax.random.PRNGKey(0),
                           n0=64, n=20_000, alpha=0.002, batch_size=65536)
  chooser = Estimator((0.25, 0.5, 1.0), 1.0, fn=Bands(), n=20_000)
  bins, radius = locally_constant.certify_estimator(smoothed, chooser, x, None,
                                                    jax.random.PRNGKey(0), 0.001)
  exact = np.abs(np.abs(z) - Bands.a)
  certified = bins != ij.ABSTAIN
  assert np.all(radius[certified] <= exact[certified] + 1e-6)
  assert np.all(bins[z > 0.7] == 2) and np.all(bins[z < -0.7] == 0)
  inside = np.abs(z) < 0.3  # undecided: the smallest σ, with a radius, not an abstention
  assert np.all(bins[inside] == 0) and np.all(radius[inside] > 0)
  # Near the edges of the undecided band nothing may be claimed across them.
  assert np.all(radius[np.abs(np.abs(z) - Bands.a) < 0.02] < 0.05)


def test_cascade_never_exceeds_the_true_radius_and_answers_at_every_level(linear):
  # A linear f is its own smoothed classifier at every σ: p_{σ,0}(x) = Φ(d/σ) for a point at
  # distance d. The cascade over (0.25, 0.5, 1.0) at p0 = 0.6 answers far points at σ = 1,
  # nearer ones lower down, and its radius never passes the hyperplane.
  from instars_jax.certificates import cascade
  distances = np.array([0.02, 0.06, 0.15, 0.3, 0.6, 1.2, 10.0, -0.4])
  x = linear.points_at_distance(distances)
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(4),
                           n0=64, n=20_000, alpha=0.001, batch_size=65536)
  cert = cascade.certify_cascade(smoothed, x, np.arange(len(x)), (0.25, 0.5, 1.0), 0.6)
  truth = linear.distance(x)
  assert np.all(cert.radius <= truth + 1e-6)
  assert set(cert.sigma[cert.prediction != ij.ABSTAIN]) == {0.25, 0.5, 1.0}
  np.testing.assert_array_equal(cert.prediction[2:7], 0)
  assert cert.prediction[-1] == 1 and cert.radius[-1] > 0.05  # the other side: class 1
  assert np.all(cert.num_samples[cert.sigma == 1.0] == 20_000)
  assert np.all(cert.num_samples[cert.sigma == 0.25] == 60_000)  # three levels evaluated
  # Far from the hyperplane (every sample agrees) the top level answers with
  # σ(Φ⁻¹(L) − Φ⁻¹(p0)), L the Clopper–Pearson bound at α/(2K) = α/6.
  lower = bounds.clopper_pearson_lower(20_000, 20_000, 0.001 / 6)
  assert cert.radius[6] == pytest.approx(stats.norm.ppf(lower) - stats.norm.ppf(0.6), rel=1e-5)


@pytest.mark.slow
def test_router_never_exceeds_the_true_radius_at_any_node(linear):
  # Nodes on an unrelated feature x_7: node 2 (σ = 1.0 against lower) says "1.0" where
  # x_7 > 0.5, node 1 (0.5 against 0.25) says "0.5" where x_7 > 0. The base model is linear in
  # the other features, so G's exact radius is the distance to its hyperplane, whatever σ.
  from instars_jax.certificates import router
  x, tree = x7_nodes(linear, 5, 300, scale=100.0, sigmas=(1.0, 0.5), n=2000)
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(6),
                           n0=64, n=2000, alpha=0.001, batch_size=65536)
  cert = router.certify_router(smoothed, tree, np.float32([0.25, 0.5, 1.0]), x, None, 0.0005)
  assert np.all(cert.radius <= linear.distance(x) + 1e-6)
  certified = cert.prediction != ij.ABSTAIN
  assert set(cert.sigma[certified]) == {0.25, 0.5, 1.0} and certified.mean() > 0.5
  # Where node 2 decides (x_7 well above 0.5) σ = 1.0, and its radius caps the certificate.
  top = certified & (x[:, 7] > 0.8)
  assert np.all(cert.sigma[top] == 1.0)
  assert np.all(cert.radius[top] <= x[top, 7] - 0.5 + 1e-6)


def test_router_certifies_no_intersecting_balls_where_per_sigma_does(island_points):
  # The island is seen at σ = 0.1 and drowned at σ = 2, and the per-σ rule picks σ by side of
  # a hyperplane: per_sigma's balls intersect by the thousand (test above). A router whose
  # node decides σ = 2 on the same side certifies none. (The cascade is tested on an island
  # its levels see in test_soundness.py: here σ = 2 in 16 dimensions answers 1 everywhere.)
  from instars_jax.certificates import router
  smoothed = SmoothedModel(Island(), 2, jax.random.PRNGKey(0),
                           n0=64, n=2000, alpha=0.001, batch_size=8192)
  node = Estimator((0.1, 2.0), 0.1, fn=half_space_estimator, n=2000)
  cert = router.certify_router(smoothed, [node], np.float32([0.1, 2.0]), island_points, None,
                               0.0005)
  assert np.sum(cert.prediction[island_points[:, 0] < 0] == 0) > 20  # the island, seen at σ = 0.1
  assert (cert.prediction != ij.ABSTAIN).sum() > 40
  assert certificates.intersecting_pairs(island_points, cert.prediction, cert.radius) == 0


def recorded_alphas(monkeypatch, module, name):
  """The `alpha` (or third positional argument) of every call of module.name, as a list."""
  calls, original = [], getattr(module, name)

  def record(*args, **kwargs):
    calls.append(kwargs["alpha"] if "alpha" in kwargs else args[2])
    return original(*args, **kwargs)
  monkeypatch.setattr(module, name, record)
  return calls


def test_alpha_splits_are_pinned_for_every_instance_wise_kind(linear, monkeypatch):
  # A variant running the class test at the full α, a router node at the whole β, the
  # estimator's undecided bounds at another level, or a cascade level at the whole α would
  # change one of these numbers.
  from instars_jax.certificates import cascade, router
  from instars_jax.smoothing import sampler
  from instars_jax.smoothing.streams import Stream
  x = linear.points_at_distance(np.array([0.3, 2.0, -0.5]))
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(1),
                           n0=32, n=2000, alpha=0.004, batch_size=8192)
  bands = Bands()
  estimator_key = jax.random.fold_in(smoothed.key, Stream.ESTIMATOR_TEST)
  estimator_test = ij.certify(bands, x, 1.0, estimator_key, n0=32, n=2000, alpha=0.0005,
                              batch_size=8192, num_classes=3)
  certify_calls = recorded_alphas(monkeypatch, sampler, "certify")  # estimator, then class
  bound_calls = recorded_bounds(monkeypatch)
  three = Estimator((0.25, 0.5, 1.0), 1.0, fn=bands, n=2000)
  cert = locally_constant.certify_locally_constant(smoothed, three, x, None, 0.001)
  assert certify_calls == [pytest.approx(0.0005), pytest.approx(0.003)]
  # x_0 = 0.067, 0.63, −0.2: the middle input is decided (bin 2, p_2 = Φ(0.13) = 0.55), the
  # others undecided (every p_k < 1/2, Bands): the undecided route bounds every bin's count of
  # the estimator's CERTIFY samples from above at β/(2K) = 0.001/6, and its radius is
  # float32(σ_e) Φ⁻¹(1 − max_k u_k).
  (counts, trials, level), = bound_calls["upper"]
  assert not bound_calls["lower"]  # CERTIFY's own lower bound is the sampler's
  assert trials == 2000 and level == pytest.approx(0.001 / 6, rel=1e-12)
  np.testing.assert_array_equal(counts, estimator_test.counts)
  np.testing.assert_array_equal(cert.sigma, np.float32([0.25, 1.0, 0.25]))
  upper = bounds.clopper_pearson_upper(counts, 2000, 0.001 / 6)
  undecided = np.array([True, False, True])
  np.testing.assert_array_equal(estimator_test.prediction[undecided], ij.ABSTAIN)
  np.testing.assert_allclose(cert.estimator_radius[undecided],
                             stats.norm.ppf(1 - upper.max(axis=1))[undecided], rtol=1e-12)
  assert np.all(cert.estimator_radius[undecided] > 0)
  certify_calls.clear()
  # Node 2 sends x_7 > 0 to σ = 1.0 and the rest to node 1. Binary nodes give each node's
  # whole β/(K − 1) to CERTIFY (they have no undecided route).
  feature = lambda z: jnp.stack([-z[:, 7], z[:, 7]], axis=-1) * 100.0
  x[:, 7] = [1.0, -1.0, -1.0]
  tree = [Estimator((0.5, 1.0), 0.1, fn=feature, n=2000),
          Estimator((0.25, 0.5), 0.1, fn=feature, n=2000)]
  router.certify_router(smoothed, tree, np.float32([0.25, 0.5, 1.0]), x, None, 0.001)
  assert certify_calls == [pytest.approx(0.0005)] * 2 + [pytest.approx(0.003)]
  bound_calls["lower"].clear(), bound_calls["upper"].clear()
  cascade.certify_cascade(smoothed, linear.points_at_distance(np.zeros(2)), np.arange(2),
                          (0.25, 0.5, 1.0), 0.6)
  k, classes = 3, 2  # every input reaches the lowest level: p = 1/2 everywhere
  assert [a for _, _, a in bound_calls["upper"]] == [pytest.approx(0.004 / (2 * k * classes))] * 2
  assert [a for _, _, a in bound_calls["lower"]] == ([pytest.approx(0.004 / (2 * k))] * 2
                                                     + [pytest.approx(0.004 / k)])


def test_cascade_bounds_only_the_other_classes_above_and_abstains_on_every_level(linear):
  # At d = 0.2533, p_{1.0,0} = Φ(0.2533) ≈ 0.6 = p0: level 1.0 cannot tell whether class 0
  # answers there, but class 1 (0.4) certifiably stays below p0, and at σ = 0.5 class 0 is at
  # 0.69: the cascade answers 0 there. Requiring every class to stay below p0 above (the
  # previous rule) abstains. At d = 0 every level is at 1/2: all three abstain.
  from instars_jax.certificates import cascade
  x = linear.points_at_distance(np.array([0.2533, 0.0]))
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(7),
                           n0=64, n=20_000, alpha=0.001, batch_size=65536)
  cert = cascade.certify_cascade(smoothed, x, np.arange(2), (0.25, 0.5, 1.0), 0.6)
  assert cert.prediction[0] == 0 and cert.sigma[0] == 0.5
  assert 0.05 < cert.radius[0] <= linear.distance(x)[0]
  assert cert.prediction[1] == ij.ABSTAIN and cert.radius[1] == 0
  assert cert.num_samples[1] == 60_000


def test_written_radii_never_exceed_the_radius_computed():
  # Radii stay float64 up to the results file, whose format_radius rounds down; a float32
  # radius on the way would round about half of them up (by half a float32 step).
  from instars_jax.storage.results import format_radius
  rng = np.random.default_rng(0)
  radii = bounds.certified_radius(rng.uniform(0.5, 1.0, 20_000), rng.uniform(0.05, 2.0, 20_000))
  assert all(float(format_radius(r)) <= r for r in radii)
  assert np.mean(radii.astype(np.float32).astype(np.float64) > radii) > 0.3
  x = np.random.default_rng(1).uniform(size=(4, 3)).astype(np.float32)
  cert = ij.certify(lambda z: jnp.stack([z[:, 0] - 0.5, 0.5 - z[:, 0]], -1), x, 0.25,
                    jax.random.PRNGKey(0), n0=16, n=500, alpha=0.01, batch_size=256,
                    num_classes=2)
  assert cert.radius.dtype == np.float64


@pytest.mark.parametrize("value, text", [
    (0.0, "0"), (0.5, "0.5"), (1.0, "1"), (0.9999996, "0.999999"), (1.2345675, "1.23456"),
    (123456.7, "123456"), (1e-7, "1e-07"), (2.5e-9, "2.5e-09"), (3.999999999, "3.99999")])
def test_format_radius_rounds_down_to_six_digits(value, text):
  from instars_jax.storage.results import format_radius
  assert format_radius(value) == text and float(text) <= value


def test_memory_balls_stay_apart_in_the_radii_written():
  from instars_jax.storage.results import format_radius
  rng = np.random.default_rng(3)
  for trial in range(200):
    memory = memory_kind.Memory.empty(4)
    written = []
    points = rng.normal(size=(6, 4)).astype(np.float32)
    for i, point in enumerate(points):
      prediction, radius, memory = memory_kind.answer_with_memory(
          memory, point, i % 2, float(rng.uniform(0.5, 3.0)), i)
      written.append((point, prediction, float(format_radius(radius))))
    for a in range(len(written)):
      for b in range(a):
        (pa, ca, ra), (pb, cb, rb) = written[a], written[b]
        if ca != cb and ra > 0 and rb > 0:
          distance = np.linalg.norm(pa.astype(np.float64) - pb.astype(np.float64))
          assert ra + rb <= distance, trial


@pytest.mark.slow
@pytest.mark.parametrize("tau", [0.8, 0.2])  # the largest σ the default route, or the smallest
def test_thresholded_chain_never_exceeds_the_exact_radius_and_takes_the_min_over_its_path(
    linear, monkeypatch, tau):
  # Nodes on an unrelated feature x_7, logits (cut − x_7, x_7 − cut) · 100: under noise σ_k
  # node k's probability of "lower" is q = Φ((cut − x_7)/σ_k), so it moves x exactly where
  # x_7 ≤ cut − σ_k Φ⁻¹(τ), and the radius within which it decides alike is the distance
  # to that boundary. Node 2 (σ 1.0 against lower) has cut 0.5, node 1 (0.5 against 0.25)
  # cut 0. The base model is linear in the other features: G's radius is at most its
  # distance to the hyperplane, and at most every exact node margin on the path; a variant
  # keeping only the deciding node's radius exceeds node 2's margin on moved points.
  from instars_jax.certificates import thresholded
  x, chain = x7_nodes(linear, 8, 400, scale=100.0, sigmas=(0.3, 0.2), n=4000)
  boundary = [0.5 - 0.3 * stats.norm.ppf(tau), 0.0 - 0.2 * stats.norm.ppf(tau)]
  # Each input's certificate may fail with probability α (a node's bound, the class test):
  # at α = 1e-4 over 400 inputs, a violation below has probability under 4%.
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(9),
                           n0=64, n=4000, alpha=1e-4, batch_size=65536)
  certify_calls = recorded_alphas(monkeypatch, sampler_module(), "certify")
  lower = recorded_alphas(monkeypatch, bounds, "clopper_pearson_lower")
  cert = thresholded.certify_thresholded(smoothed, chain, np.float32([0.25, 0.5, 1.0]), x, None,
                                         5e-5, tau)
  assert certify_calls == [pytest.approx(5e-5)]  # the class test at α − β
  assert pytest.approx(5e-5 / 2 / 2) in lower  # each node's bound at β/(2(K − 1))
  certified = cert.prediction != ij.ABSTAIN
  assert set(cert.sigma[certified]) == {0.25, 0.5, 1.0} and certified.mean() > 0.5
  assert np.all(cert.radius <= linear.distance(x) + 1e-6)
  node2 = np.abs(x[:, 7] - boundary[0])
  assert np.all(cert.radius <= node2 + 1e-6)  # every certified input passed node 2
  moved = certified & (cert.sigma < 1.0)
  assert np.all(cert.radius[moved] <= np.minimum(node2, np.abs(x[:, 7] - boundary[1]))[moved]
                + 1e-6)
  # Inputs node 2 keeps are at σ = 1.0 exactly where x_7 is beyond its boundary.
  assert np.all(x[certified & (cert.sigma == 1.0), 7] > boundary[0])


def sampler_module():
  from instars_jax.smoothing import sampler
  return sampler


def test_thresholded_refuses_a_threshold_outside_zero_to_one(toy_config):
  from instars_jax.certificates import thresholded
  for tau in (0.0, 1.0, -0.2, 1.5):
    toy_config.certify.thresholded.threshold = tau
    with pytest.raises(ValueError, match=r"certify.thresholded.threshold must lie in \(0, 1\)"):
      thresholded.validate(toy_config)
  toy_config.certify.thresholded.threshold = 0.2  # the lower σ as the default route
  thresholded.validate(toy_config)


def test_experts_certify_each_sigma_with_their_own_classifier(linear):
  # Expert k is the classifier behind σ_k: inputs at σ = 1.0 go to a classifier of the
  # opposite sign, so their predictions flip, and each group's rows are CERTIFY of its expert
  # alone (the noise of input i depends only on (key, i), not on the grouping).
  flipped = LinearClassifier(-linear.w, -linear.b)
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(5),
                           n0=32, n=400, alpha=0.001, batch_size=4096,
            experts={np.float32(0.25): linear, np.float32(1.0): flipped})
  x = linear.points_at_distance(np.linspace(0.4, 2.0, 7))
  sigma = np.float32([0.25, 1.0, 1.0, 0.25, 1.0, 0.25, 0.25])
  ids = np.arange(10, 17)
  cert = smoothed.certify(x, sigma, ids)
  for s, fn, label in ((0.25, linear, 0), (1.0, flipped, 1)):
    mine = sigma == np.float32(s)
    alone = ij.certify(fn, x[mine], s, jax.random.PRNGKey(5), n0=32, n=400, alpha=0.001,
                       batch_size=4096, num_classes=2, ids=ids[mine])
    np.testing.assert_array_equal(cert.prediction[mine], alone.prediction)
    np.testing.assert_array_equal(cert.radius[mine], alone.radius)
    np.testing.assert_array_equal(cert.counts[mine], alone.counts)
    assert set(cert.prediction[mine]) == {label}
  assert smoothed.model_at(0.25) is linear
  assert SmoothedModel(linear, 2, None, 1, 1, 0.1, 1).model_at(7.0) is linear
  with pytest.raises(ValueError, match="no σ expert for σ = 0.5"):
    smoothed.certify(x, 0.5, ids)


def test_the_threshold_sweep_gives_each_tau_the_rows_of_the_chain_itself(linear):
  # One pass of every node and one class test at every σ: each τ's rows must be the ones
  # certify_thresholded draws for that τ alone (the same streams, by input id), and a higher
  # τ moves no more inputs.
  from instars_jax.certificates import thresholded
  x, chain = x7_nodes(linear, 3, 60, scale=3.0, sigmas=(0.3, 0.2), n=300)
  grid, ids = np.float32([0.25, 0.5, 1.0]), np.arange(100, 160)
  smoothed = SmoothedModel(linear, 2, jax.random.PRNGKey(4),
                           n0=32, n=300, alpha=1e-3, batch_size=65536)
  swept = thresholded.sweep(smoothed, chain, grid, x, ids, 5e-4, (0.6, 0.8, 0.95))
  moved = []
  for tau, cert in swept.items():
    alone = thresholded.certify_thresholded(smoothed, chain, grid, x, ids, 5e-4, tau)
    for field in ("prediction", "radius", "sigma", "num_samples"):
      np.testing.assert_array_equal(getattr(cert, field), getattr(alone, field))
    moved.append(np.sum(cert.sigma < 1.0))
  assert moved[0] >= moved[1] >= moved[2] and moved[0] > moved[2]
