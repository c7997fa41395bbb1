"""The training losses (instars_jax/train/losses/): each objective against its formula in
numpy on hand-set logits, each training step's gradient against finite differences of that
formula on a tiny model with hand-set weights (a misplaced stop_gradient fails them), the
references' batching against their B/m steps, stability's separate BatchNorm passes,
SmoothAdv's attack against a numpy PGD, the presets, a per-example σ in every noise draw, and
bad settings."""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special, stats

from configs import default
from helpers import run_cli
from instars_jax import models
from instars_jax.storage.workdir import TrainingFacts, Workdir
from instars_jax.train import losses, loop, steps
from instars_jax.train import state as state_lib
from instars_jax.train.losses import _terms, smoothadv

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(3, 5, 4)).astype(np.float32) * 2  # [m copies, B examples, C classes]
LABELS = np.array([0, 1, 2, 3, 0], np.int32)
SIGMA = np.array([0.25, 0.5, 1.0, 0.5, 0.25], np.float32)


def loss_of(name, **settings):
  return losses.of(name, losses.resolve(name, settings, None))


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


def numpy_consistency_terms(logits):
  p = numpy_softmax(logits)
  mean = p.mean(axis=0)
  return ((mean[None] * (np.log(mean)[None] - np.log(p))).sum(-1).mean(0),
          -(mean * np.log(mean)).sum(-1))


def numpy_consistency(logits, labels, sigma, *, lbd, eta):
  del sigma
  kl, entropy = numpy_consistency_terms(logits)
  return numpy_cross_entropy(logits, labels).mean(0) + lbd * kl + eta * entropy


def numpy_stability(logits, labels, sigma, *, lbd, term):
  del sigma
  clean, noisy = numpy_softmax(logits[0]), numpy_softmax(logits[1])
  divergence = -(clean * np.log(noisy)).sum(-1)
  if term == "kl":
    divergence += (clean * np.log(clean)).sum(-1)
  return numpy_cross_entropy(logits[0], labels) + lbd * divergence


def test_consistency_is_cross_entropy_plus_kl_to_the_mean_plus_its_entropy():
  value, metrics = objective(loss_of("consistency", lbd=5.0, eta=0.5))
  np.testing.assert_allclose(value, numpy_consistency(LOGITS, LABELS, SIGMA, lbd=5.0, eta=0.5),
                             rtol=1e-5)
  kl, _ = numpy_consistency_terms(LOGITS)
  assert float(metrics["consistency_kl"]) == pytest.approx(kl.mean(), rel=1e-5)


@pytest.mark.parametrize("term", ["cross_entropy", "kl"])
def test_stability_is_clean_cross_entropy_plus_its_term_from_clean_to_noisy(term):
  value, _ = objective(loss_of("stability", lbd=2.0, term=term), LOGITS[:2])
  np.testing.assert_allclose(value, numpy_stability(LOGITS[:2], LABELS, SIGMA, lbd=2.0,
                                                    term=term), rtol=1e-5)
  clean = numpy_softmax(LOGITS[0])
  entropy = -(clean * np.log(clean)).sum(-1)  # the published form's term exceeds the KL by it
  if term == "cross_entropy":
    kl, _ = objective(loss_of("stability", lbd=2.0, term="kl"), LOGITS[:2])
    np.testing.assert_allclose(value - kl, 2.0 * entropy, rtol=1e-4)


def numpy_macer(logits, labels, sigma, *, lbd, gamma, beta, deferred_epochs=0):
  """MACER per example, and where its hinge applies (RuntianZ/macer's macer.py)."""
  del deferred_epochs
  n = np.arange(len(labels))
  classification = -np.log(numpy_softmax(logits).mean(0)[n, labels] + 1e-10)
  soft = numpy_softmax(beta * np.asarray(logits, np.float64)).mean(0)
  order = np.argsort(-soft, axis=1)
  top1, top2 = soft[n, order[:, 0]], soft[n, order[:, 1]]
  xi = stats.norm.ppf(top1) - stats.norm.ppf(top2)
  applies = (order[:, 0] == labels) & np.isfinite(xi) & (xi <= gamma)
  return classification + lbd * np.where(applies, sigma / 2 * (gamma - xi), 0.0), applies


def macer_logits():
  """Logits where MACER's hinge applies to examples 1, 2 and 4 (σ = 0.5, 1.0, 0.25: a batch
  mean σ would move it) and not to 0 (wrong class) or 3 (ξ beyond γ = 1.5)."""
  logits = LOGITS / 4
  logits[:, 0] = [[0.0, 0.2, 0.1, 0.0]] * 3  # example 0: top class 1, label 0
  logits[:, 1, 1] += 0.5
  logits[:, 2, 2] += 0.8
  logits[:, 3, 3] += 3.0
  logits[:, 4, 0] += 1.0
  return logits


def test_macer_is_the_smoothed_cross_entropy_plus_the_radius_hinge_at_each_example_s_sigma():
  logits = macer_logits()
  settings = dict(lbd=3.0, gamma=1.5, beta=2.0, deferred_epochs=2)
  expected, applies = numpy_macer(logits, LABELS, SIGMA, **settings)
  np.testing.assert_array_equal(applies, [False, True, True, False, True])
  value, metrics = objective(loss_of("macer", **settings), logits, epoch=2)
  np.testing.assert_allclose(value, expected, rtol=1e-4)
  # The examples in the hinge have different σ: one σ for them all gives other values.
  batch_sigma, _ = numpy_macer(logits, LABELS, np.full(5, SIGMA[applies].mean()), **settings)
  assert np.abs(batch_sigma - expected)[applies].min() > 1e-2
  before, _ = objective(loss_of("macer", **settings), logits, epoch=1)  # deferred: no hinge
  unweighted, _ = numpy_macer(logits, LABELS, SIGMA, **settings | {"lbd": 0.0})
  np.testing.assert_allclose(before, unweighted, rtol=1e-5)
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
                      r"'node_margin', 'smoothadv', 'stability'\] or a dotted module path; got 'hinge'"),
    ("consistency.num_noise_vec", 0, "train.consistency.num_noise_vec must be >= 1; got 0"),
    ("consistency.lbd", -1.0, "train.consistency.lbd must be >= 0; got -1.0"),
    ("smoothadv.epsilon", -0.5, "train.smoothadv.epsilon must be >= 0; got -0.5"),
    ("smoothadv.num_steps", -1, "train.smoothadv.num_steps must be >= 0; got -1"),
    ("macer.gamma", 0.0, "train.macer.gamma must be > 0; got 0.0"),
    ("macer.lbd", 3.0, "train.macer.lbd is set but train.loss is 'consistency': it would be "
                       "ignored"),
    ("consistency.preset", "svhn", r"train.consistency.preset must be one of \['cifar10', "
                                   r"'imagenet', 'mnist'\] \(or '' for none\); got 'svhn'"),
    ("consistency.batching", "half", r"train.consistency.batching must be one of \('split', "
                                     r"'whole'\); got 'half'"),
    ("smoothadv.num_noise_vec", 3, r"train.batch_size=256 must be a multiple of "
                                   r"train.smoothadv.num_noise_vec=3 with batching='split'"),
    ("stability.term", "mse", r"train.stability.term must be one of \('cross_entropy', 'kl'\); "
                              r"got 'mse'"),
])
def test_bad_loss_settings_are_refused_before_anything_runs(tmp_path, key, value, message):
  config = default.get_config()
  loss = {"smoothadv": "smoothadv", "macer": "macer", "stability": "stability"}.get(
      key.split(".")[0], "consistency")
  config.train.loss = "consistency" if key == "macer.lbd" else loss
  section, _, name = key.rpartition(".")
  (config.train[section] if section else config.train)[name] = value
  with pytest.raises(ValueError, match=message):
    loop.validate_config(config, 1)


def test_every_loss_module_declares_its_section_in_the_default_config():
  config = default.get_config()
  assert losses.names() == ["consistency", "gaussian", "macer", "node_margin", "smoothadv",
                            "stability"]
  for name in losses.names():
    assert config.train[name].to_dict() == losses.unset(name)
    assert set(losses.resolve(name, config.train[name].to_dict(), None)) == set(
        losses.defaults(name))
    module = losses.Loss(name, ()).module
    for function in ("validate", "inputs", "objective"):
      assert callable(getattr(module, function))
    assert isinstance(module.SOFT_TARGETS, bool) and isinstance(module.SEPARATE_PASSES, bool)


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
  config.train.estimator.epochs = 1
  assert config.train.estimator.loss == "consistency"
  assert config.train.estimator.consistency.to_dict() == {
      "num_noise_vec": 2, "lbd": 10.0, "eta": 0.0, "batching": "whole"}
  sigma_estimators.validate(config)
  config.train.estimator.loss = "macer"
  with pytest.raises(ValueError, match=re.escape(
      "train.estimator.loss=macer needs class labels; the σ-estimators train on soft labels: "
      "use one of ['consistency', 'gaussian', 'node_margin', 'stability']")):
    sigma_estimators.validate(config)
  config.train.estimator.loss = "stability"
  config.train.estimator.consistency.eta = 0.5
  with pytest.raises(ValueError, match=re.escape(
      "train.estimator.consistency.eta is set but train.estimator.loss is 'stability': it "
      "would be ignored (set train.estimator.loss=consistency, or leave "
      "train.estimator.consistency at its defaults)")):
    sigma_estimators.validate(config)
  # Settings an estimator saved before: the float λ and η are the consistency loss's, on the
  # whole batch; a stability estimator trained on the KL.
  old = {"grid": [0.25, 1.0], "consistency": 20.0, "entropy": 0.1, "epochs": 2}
  upgraded = lambda saved: sigma_estimators.with_earlier_loss_keys(estimator.upgrade(saved))
  assert upgraded(old) == {"grid": [0.25, 1.0], "epochs": 2, "loss": "consistency",
                           "loss_settings": {"num_noise_vec": 2, "lbd": 20.0, "eta": 0.1,
                                             "batching": "whole"}}
  old = {"epochs": 2, "loss": "stability", "loss_settings": {"lbd": 2.0}}
  assert upgraded(old)["loss_settings"] == {"lbd": 2.0, "term": "kl"}


# ---------------------------------------------------------------------------
# Gradients: a training step on a tiny model with hand-set weights, against finite differences
# of the loss's numpy formula (no stop_gradient anywhere in it).

SHAPE = (2, 3)  # six-pixel images
KERNEL = np.array([[0.9, -0.4, 0.2], [-0.3, 0.8, -0.6], [0.5, 0.1, -0.7],
                   [-0.8, 0.3, 0.6], [0.2, -0.9, 0.4], [0.4, 0.6, -0.2]])
BIAS = np.array([0.1, -0.2, 0.05])


class Tiny(nn.Module):
  """Flattened pixels (batch-normalised with `batch_norm`) to logits through one Dense layer."""
  batch_norm: bool = False
  classes: int = KERNEL.shape[1]

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    return nn.Dense(self.classes)(x)


def tiny_state(batch_norm=False, learning_rate=1.0, kernel=KERNEL, bias=BIAS):
  """The tiny model with the hand-set weights, under plain SGD (an update is −rate × grad)."""
  model = Tiny(batch_norm, np.shape(kernel)[1])
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + SHAPE))
  params = dict(variables["params"]) | {"Dense_0": {"kernel": jnp.asarray(kernel, jnp.float32),
                                                    "bias": jnp.asarray(bias, jnp.float32)}}
  return state_lib.TrainState.create(
      apply_fn=model.apply, params=params, tx=optax.sgd(learning_rate),
      batch_stats=variables.get("batch_stats", {}), sigma_table=jnp.zeros(8),
      sigma_profile=jnp.zeros((8, 1)))


def tiny_batch(n=6, seed=1):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.uniform(0.2, 0.8, size=(n,) + SHAPE), jnp.float32)
  labels = jnp.asarray(np.arange(n) % 3, jnp.int32)
  sigma = jnp.asarray(np.resize([0.25, 0.5, 1.0], n), jnp.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(7), i))(jnp.arange(n))
  return images, labels, sigma, keys


def numpy_logits(inputs, kernel, bias, batch_norm=False, separate=True):
  """float64 logits [m, B, C] of the tiny model in training mode: BatchNorm (scale 1, offset 0,
  as initialised) over each input's batch with `separate`, else over all m·B at once."""
  x = np.asarray(inputs, np.float64).reshape(inputs.shape[:2] + (-1,))
  if batch_norm:
    axes = (1,) if separate else (0, 1)
    mean = x.mean(axis=axes, keepdims=True)
    x = (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + 1e-5)
  return x @ kernel + bias


def finite_difference_grads(loss_of_weights, kernel=KERNEL, bias=BIAS, h=1e-6):
  """Central differences of `loss_of_weights(kernel, bias)` in float64."""
  grads = []
  for weights in (kernel, bias):
    grad = np.zeros(weights.shape)
    for index in np.ndindex(weights.shape):
      up, down = np.array(weights, np.float64), np.array(weights, np.float64)
      up[index] += h
      down[index] -= h
      args_up = (up, bias) if weights is kernel else (kernel, up)
      args_down = (down, bias) if weights is kernel else (kernel, down)
      grad[index] = (loss_of_weights(*args_up) - loss_of_weights(*args_down)) / (2 * h)
    grads.append(grad)
  return grads


def step_grads(state, loss, batch, epoch=0):
  """The gradient a training step applied (−update, the rate being 1), and the new state."""
  after, _ = steps.loss_step(state, *batch, loss, epoch)
  return [np.asarray(state.params["Dense_0"][k] - after.params["Dense_0"][k], np.float64)
          for k in ("kernel", "bias")], after


def numpy_smoothadv(logits, labels, sigma, *, lbd, eta):
  del sigma
  classification = numpy_cross_entropy(logits, labels).mean(0)
  if not lbd:
    return classification
  kl, entropy = numpy_consistency_terms(logits)
  return classification + lbd * kl + eta * entropy


def numpy_gaussian(logits, labels, sigma):
  del sigma
  return numpy_cross_entropy(logits[0], labels)


GRADIENT_CASES = {
    "gaussian": ({}, numpy_gaussian),
    "consistency": ({"num_noise_vec": 3, "lbd": 5.0, "eta": 0.5}, numpy_consistency),
    "stability": ({"lbd": 2.0, "term": "cross_entropy"}, numpy_stability),
    "stability_kl": ({"lbd": 2.0, "term": "kl"}, numpy_stability),
    "macer": ({"num_noise_vec": 4, "lbd": 3.0, "gamma": 8.0, "beta": 2.0, "deferred_epochs": 0},
              numpy_macer),
    "smoothadv": ({"num_noise_vec": 2, "epsilon": 0.5, "num_steps": 2, "warmup": 0},
                  numpy_smoothadv),
    "smoothadv_consistency": ({"num_noise_vec": 2, "epsilon": 0.5, "num_steps": 2, "warmup": 0,
                               "lbd": 1.0, "eta": 0.5}, numpy_smoothadv),
}


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_each_loss_s_training_gradient_matches_finite_differences_of_its_formula(case):
  # The numpy formula has no stop_gradient: one on p̄ (consistency), on the clean branch
  # (stability), on MACER's top-two values, or the attack's point depending on the weights
  # being trained (SmoothAdv) gives another gradient.
  settings, formula = GRADIENT_CASES[case]
  name = case.split("_")[0]
  loss = loss_of(name, batching="whole", **settings)
  state, (images, labels, sigma, keys) = tiny_state(), tiny_batch()
  inputs = np.asarray(loss.inputs(images, labels, sigma, keys, predict=state_lib.logits_fn(state),
                                  epoch=0))  # SmoothAdv's x̂: a constant of the gradient
  own = {k: v for k, v in dict(loss.settings).items() if k not in ("num_noise_vec", "epsilon",
                                                                   "num_steps", "warmup")}
  if name == "macer":  # examples 0-3 labelled with their smoothed top class: in the hinge
    soft = numpy_softmax(2.0 * numpy_logits(inputs, KERNEL, BIAS)).mean(0).argmax(-1)
    labels = jnp.asarray(np.where(np.arange(6) < 4, soft, (soft + 1) % 3), jnp.int32)
  batch = images, labels, sigma, keys

  def mean_loss(kernel, bias):
    value = formula(numpy_logits(inputs, kernel, bias), np.asarray(labels), np.asarray(sigma),
                    **own)
    return (value[0] if isinstance(value, tuple) else value).mean()

  if name == "macer":  # the hinge holds examples at each σ of the batch, not all of them
    _, applies = numpy_macer(numpy_logits(inputs, KERNEL, BIAS), np.asarray(labels),
                             np.asarray(sigma), **own)
    assert len(set(np.asarray(sigma)[applies])) == 3 and not applies.all()
  grads, _ = step_grads(state, loss, batch)
  for got, expected in zip(grads, finite_difference_grads(mean_loss)):
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-6)


def numpy_node_margin(logits, targets, *, lbd, mu, gamma, beta, threshold):
  """node_margin's formula in float64 (its module doc) on soft targets [B, 2]; also which
  examples are in the hinge."""
  p = numpy_softmax(logits)
  classification = -(targets[None] * np.log(p)).sum(-1).mean(0)
  kl, _ = numpy_consistency_terms(logits)
  q_lower = numpy_softmax(beta * logits).mean(0)[:, 0]
  xi = stats.norm.ppf(q_lower) - stats.norm.ppf(threshold)
  margin = np.where(targets.argmax(-1) == 0, xi, -xi)
  applies = margin > 0
  hinge = np.where(applies, np.maximum(0.0, gamma - margin), 0.0)
  return classification + lbd * kl + mu * targets.sum(-1) * hinge, applies


@pytest.mark.slow
def test_node_margin_s_gradient_matches_finite_differences_and_mu_0_is_consistency():
  # A two-bin tiny model; soft targets of weight 0.5-2 on both bins. The hinge holds the
  # examples the node already routes as their label says, short of the margin γ; it must
  # carry the gradient through q̄ (a stop_gradient there, or on p̄, gives another one).
  kernel, bias = KERNEL[:, :2], BIAS[:2]
  settings = {"num_noise_vec": 3, "lbd": 2.0, "mu": 1.5, "gamma": 1.5, "beta": 2.0,
              "threshold": 0.6}
  loss = loss_of("node_margin", **settings)
  state = tiny_state(kernel=kernel, bias=bias)
  images, _, sigma, keys = tiny_batch()
  weight = np.array([0.5, 1.0, 2.0, 1.0, 0.7, 1.3])
  top = np.array([1, 0, 0, 0, 1, 1])  # q̄_0 = 0.33, 0.95, 0.32, 0.81, 0.68, 0.43: 4 in the hinge
  targets = jnp.asarray(weight[:, None] * np.where(top[:, None] == np.arange(2), 0.8, 0.2),
                        jnp.float32)
  inputs = np.asarray(loss.inputs(images, targets, sigma, keys, predict=None, epoch=0))
  own = {k: v for k, v in settings.items() if k != "num_noise_vec"}
  _, applies = numpy_node_margin(numpy_logits(inputs, kernel, bias), np.asarray(targets), **own)
  assert 0 < applies.sum() < len(applies)
  mean_loss = lambda k, b: numpy_node_margin(numpy_logits(inputs, k, b), np.asarray(targets),
                                             **own)[0].mean()
  grads, _ = step_grads(state, loss, (images, targets, sigma, keys))
  for got, expected in zip(grads, finite_difference_grads(mean_loss, kernel, bias)):
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-6)
  logits = jnp.asarray(numpy_logits(inputs, kernel, bias), jnp.float32)
  plain = loss_of("consistency", num_noise_vec=3, lbd=2.0, eta=0.0, batching="whole")
  without = loss_of("node_margin", **(settings | {"mu": 0.0}))
  np.testing.assert_allclose(without.objective(logits, targets, sigma, epoch=0)[0],
                             plain.objective(logits, targets, sigma, epoch=0)[0], rtol=1e-6)
  with pytest.raises(ValueError, match="node_margin trains binary σ-selection nodes"):
    loss.objective(jnp.zeros((3, 6, 3)), targets, sigma, epoch=0)


def test_stability_passes_clean_and_noisy_images_apart_through_batchnorm():
  loss = loss_of("stability", lbd=2.0)
  state, batch = tiny_state(batch_norm=True), tiny_batch()
  images, labels, sigma, keys = batch
  inputs = np.asarray(loss.inputs(images, labels, sigma, keys, predict=None, epoch=0))

  def mean_loss(kernel, bias, separate=True):
    logits = numpy_logits(inputs, kernel, bias, batch_norm=True, separate=separate)
    return numpy_stability(logits, np.asarray(labels), None, lbd=2.0, term="cross_entropy").mean()

  grads, after = step_grads(state, loss, batch)
  for got, expected in zip(grads, finite_difference_grads(mean_loss)):
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-6)
  one_pass = finite_difference_grads(lambda k, b: mean_loss(k, b, separate=False))
  assert np.abs(one_pass[0] - grads[0]).max() > 1e-2  # the construction tells them apart
  # Running statistics: updated after the clean pass, then after the noisy one.
  means = np.asarray(inputs, np.float64).reshape(2, 6, -1).mean(axis=1)
  np.testing.assert_allclose(after.batch_stats["BatchNorm_0"]["mean"],
                             0.9 * 0.1 * means[0] + 0.1 * means[1], rtol=1e-5)


# ---------------------------------------------------------------------------
# The references' batching: B/m examples with their m copies per SGD step.

@pytest.mark.parametrize("name, settings", [
    ("consistency", {"num_noise_vec": 2, "lbd": 5.0, "eta": 0.5}),
    ("smoothadv", {"num_noise_vec": 2, "epsilon": 0.5, "num_steps": 2, "warmup": 0})])
def test_split_batching_makes_the_reference_s_b_over_m_steps_in_turn(name, settings):
  # B = 4, m = 2: update 1 on examples 0 and 2 with the weights as set, update 2 on examples
  # 1 and 3 with the weights update 1 left (SmoothAdv attacks each part with its weights).
  split, whole = (loss_of(name, batching=b, **settings) for b in ("split", "whole"))
  assert (split.updates_per_step, whole.updates_per_step) == (2, 1)
  rate, batch = 0.5, tiny_batch(n=4)
  own = {k: v for k, v in settings.items() if k in ("lbd", "eta")} | (
      {"lbd": 0.0, "eta": 0.5} if name == "smoothadv" else {})
  formula = numpy_consistency if name == "consistency" else numpy_smoothadv
  kernel, bias = KERNEL, BIAS
  for part in ([0, 2], [1, 3]):
    state = tiny_state(learning_rate=rate, kernel=kernel, bias=bias)
    images, labels, sigma, keys = (a[np.asarray(part)] for a in batch)
    inputs = np.asarray(whole.inputs(images, labels, sigma, keys,
                                     predict=state_lib.logits_fn(state), epoch=0))
    grads = finite_difference_grads(
        lambda k, b: formula(numpy_logits(inputs, k, b), np.asarray(labels), None, **own).mean(),
        kernel, bias)
    kernel, bias = kernel - rate * grads[0], bias - rate * grads[1]
  after, metrics = steps.loss_step(tiny_state(learning_rate=rate), *batch, split, 0)
  np.testing.assert_allclose(after.params["Dense_0"]["kernel"], kernel, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(after.params["Dense_0"]["bias"], bias, rtol=1e-4, atol=1e-6)
  assert int(after.step) == 2 and metrics["loss"].shape == ()
  once, _ = steps.loss_step(tiny_state(learning_rate=rate), *batch, whole, 0)
  assert int(once.step) == 1
  assert np.abs(np.asarray(once.params["Dense_0"]["kernel"]) - kernel).max() > 1e-3


def test_the_schedule_counts_sgd_updates_m_per_step_with_split_batching():
  # 3 steps per epoch, m = 2: 6 updates at the first rate, then the decayed one.
  config = default.get_config()
  config.train.update(loss="consistency", schedule="step", lr_decay_epochs=(1,),
                      learning_rate=0.1, momentum=0.0, weight_decay=0.0)
  state = state_lib.create_train_state(
      config, TrainingFacts((28, 28, 1), 10, "fashion_mnist", 30, 3, "toy"))
  ones = jax.tree_util.tree_map(jnp.ones_like, state.params)
  rates = []
  for _ in range(7):
    after = state.apply_gradients(grads=ones)
    rates.append(float((state.params["Dense_1"]["bias"] - after.params["Dense_1"]["bias"])[0]))
    state = after
  np.testing.assert_allclose(rates, [0.1] * 6 + [0.01], rtol=1e-5)


# ---------------------------------------------------------------------------
# SmoothAdv's attack against a numpy PGD on the tiny linear model.

def numpy_attack(images, labels, noise, epsilon, num_steps, kernel=KERNEL, bias=BIAS):
  """SmoothAdv_PGD (jh-jeong/smoothing-consistency): steps of 2ε/T along each example's own
  normalised gradient of −log mean_c softmax(f(x + δ_c))_y, projected to the ε-ball, then
  clipped to [0, 1]."""
  x0 = np.asarray(images, np.float64).reshape(len(images), -1)
  noise = np.asarray(noise, np.float64).reshape(noise.shape[:2] + (-1,))
  x, onehot = x0.copy(), np.eye(kernel.shape[1])[labels]
  for _ in range(num_steps):
    p = numpy_softmax((x[None] + noise) @ kernel + bias)  # [m, B, C]
    p_y = (p * onehot).sum(-1, keepdims=True)
    dp_y = (p_y * (onehot - p)) @ kernel.T  # ∂p_y/∂x per copy
    grad = -dp_y.mean(0) / p_y.mean(0)
    x = x + 2 * epsilon / num_steps * grad / (np.linalg.norm(grad, axis=1, keepdims=True) + 1e-8)
    delta = x - x0
    length = np.linalg.norm(delta, axis=1, keepdims=True)
    x = np.clip(x0 + delta * np.where(length > epsilon, epsilon / np.maximum(length, 1e-12), 1),
                0, 1)
  return x.reshape(images.shape)


def test_smoothadv_attack_is_the_reference_pgd_with_its_noise_reused_for_training():
  # Step size 2ε/T, each example's own gradient norm (these differ by 10x and more), the
  # ε warm-up ε·min(1, (epoch + 1)/warmup), and training on x̂ plus the attack's own copies.
  state = tiny_state()
  images, labels, sigma, keys = tiny_batch()
  images = images.at[0].mul(0.3)  # gradient norms far apart
  noise = np.asarray(_terms.noise_copies(keys, images, sigma, 3))
  x0 = np.asarray(images, np.float64).reshape(6, -1)
  p = numpy_softmax((x0[None] + noise.reshape(3, 6, -1)) @ KERNEL + BIAS).mean(0)
  assert p[np.arange(6), np.asarray(labels)].max() / p[np.arange(6), np.asarray(labels)].min() > 2
  loss = loss_of("smoothadv", num_noise_vec=3, epsilon=0.4, num_steps=3, warmup=4)
  for epoch, epsilon in [(0, 0.1), (1, 0.2), (3, 0.4), (9, 0.4)]:
    inputs = np.asarray(loss.inputs(images, labels, sigma, keys,
                                    predict=state_lib.logits_fn(state), epoch=epoch))
    attacked = numpy_attack(images, np.asarray(labels), noise, epsilon, 3)
    np.testing.assert_allclose(inputs, attacked[None] + noise, rtol=1e-4, atol=1e-5)
  distance = np.linalg.norm((attacked - np.asarray(images)).reshape(6, -1), axis=1)
  assert distance.max() <= 0.4 + 1e-6 and distance.min() > 0.1


# ---------------------------------------------------------------------------
# Presets, bfloat16 logits, resuming.

@pytest.mark.parametrize("name, preset, sigma, expected", [
    ("consistency", "mnist", 0.25, {"lbd": 10.0, "eta": 0.5, "num_noise_vec": 2}),
    ("consistency", "mnist", 0.5, {"lbd": 5.0}),
    ("consistency", "mnist", 1.0, {"lbd": 5.0}),
    ("consistency", "cifar10", 0.25, {"lbd": 20.0}),
    ("consistency", "imagenet", 1.0, {"lbd": 5.0, "eta": 0.1}),
    ("macer", "mnist", 0.5, {"lbd": 16.0, "deferred_epochs": 30, "num_noise_vec": 16}),
    ("macer", "mnist", 1.0, {"lbd": 6.0, "gamma": 8.0, "beta": 16.0}),
    ("macer", "imagenet", 1.0, {"lbd": 1.0, "num_noise_vec": 2, "deferred_epochs": 0}),
    ("smoothadv", "mnist", 0.5, {"epsilon": 255 / 256, "num_noise_vec": 4, "warmup": 10}),
    ("smoothadv", "cifar10", 0.5, {"epsilon": 2.0, "num_noise_vec": 4, "num_steps": 10}),
    ("stability", "mnist", 1.0, {"lbd": 2.0, "term": "cross_entropy"}),
])
def test_a_preset_fills_the_published_settings_at_the_run_s_sigma(name, preset, sigma, expected):
  config = default.get_config()
  config.train.update(loss=name, sigma=sigma)
  config.train[name].preset = preset
  resolved = losses.resolved_config(config).train[name]
  assert {k: resolved[k] for k in expected} == expected
  assert loop.validate_config(config, 1) is None
  assert config.train[name].preset == preset  # the caller's config is left as it was


def test_an_explicit_setting_wins_over_the_preset_even_at_the_default_value():
  config = default.get_config()
  config.train.update(loss="consistency", sigma=0.25)
  config.train.consistency.update(preset="mnist", lbd=5.0)  # the default; the preset says 10
  resolved = losses.resolved_config(config).train.consistency
  assert (resolved.lbd, resolved.eta, resolved.preset) == (5.0, 0.5, "mnist")
  twice = losses.resolved_config(losses.resolved_config(config)).train.consistency
  assert twice.to_dict() == resolved.to_dict()  # resolving again changes nothing
  # SmoothAdv + consistency gets the published η = 0.5 unless told otherwise.
  config.train.update(loss="smoothadv")
  config.train.consistency.update(preset="", lbd=None)
  config.train.smoothadv.lbd = 1.0
  assert losses.from_config(config.train, 0.25).settings == (
      ("epsilon", 1.0), ("eta", 0.5), ("lbd", 1.0), ("num_noise_vec", 4), ("num_steps", 10),
      ("warmup", 10))


@pytest.mark.slow
def test_an_unknown_preset_or_sigma_ends_train_py_with_one_line_and_exit_status_2(tmp_path):
  config = default.get_config()
  config.train.update(loss="consistency", sigma=0.25)
  config.train.consistency.preset = "imagenet"
  with pytest.raises(ValueError, match=r"^train\.consistency\.preset=imagenet has no published "
                                       r"setting at σ = 0\.25 \(it has σ = 0\.5, 1\.0\)$"):
    loop.validate_config(config, 1)
  done = run_cli("train.py", "--config=configs/default.py", f"--workdir={tmp_path / 'run'}",
                 "--config.train.loss=macer", "--config.train.macer.preset=svhn")
  assert done.returncode == 2, done.stderr[-2000:]
  assert done.stderr == ("error: train.macer.preset must be one of ['cifar10', 'imagenet', "
                         "'mnist'] (or '' for none); got 'svhn'\n")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["lenet", pytest.param("resnet20", marks=pytest.mark.slow)])
def test_the_logits_come_from_a_float32_last_layer_under_bfloat16(name):
  model = models.create_model(name, 10, "bfloat16", "cifar10")
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 28, 28, 1) if name == "lenet"
                                                     else (2, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  logits, captured = model.apply(variables, x, capture_intermediates=True)
  # A head in bfloat16 rounds each logit to 8 significant bits, which MACER's β = 16 scales.
  head = sorted(k for k in captured["intermediates"] if k.startswith("Dense"))[-1]
  assert captured["intermediates"][head]["__call__"][0].dtype == jnp.float32
  assert logits.dtype == jnp.float32


def test_an_old_run_resumes_unless_it_trained_a_loss_whose_batching_changed(tmp_path):
  # A run saved before presets, batching and stability's term existed: its loss sections
  # hold the old defaults (SmoothAdv's η was 0 then). Other losses' sections do not count.
  config = losses.resolved_config(default.get_config())
  saved = config.to_dict()
  for name in losses.names():
    saved["train"][name] = {k: v for k, v in losses.defaults(name).items()
                            if k not in losses.EARLIER}
  saved["train"]["smoothadv"]["eta"] = 0.0
  workdir = Workdir(tmp_path)
  for loss, flags, refused in [("gaussian", {}, ""),
                               ("consistency", {}, "train.consistency.batching"),
                               ("consistency", {"batching": "whole"}, ""),
                               ("stability", {}, "train.stability.term"),
                               ("stability", {"term": "kl"}, "")]:
    saved["train"]["loss"] = loss
    workdir.config_path.write_text(json.dumps(saved))
    current = default.get_config()
    current.train.loss = loss
    current.train[loss].update(flags)
    current = losses.resolved_config(current)
    check = lambda: workdir.check_resumable(current, default.get_config(),
                                            losses.later_keys(loss),
                                            ignored=losses.inactive_sections(current.train,
                                                                             "train"))
    if refused:
      with pytest.raises(ValueError, match=rf"different config \({refused}\)"):
        check()
    else:
      check()
