"""The model zoo: shapes and published parameter counts, BatchNorm at certification (and folded
into the convolutions), dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import instars_jax as ij
from instars_jax import models
from instars_jax.train import state as state_lib


@pytest.mark.parametrize("name, shape, classes", [
    ("lenet", (28, 28), 10), ("resnet20", (32, 32, 3), 10),
    pytest.param("resnet110", (32, 32, 3), 10, marks=pytest.mark.slow),
    pytest.param("resnet50", (224, 224, 3), 1000, marks=pytest.mark.slow)])
def test_model_shapes(name, shape, classes):
  model = models.create_model(name, classes)
  x = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert logits.shape == (2, classes) and logits.dtype == jnp.float32
  params = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(variables["params"]))
  expected = {"resnet20": 0.27e6, "resnet110": 1.7e6, "resnet50": 25.6e6}
  if name in expected:  # the published parameter counts
    assert params == pytest.approx(expected[name], rel=0.03)


def test_batchnorm_uses_running_statistics_at_certification():
  model = models.create_model("resnet20", 10)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  one = model.apply(variables, x[:1])
  with_others = model.apply(variables, x)[:1]
  np.testing.assert_allclose(one, with_others, rtol=1e-4, atol=1e-5)  # no batch dependence
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert not np.allclose(jax.tree_util.tree_leaves(updates)[0],
                         jax.tree_util.tree_leaves(variables["batch_stats"])[0])


def test_bfloat16_and_bad_model_names():
  model = models.create_model("lenet", 10, "bfloat16", "fashion_mnist")
  x = jnp.ones((2, 28, 28))
  assert model.apply(model.init(jax.random.PRNGKey(0), x), x).dtype == jnp.float32
  with pytest.raises(ValueError, match="model.name"):
    models.create_model("vgg", 10)
  with pytest.raises(ValueError, match="model.dtype"):
    models.create_model("lenet", 10, "float16")
  with pytest.raises(ValueError, match="depth must be 6n"):
    models.cifar_resnet(21)


# --- BatchNorm folded into the convolutions (certification's graph) ---


def _random_batch_norm(params, batch_stats, key):
  """BatchNorm parameters and running statistics as a trained network might have them (the
  initial ones are the identity, and the blocks' last scales zero): means off zero, variances
  from 1e-4 to 1 (so that ε = 1e-5 matters), scales in proportion to √var (activations keep
  their size through 110 layers)."""
  params, batch_stats = dict(params), dict(batch_stats)
  for i, name in enumerate(sorted(batch_stats)):
    k = jax.random.split(jax.random.fold_in(key, i), 4)
    if name.startswith("BatchNorm_"):
      shape = params[name]["scale"].shape
      var = jnp.exp(jax.random.uniform(k[0], shape, minval=np.log(1e-4), maxval=0.0))
      batch_stats[name] = {"mean": 0.5 * jax.random.normal(k[1], shape), "var": var}
      params[name] = {"scale": jnp.sqrt(var) * jax.random.uniform(k[2], shape, minval=0.5,
                                                                   maxval=1.5),
                      "bias": 0.2 * jax.random.normal(k[3], shape)}
    else:
      params[name], batch_stats[name] = _random_batch_norm(params[name], batch_stats[name], k[0])
  return params, batch_stats


@functools.lru_cache(maxsize=None)
def _model_with_statistics(name, shape, dtype="float32"):
  """(model, variables, images) with random BatchNorm statistics, and the head's bias centred
  on noisy images (σ = 0.25) so that the predictions spread over the classes, near-ties
  included, instead of one class winning every input of a random network."""
  model = models.create_model(name, 10, dtype)
  images = jax.random.uniform(jax.random.PRNGKey(0), (16,) + shape)
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), images[:1])
  params, batch_stats = _random_batch_norm(variables["params"], variables["batch_stats"],
                                           jax.random.PRNGKey(2))
  noisy = images + 0.25 * jax.random.normal(jax.random.PRNGKey(3), images.shape)
  logits = jax.jit(model.apply)({"params": params, "batch_stats": batch_stats}, noisy)
  params["Dense_0"] = {**params["Dense_0"], "bias": params["Dense_0"]["bias"] - logits.mean(0)}
  return model, {"params": params, "batch_stats": batch_stats}, images


def _folded_logits_error(name, shape, fold=models.fold_batch_norm):
  model, variables, images = _model_with_statistics(name, shape)
  expected = jax.jit(model.apply)(variables, images)
  folded, folded_variables = fold(model, variables)
  got = jax.jit(folded.apply)(folded_variables, images)
  return float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))


@pytest.mark.parametrize("name, shape", [
    ("resnet20", (8, 8, 3)), pytest.param("resnet110", (8, 8, 3), marks=pytest.mark.slow),
    pytest.param("resnet50", (32, 32, 3), marks=pytest.mark.slow)])
def test_folded_batch_norm_keeps_the_logits(name, shape):
  model, variables, _ = _model_with_statistics(name, shape)
  before = jax.tree_util.tree_map(np.array, variables)
  folded, folded_variables = models.fold_batch_norm(model, variables)
  assert folded.folded and set(folded_variables) == {"params"}
  assert not any("BatchNorm" in jax.tree_util.keystr(path) for path, _ in
                 jax.tree_util.tree_flatten_with_path(folded_variables)[0])
  assert _folded_logits_error(name, shape) < 1e-5
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, before)  # checkpoint as is


def test_a_fold_without_epsilon_moves_the_logits(monkeypatch):
  """The check above can fail: folding with ε = 0 (a variance of 1e-4 then scales 5% too
  much) leaves logits far outside 1e-5."""
  def fold_without_epsilon(model, variables):
    with monkeypatch.context() as patch:
      patch.setattr(models, "BATCH_NORM_EPSILON", 0.0)
      return models.fold_batch_norm(model, variables)

  assert _folded_logits_error("resnet20", (8, 8, 3), fold_without_epsilon) > 1e-4


@pytest.mark.slow
def test_folded_bfloat16_predictions_agree_on_noisy_inputs():
  """bfloat16 rounds the folded kernels and adds the bias in bfloat16, so near-ties may flip:
  on 2,000 noisy inputs the folded model disagrees with the unfolded one at most two points
  more often than bfloat16 itself disagrees with float32. (A random network's logits lie
  close: bfloat16 alone flips about 2% here; the issue's ≥ 99.9% is for trained models.)"""
  model, variables, _ = _model_with_statistics("resnet20", (8, 8, 3), "bfloat16")
  exact, exact_variables, _ = _model_with_statistics("resnet20", (8, 8, 3))
  folded, folded_variables = models.fold_batch_norm(model, variables)
  x = jax.random.uniform(jax.random.PRNGKey(4), (8, 8, 8, 3))
  noisy = (x[:, None] + 0.25 * jax.random.normal(jax.random.PRNGKey(5), (8, 250, 8, 8, 3))
           ).reshape(-1, 8, 8, 3)
  ours = jnp.argmax(jax.jit(folded.apply)(folded_variables, noisy), -1)
  theirs = jnp.argmax(jax.jit(model.apply)(variables, noisy), -1)
  float32 = jnp.argmax(jax.jit(exact.apply)(exact_variables, noisy), -1)
  assert len(np.unique(theirs)) >= 5  # the predictions spread: agreement is not trivial
  assert np.mean(ours == theirs) >= np.mean(theirs == float32) - 0.02


@pytest.mark.slow
def test_folded_counts_match_on_a_fixed_seed():
  """float32 counts over 10⁵ noisy samples (4 images × 25,000): at most one flips."""
  model, variables, _ = _model_with_statistics("resnet20", (8, 8, 3))
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(6), (4, 8, 8, 3)))
  count = lambda apply_fn: np.asarray(ij.sample_counts(
      apply_fn, x, 0.25, jax.random.PRNGKey(7), num=25_000, batch_size=5_000, num_classes=10))
  folded, folded_variables = models.fold_batch_norm(model, variables)
  ours = count(models.bind_variables(folded.apply, folded_variables))
  theirs = count(models.bind_variables(model.apply, variables))
  assert len(np.unique(theirs.argmax(-1))) >= 2 and ours.sum() == theirs.sum() == 100_000
  assert np.abs(ours - theirs).sum() // 2 <= 1


def test_certification_runs_the_folded_model(tmp_path):
  """selection.classifier, what certification applies: the folded graph of the saved weights,
  the checkpoint left as it was."""
  from instars_jax.selection import classifier
  from instars_jax.storage import checkpoints
  model, variables, images = _model_with_statistics("resnet20", (8, 8, 3))
  state = state_lib.ModelState.create(apply_fn=model.apply, params=variables["params"],
                                      batch_stats=variables["batch_stats"], tx=optax.sgd(0.1))
  manager = checkpoints.manager(tmp_path)
  checkpoints.save(manager, 1, state, {"stage": "base", "step": 1, "steps": 1})
  inference = classifier.from_checkpoint(model, manager, 1)
  assert "batch_stats" not in inference.args[0]
  np.testing.assert_allclose(inference(images), state_lib.logits_fn(state)(images), rtol=1e-5,
                             atol=1e-5)
  saved = checkpoints.restore_variables(manager, 1)
  np.testing.assert_array_equal(saved["batch_stats"]["BatchNorm_0"]["mean"],
                                variables["batch_stats"]["BatchNorm_0"]["mean"])
  lenet = models.create_model("lenet", 10, stats="fashion_mnist")
  lenet_variables = lenet.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28)))
  assert models.fold_batch_norm(lenet, lenet_variables) == (lenet, lenet_variables)
  with pytest.raises(ValueError, match="cannot train"):
    models.fold_batch_norm(model, variables)[0].apply(
        models.fold_batch_norm(model, variables)[1], images, train=True)
