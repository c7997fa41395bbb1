"""The model zoo: shapes and published parameter counts, BatchNorm at certification, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instars_jax import models


@pytest.mark.parametrize("name, shape, classes", [
    ("lenet", (28, 28), 10), ("resnet20", (32, 32, 3), 10), ("resnet110", (32, 32, 3), 10),
    ("resnet50", (224, 224, 3), 1000)])
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
