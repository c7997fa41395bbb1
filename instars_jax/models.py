"""Base classifiers (flax.linen). Each starts with per-channel normalization, so noise is
added in [0, 1] pixel space, before it, as in Cohen et al.'s code.

`model(x, train)`: BatchNorm uses batch statistics when train is True and running statistics
otherwise. Under bfloat16 compute the last layer (and ResNet's pooling before
it) computes in float32: the logits carry no bfloat16 rounding, which a loss that scales them
would amplify (MACER's softmax(β · logits), β = 16).
Certification runs `fold_batch_norm`'s model, whose convolutions absorb those running
statistics.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Per-channel statistics of the training sets, as used by Cohen et al.
DATASET_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


class Normalize(nn.Module):
  mean: Sequence[float]
  std: Sequence[float]

  @nn.compact
  def __call__(self, x):
    return (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.std, x.dtype)


# BatchNorm's ε, the same as PyTorch's (so imported checkpoints match) and in the folded kernels.
BATCH_NORM_EPSILON = 1e-5


def _channels_last(x):
  return x[..., None] if x.ndim == 3 else x


class LeNet(nn.Module):
  """A LeNet-style CNN for 28×28 grayscale images."""
  num_classes: int
  mean: Sequence[float] = DATASET_STATS["fashion_mnist"][0]
  std: Sequence[float] = DATASET_STATS["fashion_mnist"][1]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Normalize(self.mean, self.std)(_channels_last(x)).astype(self.dtype)
    for features in (16, 32):
      x = nn.relu(nn.Conv(features, (5, 5), dtype=self.dtype)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x)


def _residual(x, y, strides, norm, conv):
  """relu(x + y), projecting x (1×1 convolution + norm) where its shape differs from y's.
  Called inside a block's compact __call__, so the projection's layers belong to the block."""
  if x.shape != y.shape:
    x = norm()(conv(y.shape[-1], (1, 1), strides)(x))
  return nn.relu(x + y)


# PyTorch's padding: k // 2 on every side. (Flax's "SAME" pads a stride-2 convolution of an
# even-sized input only at the end, which would shift every feature map of an imported model.)
def _torch_padding(kernel_size):
  return [(k // 2, k // 2) for k in kernel_size]


def _folded_norm(**_):
  """The norm of a folded model: its affine map lives in the convolution before it."""
  return lambda x: x


class _Block(nn.Module):
  features: int
  strides: int
  norm: Any
  dtype: Any
  folded: bool = False

  def conv(self, features, kernel_size, strides=1):
    return nn.Conv(features, kernel_size, strides, padding=_torch_padding(kernel_size),
                   use_bias=self.folded, dtype=self.dtype)


class BasicBlock(_Block):
  @nn.compact
  def __call__(self, x):
    conv = self.conv
    y = nn.relu(self.norm()(conv(self.features, (3, 3), self.strides)(x)))
    y = self.norm(scale_init=nn.initializers.zeros)(conv(self.features, (3, 3))(y))
    return _residual(x, y, self.strides, self.norm, conv)


class Bottleneck(_Block):
  @nn.compact
  def __call__(self, x):
    conv = self.conv
    y = nn.relu(self.norm()(conv(self.features, (1, 1))(x)))
    y = nn.relu(self.norm()(conv(self.features, (3, 3), self.strides)(y)))
    y = self.norm(scale_init=nn.initializers.zeros)(conv(4 * self.features, (1, 1))(y))
    return _residual(x, y, self.strides, self.norm, conv)


class ResNet(nn.Module):
  """ResNet with projection shortcuts. CIFAR variants (stem 3×3, widths 16/32/64) follow
  Cohen et al.'s `cifar_resnet`; the ImageNet variant is torchvision's ResNet-50 (stride in the
  3×3 convolution). Layer for layer and padding for padding as in PyTorch, so published
  checkpoints import exactly (`import_torch.py`).

  `folded`: every BatchNorm is folded into the convolution before it, whose kernel and bias
  `fold_batch_norm` computes (inference only)."""
  stage_sizes: Sequence[int]
  block: Any
  num_classes: int
  widths: Sequence[int]
  mean: Sequence[float]
  std: Sequence[float]
  imagenet_stem: bool = False
  dtype: Any = jnp.float32
  folded: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.folded and train:
      raise ValueError("a model with BatchNorm folded into its convolutions cannot train")
    norm = _folded_norm if self.folded else functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=BATCH_NORM_EPSILON,
        dtype=self.dtype)
    x = Normalize(self.mean, self.std)(_channels_last(x)).astype(self.dtype)
    if self.imagenet_stem:
      x = nn.Conv(self.widths[0], (7, 7), 2, padding=[(3, 3), (3, 3)], use_bias=self.folded,
                  dtype=self.dtype)(x)
      x = nn.relu(norm()(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_torch_padding((3, 3)))
    else:
      x = nn.relu(norm()(nn.Conv(self.widths[0], (3, 3), padding=_torch_padding((3, 3)),
                                 use_bias=self.folded, dtype=self.dtype)(x)))
    for stage, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for i in range(size):
        strides = 2 if stage > 0 and i == 0 else 1
        x = self.block(width, strides, norm, self.dtype, self.folded)(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x)


def cifar_resnet(depth: int, num_classes: int = 10, dtype=jnp.float32, stats="cifar10"):
  if (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110); got {depth}")
  n = (depth - 2) // 6
  mean, std = normalization(stats)
  return ResNet((n, n, n), BasicBlock, num_classes, (16, 32, 64), mean, std, dtype=dtype)


def resnet50(num_classes: int = 1000, dtype=jnp.float32, stats="imagenet"):
  mean, std = normalization(stats)
  return ResNet((3, 4, 6, 3), Bottleneck, num_classes, (64, 128, 256, 512), mean, std,
                imagenet_stem=True, dtype=dtype)


def normalization(stats) -> tuple:
  """(mean, std) per channel of `stats`: a DATASET_STATS name, or a source's own pair of
  equal-length sequences (std > 0); ValueError otherwise."""
  if isinstance(stats, str):
    if stats not in DATASET_STATS:
      raise ValueError(f"normalization stats must be one of {sorted(DATASET_STATS)} or a "
                       f"(mean, std) pair; got {stats!r}")
    return DATASET_STATS[stats]
  try:
    mean, std = (tuple(float(v) for v in values) for values in stats)
  except (TypeError, ValueError):
    raise ValueError(f"normalization stats must be a name or a (mean, std) pair of per-channel "
                     f"values; got {stats!r}") from None
  if not mean or len(mean) != len(std) or min(std) <= 0:
    raise ValueError(f"normalization stats need one mean and one std > 0 per channel; got "
                     f"{stats!r}")
  return mean, std


ARCHITECTURES = ("lenet", "resnet20", "resnet110", "resnet50")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model(name: str, num_classes: int, dtype: str = "float32", stats="cifar10"):
  """The architecture `name` with `num_classes` outputs, computing in `dtype`; `stats`
  (`normalization`) is the per-channel mean and std of its Normalize layer."""
  if dtype not in DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
  mean, std = normalization(stats)
  if name == "lenet":
    return LeNet(num_classes, mean, std, DTYPES[dtype])
  if name in ("resnet20", "resnet110"):
    return cifar_resnet(int(name[6:]), num_classes, DTYPES[dtype], stats)
  if name == "resnet50":
    return resnet50(num_classes, DTYPES[dtype], stats)
  raise ValueError(f"model.name must be one of {ARCHITECTURES}; got {name!r}")


def fold_batch_norm(model, variables) -> tuple:
  """(model, variables) of the same function at inference with every BatchNorm folded into
  the convolution before it: BN(conv(x; W)) = conv(x; W·s) + β − μ·s per output channel, with
  s = γ / √(var + ε) from the running statistics (exact in real arithmetic; in floating point
  the logits move by rounding only). `variables` is left untouched; a model without BatchNorm
  comes back as it is.

  In ResNet and its blocks BatchNorm_k normalizes the output of Conv_k: each pair is created
  in the same order (`norm()(conv(...)(x))`), so the folded model's Conv_k, now with a bias,
  takes the pair's place under the same name."""
  if not isinstance(model, ResNet) or model.folded:
    return model, variables
  return (model.clone(folded=True),
          {"params": _fold(variables["params"], variables["batch_stats"])})


def _fold(params, batch_stats) -> dict:
  folded = {}
  for name, value in params.items():
    norm = f"BatchNorm_{name.removeprefix('Conv_')}"
    if name.startswith("BatchNorm_"):
      continue
    if name.startswith("Conv_") and norm in params:
      stats = batch_stats[norm]
      scale = params[norm]["scale"] * jax.lax.rsqrt(stats["var"] + BATCH_NORM_EPSILON)
      folded[name] = {"kernel": value["kernel"] * scale,
                      "bias": params[norm]["bias"] - stats["mean"] * scale}
    else:
      folded[name] = _fold(value, batch_stats[name]) if name in batch_stats else value
  return folded


def bind_variables(apply, variables) -> jax.tree_util.Partial:
  """x -> apply(variables, x, train=False), the variables a pytree of the result: the sampler
  passes them to its compiled programs as arguments, not as constants."""
  return jax.tree_util.Partial(functools.partial(apply, train=False), variables)
