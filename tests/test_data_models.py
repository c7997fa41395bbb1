"""Data sources, deterministic batching and the model zoo."""

import gzip
import io
import struct
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from instars_jax import data, models


def write_npz(path, n_train=60, n_test=20, shape=(28, 28), classes=3, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    labels = np.arange(n) % classes
    images = rng.integers(0, 60, size=(n,) + shape)
    for c in range(classes):  # class c lights up its own band of rows
      band = slice(c * shape[0] // classes, (c + 1) * shape[0] // classes)
      images[labels == c, band] += 180
    arrays[f"x_{split}"] = images.astype(np.uint8)
    arrays[f"y_{split}"] = labels.astype(np.int64)
  np.savez(path, **arrays)
  return path


def test_npz_source(tmp_path):
  path = write_npz(tmp_path / "toy.npz")
  dataset = data.load_dataset(f"npz:{path}")
  assert dataset.num_classes == 3 and len(dataset.train) == 60 and len(dataset.test) == 20
  assert dataset.image_shape == (28, 28)
  batch = dataset.test.take(np.array([3, 5]))
  assert batch["image"].dtype == np.float32 and 0 <= batch["image"].min() <= batch["image"].max() <= 1
  np.testing.assert_array_equal(batch["index"], [3, 5])
  np.testing.assert_array_equal(batch["label"], [0, 2])
  assert data.load_dataset(f"npz:{path}", num_classes=5).num_classes == 5


def test_npz_errors(tmp_path):
  with pytest.raises(data.DatasetError, match="npz dataset not found"):
    data.load_dataset(f"npz:{tmp_path / 'missing.npz'}")
  np.savez(tmp_path / "partial.npz", x_train=np.zeros((2, 4, 4), np.uint8))
  with pytest.raises(data.DatasetError, match="lacks arrays"):
    data.load_dataset(f"npz:{tmp_path / 'partial.npz'}")
  np.savez(tmp_path / "float.npz", x_train=np.zeros((2, 4, 4)), y_train=np.zeros(2),
           x_test=np.zeros((2, 4, 4)), y_test=np.zeros(2))
  with pytest.raises(data.DatasetError, match="must be uint8"):
    data.load_dataset(f"npz:{tmp_path / 'float.npz'}")
  with pytest.raises(data.DatasetError, match="unknown dataset"):
    data.load_dataset("mnist_typo")
  with pytest.raises(data.DatasetError, match="num_classes=2"):
    data.load_dataset(f"npz:{write_npz(tmp_path / 'toy.npz')}", num_classes=2)


def test_fashion_mnist_idx_reader(tmp_path):
  def idx(array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()
  rng = np.random.default_rng(0)
  images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
  for prefix in ("train", "t10k"):
    (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(images)))
    (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(idx(labels))
  dataset = data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
  np.testing.assert_array_equal(dataset.train.images, images)
  np.testing.assert_array_equal(dataset.test.labels, labels)
  assert dataset.stats == "fashion_mnist"
  with pytest.raises(data.DatasetError, match="IDX files not found"):
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "nowhere"))


def test_cifar10_jpeg_decodes_once_and_caches(tmp_path):
  archive = tmp_path / "cifar10-jpeg-q75.tar.xz"
  rng = np.random.default_rng(0)
  with tarfile.open(archive, "w:xz") as tar:
    for split, per_class in (("train", 2), ("test", 1)):
      for cls in ("airplane", "truck"):
        for k in range(per_class):
          buffer = io.BytesIO()
          Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
          info = tarfile.TarInfo(f"{split}/{cls}/{k:04d}.jpg")
          info.size = buffer.tell()
          buffer.seek(0)
          tar.addfile(info, buffer)
  cache = tmp_path / "cache"
  dataset = data.load_dataset("cifar10_jpeg", data_dir=str(archive), cache_dir=str(cache))
  assert dataset.train.images.shape == (4, 32, 32, 3) and dataset.num_classes == 10
  np.testing.assert_array_equal(dataset.train.labels, [0, 0, 9, 9])
  np.testing.assert_array_equal(dataset.test.labels, [0, 9])
  assert len(list(cache.glob("*.npz"))) == 1
  again = data.load_dataset("cifar10_jpeg", data_dir=str(archive), cache_dir=str(cache))
  np.testing.assert_array_equal(again.train.images, dataset.train.images)
  with pytest.raises(data.DatasetError, match="archive not found"):
    data.load_dataset("cifar10_jpeg", data_dir=str(tmp_path / "none.tar.xz"))


def test_shuffling_is_a_function_of_seed_and_epoch():
  a = data.epoch_order(100, seed=1, epoch=3, shuffle=True)
  np.testing.assert_array_equal(a, data.epoch_order(100, seed=1, epoch=3, shuffle=True))
  assert not np.array_equal(a, data.epoch_order(100, seed=1, epoch=4, shuffle=True))
  assert sorted(a) == list(range(100))


def test_batches_split_over_hosts_cover_every_example():
  split = data.Split(np.zeros((50, 2, 2), np.uint8), np.arange(50, dtype=np.int32))
  seen = []
  for host in range(2):
    for batch in data.batches(split, 8, seed=0, epoch=1, shuffle=True, drop_remainder=True,
                              host_id=host, host_count=2):
      assert len(batch["index"]) == 4
      seen.extend(batch["index"])
  assert len(seen) == 48 and len(set(seen)) == 48
  whole = list(data.batches(split, 8, shuffle=False))
  assert sum(len(b["index"]) for b in whole) == 50


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
