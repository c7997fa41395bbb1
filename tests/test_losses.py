"""The training losses (instars_jax/train/losses/): each objective against its formula in
numpy on hand-set logits, SmoothAdv's attack, a per-example σ in every noise draw, and bad
settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from configs import default
from instars_jax.train import losses, loop
from instars_jax.train.losses import _terms, smoothadv

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(3, 5, 4)).astype(np.float32) * 2  # [m copies, B examples, C classes]
LABELS = np.array([0, 1, 2, 3, 0], np.int32)
SIGMA = np.array([0.25, 0.5, 1.0, 0.5, 0.25], np.float32)


def loss_of(name, **settings):
  return losses.Loss(name, tuple(sorted((losses.defaults(name) | settings).items())))


def numpy_softmax(logits):
  return special.softmax(np.asarray(logits, np.float64), axis=-1)


def numpy_cross_entropy(logits, labels):
  p = numpy_softmax(logits)
  labels = np.broadcast_to(labels, p.shape[:-1])
  return -np.log(np.take_along_axis(p, labels[..., None], -1)[..., 0])


def objective(loss, logits=LOGITS, epoch=0):
  value, metrics = loss.objective(jnp.asarray(logits), LABELS, SIGMA, epoch=epoch)
  return np.asarray(value), metrics


def test_gaussian_is_the_cross_entropy_of_its_one_copy():
  value, _ = objective(loss_of("gaussian"), LOGITS[:1])
  np.testing.assert_allclose(value, numpy_cross_entropy(LOGITS[0], LABELS), rtol=1e-5)


def test_consistency_is_cross_entropy_plus_kl_to_the_mean_plus_its_entropy():
  value, metrics = objective(loss_of("consistency", lbd=5.0, eta=0.5))
  p = numpy_softmax(LOGITS)
  mean = p.mean(axis=0)
  kl = (mean[None] * (np.log(mean)[None] - np.log(p))).sum(-1).mean(0)
  entropy = -(mean * np.log(mean)).sum(-1)
  expected = numpy_cross_entropy(LOGITS, LABELS).mean(0) + 5.0 * kl + 0.5 * entropy
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert float(metrics["consistency_kl"]) == pytest.approx(kl.mean(), rel=1e-5)


def test_stability_is_clean_cross_entropy_plus_kl_from_clean_to_noisy():
  value, _ = objective(loss_of("stability", lbd=2.0), LOGITS[:2])
  clean, noisy = numpy_softmax(LOGITS[0]), numpy_softmax(LOGITS[1])
  expected = numpy_cross_entropy(LOGITS[0], LABELS) + 2.0 * (clean * np.log(clean / noisy)).sum(-1)
  np.testing.assert_allclose(value, expected, rtol=1e-5)


def numpy_macer(logits, labels, sigma, lbd, gamma, beta):
  classification = -np.log(numpy_softmax(logits).mean(0)[np.arange(len(labels)), labels] + 1e-10)
  soft = numpy_softmax(beta * np.asarray(logits, np.float64)).mean(0)
  order = np.argsort(-soft, axis=1)
  top1, top2 = soft[np.arange(len(labels)), order[:, 0]], soft[np.arange(len(labels)), order[:, 1]]
  xi = stats.norm.ppf(top1) - stats.norm.ppf(top2)
  applies = (order[:, 0] == labels) & np.isfinite(xi) & (xi <= gamma)
  return classification + lbd * np.where(applies, sigma / 2 * (gamma - xi), 0.0), applies


def test_macer_is_the_smoothed_cross_entropy_plus_the_radius_hinge_after_its_deferral():
  # Scaled logits so that the hinge applies to some examples and not to others.
  logits = LOGITS / 4
  logits[:, 1, 1] += 0.5  # example 1: right, ξ within γ
  logits[:, 3, 3] += 3.0  # example 3: right, ξ beyond γ = 1.5
  settings = dict(lbd=3.0, gamma=1.5, beta=2.0, deferred_epochs=2)
  expected, applies = numpy_macer(logits, LABELS, SIGMA, lbd=3.0, gamma=1.5, beta=2.0)
  assert 0 < applies.sum() < len(LABELS)  # the construction exercises both sides of the hinge
  value, metrics = objective(loss_of("macer", **settings), logits, epoch=2)
  np.testing.assert_allclose(value, expected, rtol=1e-4)
  before, _ = objective(loss_of("macer", **settings), logits, epoch=1)  # deferred: no hinge
  np.testing.assert_allclose(before, numpy_macer(logits, LABELS, SIGMA, 0.0, 1.5, 2.0)[0],
                             rtol=1e-5)
  assert float(metrics["macer_robustness"]) > 0


def linear_model(shape=(6, 6), classes=3, seed=1):
  weights = jax.random.normal(jax.random.PRNGKey(seed), (int(np.prod(shape)), classes))
  return lambda x: x.reshape(x.shape[0], -1) @ weights


def test_smoothadv_attack_raises_the_smoothed_loss_within_epsilon_and_zero_steps_do_not():
  predict = linear_model()
  images = jnp.asarray(RNG.uniform(0.2, 0.8, size=(8, 6, 6)), jnp.float32)
  labels = jnp.asarray(RNG.integers(0, 3, 8), jnp.int32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(8))
  noise = _terms.noise_copies(keys, images, jnp.full(8, 0.25), 4)
  before = smoothadv.smoothed_nll(predict, images, labels, noise)
  for steps in (10, 1):
    adv = smoothadv.attack(predict, images, labels, noise, 0.5, steps)
    after = smoothadv.smoothed_nll(predict, adv, labels, noise)
    assert np.all(np.asarray(after) > np.asarray(before))
    distance = np.linalg.norm(np.asarray(adv - images).reshape(8, -1), axis=1)
    assert np.all(distance <= 0.5 + 1e-5) and np.all(distance > 0.1)
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
  unattacked = smoothadv.attack(predict, images, labels, noise, 0.5, 0)
  np.testing.assert_array_equal(smoothadv.smoothed_nll(predict, unattacked, labels, noise), before)


def noise_of_each_example(loss, sigma, images, keys):
  """The inputs' offsets from the clean images (the noise; SmoothAdv at 0 steps)."""
  inputs = loss.inputs(images, LABELS, jnp.asarray(sigma), keys, predict=linear_model((6, 6), 4),
                       epoch=0)
  return np.asarray(inputs - images[None])


def check_sigma_reaches_every_draw(loss, noise_fn=noise_of_each_example):
  """Doubling example 0's σ doubles every noise draw of example 0 and changes no other's."""
  images = jnp.asarray(RNG.uniform(size=(5, 6, 6)), jnp.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(3), i))(jnp.arange(5))
  doubled = SIGMA.copy()
  doubled[0] *= 2
  base, changed = noise_fn(loss, SIGMA, images, keys), noise_fn(loss, doubled, images, keys)
  noisy = np.abs(base).reshape(base.shape[0], 5, -1).max(axis=2) > 0  # copies that have noise
  assert noisy.any(axis=0).all()
  np.testing.assert_allclose(changed[:, 0], 2 * base[:, 0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(changed[:, 1:], base[:, 1:])


@pytest.mark.parametrize("name, settings", [
    ("gaussian", {}), ("consistency", {}), ("stability", {}), ("macer", {"num_noise_vec": 3}),
    ("smoothadv", {"num_steps": 0})])
def test_each_example_s_sigma_reaches_every_noise_draw_of_every_loss(name, settings):
  check_sigma_reaches_every_draw(loss_of(name, **settings))


def test_the_sigma_check_fails_a_loss_that_uses_one_sigma_for_the_batch():
  def batch_sigma(loss, sigma, images, keys):
    return noise_of_each_example(loss, np.full_like(sigma, sigma[0]), images, keys)
  with pytest.raises(AssertionError):
    check_sigma_reaches_every_draw(loss_of("consistency"), batch_sigma)


def test_smoothadv_attacks_each_example_at_its_own_sigma():
  loss = loss_of("smoothadv", num_steps=2, epsilon=0.5, warmup=0)
  images = jnp.asarray(RNG.uniform(size=(5, 6, 6)), jnp.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(3), i))(jnp.arange(5))
  doubled = SIGMA.copy()
  doubled[0] *= 2
  base, changed = (noise_of_each_example(loss, s, images, keys) for s in (SIGMA, doubled))
  assert np.all(np.abs(changed[:, 0] - base[:, 0]).reshape(4, -1).max(axis=1) > 0)
  np.testing.assert_array_equal(changed[:, 1:], base[:, 1:])


def test_noise_copies_depend_only_on_key_example_and_copy():
  images = jnp.zeros((4, 3, 3))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(5), i))(jnp.arange(4))
  four = _terms.noise_copies(keys, images, jnp.ones(4), 4)
  two = _terms.noise_copies(keys[2:], images[2:], jnp.ones(2), 2)
  np.testing.assert_array_equal(four[:2, 2:], two)  # fewer copies, another grouping: same draws
  assert len({float(four[c, 0, 0, 0]) for c in range(4)}) == 4


@pytest.mark.parametrize("key, value, message", [
    ("loss", "hinge", r"train.loss must be one of \['consistency', 'gaussian', 'macer', "
                      r"'smoothadv', 'stability'\]; got 'hinge'"),
    ("consistency.num_noise_vec", 0, "train.consistency.num_noise_vec must be >= 1; got 0"),
    ("consistency.lbd", -1.0, "train.consistency.lbd must be >= 0; got -1.0"),
    ("smoothadv.epsilon", -0.5, "train.smoothadv.epsilon must be >= 0; got -0.5"),
    ("smoothadv.num_steps", -1, "train.smoothadv.num_steps must be >= 0; got -1"),
    ("macer.gamma", 0.0, "train.macer.gamma must be > 0; got 0.0"),
    ("macer.lbd", 3.0, "train.macer.lbd is set but train.loss is 'consistency': it would be "
                       "ignored"),
])
def test_bad_loss_settings_are_refused_before_anything_runs(tmp_path, key, value, message):
  config = default.get_config()
  loss = {"smoothadv": "smoothadv", "macer": "macer"}.get(key.split(".")[0], "consistency")
  config.train.loss = "consistency" if key == "macer.lbd" else loss
  section, _, name = key.rpartition(".")
  (config.train[section] if section else config.train)[name] = value
  with pytest.raises(ValueError, match=message):
    loop.validate_config(config, 1)


def test_every_loss_module_declares_its_section_in_the_default_config():
  config = default.get_config()
  assert losses.names() == ["consistency", "gaussian", "macer", "smoothadv", "stability"]
  for name in losses.names():
    assert config.train[name].to_dict() == losses.defaults(name)
    module = losses.Loss(name, ()).module
    for function in ("validate", "inputs", "objective"):
      assert callable(getattr(module, function))


def test_the_divergence_watch_reads_a_loss_s_cross_entropy_not_its_other_terms():
  # MACER's hinge and consistency's entropy put a learning run's loss above ln(classes): the
  # chance check must read the cross-entropy that such a loss reports (it stopped both).
  from instars_jax.train import actions
  settings = default.get_config().train.divergence
  settings.chance_steps = 2
  watch = actions.DivergenceWatch(settings, num_classes=10, start_step=0)
  for step in range(1, 7):
    watch.after_step(step, None, {"loss": jnp.float32(8.0), "cross_entropy": jnp.float32(0.5)})
  plain = actions.DivergenceWatch(settings, num_classes=10, start_step=0)
  with pytest.raises(ValueError, match="mean train_loss 8 over 2 steps is at chance level"):
    for step in range(1, 7):
      plain.after_step(step, None, {"loss": jnp.float32(8.0)})


def test_consistency_takes_the_estimators_weighted_soft_labels():
  targets = numpy_softmax(RNG.normal(size=(5, 4))) * np.array([[0.5], [1], [2], [1], [0]])
  value, metrics = objective(loss_of("consistency", lbd=10.0, eta=0.0), LOGITS)
  soft_value, soft_metrics = loss_of("consistency", lbd=10.0, eta=0.0).objective(
      jnp.asarray(LOGITS), jnp.asarray(targets, jnp.float32), SIGMA, epoch=0)
  log_p = np.log(numpy_softmax(LOGITS))
  cross_entropy = -(targets[None] * log_p).sum(-1).mean(0)
  kl = float(metrics["consistency_kl"])
  np.testing.assert_allclose(np.asarray(soft_value) - cross_entropy,
                             value - numpy_cross_entropy(LOGITS, LABELS).mean(0), rtol=1e-4,
                             atol=1e-5)
  assert float(soft_metrics["consistency_kl"]) == pytest.approx(kl)
  top = np.argmax(targets, -1)
  assert float(soft_metrics["noisy_accuracy"]) == pytest.approx(
      np.mean(np.argmax(LOGITS, -1) == top))


def test_the_estimator_trains_with_a_loss_module_that_takes_soft_labels():
  from instars_jax.selection import estimator
  from instars_jax.train.stages import sigma_estimators
  config = default.get_config()
  config.estimator.epochs = 1
  assert config.estimator.loss == "consistency"
  assert config.estimator.consistency.to_dict() == {"num_noise_vec": 2, "lbd": 10.0, "eta": 0.0}
  assert [m for ok, m in sigma_estimators.validate(config) if not ok] == []
  config.estimator.loss = "macer"
  assert [m for ok, m in sigma_estimators.validate(config) if not ok] == [
      "estimator.loss=macer needs class labels; the σ-estimators train on soft labels: use one "
      "of ['consistency', 'gaussian', 'stability']"]
  config.estimator.loss = "stability"
  config.estimator.consistency.eta = 0.5
  assert [m for ok, m in sigma_estimators.validate(config) if not ok] == [
      "estimator.consistency.eta is set but estimator.loss is 'stability': it would be ignored "
      "(set estimator.loss=consistency, or leave estimator.consistency at its defaults)"]
  # Settings an estimator saved before: the float λ and η are the consistency loss's.
  old = {"grid": [0.25, 1.0], "consistency": 20.0, "entropy": 0.1, "epochs": 2}
  assert estimator.upgrade(old) == {"grid": [0.25, 1.0], "epochs": 2, "loss": "consistency",
                                    "loss_settings": {"num_noise_vec": 2, "lbd": 20.0,
                                                      "eta": 0.1}}
