"""Import of published PyTorch smoothing checkpoints into a workdir that certify.py and
`instars_jax.load_train_state` accept.

    python -m instars_jax.import_torch CHECKPOINT --workdir=DIR [--dataset=NAME]

Reads Cohen et al.'s format (locuslab/smoothing, also used by later work built on their code):
a dict with `arch` ∈ {cifar_resnet20, cifar_resnet110, resnet50} and a `state_dict` of
`Sequential(NormalizeLayer, model)`: keys prefixed `1.`, then `module.` for the DataParallel
ImageNet model. The CIFAR ResNets are their `cifar_resnet` (basic blocks, 6n + 2 layers,
1×1-convolution shortcuts); ResNet-50 is torchvision's. Their NormalizeLayer holds no
weights: the per-channel constants of the arch's dataset (CIFAR-10 or ImageNet) become the
model's first layer here, as they were there, so the imported model takes x in [0, 1], NHWC.

Every parameter and BatchNorm statistic must be matched: a missing, extra or mis-shaped key
is an error. Needs torch (`pip install -e '.[torch]'`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from configs import default
from instars_jax.storage import checkpoints
from instars_jax.storage.workdir import TrainingFacts, Workdir
from instars_jax.train.state import create_train_state

# torch arch -> (model.name, normalization stats, image shape, dataset of the workdir's config)
ARCHES = {
    "cifar_resnet20": ("resnet20", "cifar10", (32, 32, 3), "cifar10"),
    "cifar_resnet110": ("resnet110", "cifar10", (32, 32, 3), "cifar10"),
    "resnet50": ("resnet50", "imagenet", (224, 224, 3), "imagenet2012"),
}
_STAGES = {"resnet20": ((3, 3, 3), 2), "resnet110": ((18, 18, 18), 2),
           "resnet50": ((3, 4, 6, 3), 3)}  # blocks per stage, convolutions per block


def layer_map(model_name: str) -> dict[str, tuple[str, ...]]:
  """torch module name (without prefixes) -> flax module path, for every conv, BN and fc."""
  stages, convs = _STAGES[model_name]
  block = "BasicBlock" if convs == 2 else "Bottleneck"
  names = {"conv1": ("Conv_0",), "bn1": ("BatchNorm_0",), "fc": ("Dense_0",)}
  index = 0
  for stage, size in enumerate(stages):
    for i in range(size):
      torch_block, flax_block = f"layer{stage + 1}.{i}", f"{block}_{index}"
      for j in range(convs):
        names[f"{torch_block}.conv{j + 1}"] = (flax_block, f"Conv_{j}")
        names[f"{torch_block}.bn{j + 1}"] = (flax_block, f"BatchNorm_{j}")
      # A projection shortcut where the shape changes (stride 2, or a bottleneck's 4× width):
      # the block's last convolution and norm in flax.
      if i == 0 and (stage > 0 or convs == 3):
        names[f"{torch_block}.downsample.0"] = (flax_block, f"Conv_{convs}")
        names[f"{torch_block}.downsample.1"] = (flax_block, f"BatchNorm_{convs}")
      index += 1
  return names


def strip_prefixes(state_dict: dict) -> dict:
  """Keys without the `1.` of Sequential(NormalizeLayer, model) and DataParallel's `module.`."""
  stripped = {}
  for key, value in state_dict.items():
    for prefix in ("1.", "module."):
      key = key[len(prefix):] if key.startswith(prefix) else key
    stripped[key] = value
  return stripped


def _fields(model_name: str):
  """(torch key, flax path, transpose) of every tensor the model `model_name` needs."""
  for torch_name, path in layer_map(model_name).items():
    kind = path[-1].split("_")[0]
    if kind == "Conv":
      fields = {"weight": ("params", "kernel", (2, 3, 1, 0))}
    elif kind == "Dense":
      fields = {"weight": ("params", "kernel", (1, 0)), "bias": ("params", "bias", None)}
    else:
      fields = {"weight": ("params", "scale", None), "bias": ("params", "bias", None),
                "running_mean": ("batch_stats", "mean", None),
                "running_var": ("batch_stats", "var", None)}
    for field, (collection, leaf, transpose) in fields.items():
      yield f"{torch_name}.{field}", (collection,) + path + (leaf,), transpose


def check_keys(state_dict: dict, model_name: str) -> None:
  """ValueError unless the state_dict has exactly the tensors of `model_name` (BatchNorm's
  num_batches_tracked aside)."""
  expected = {key for key, _, _ in _fields(model_name)}
  optional = {k for k in state_dict if k.endswith(".num_batches_tracked")}
  missing = sorted(expected - set(state_dict))
  extra = sorted(set(state_dict) - expected - optional)
  if missing or extra:
    raise ValueError(f"the state_dict does not match {model_name}: "
                     f"{len(missing)} missing keys {missing[:3]}, {len(extra)} extra keys {extra[:3]}")


def convert(state_dict: dict, model_name: str, template: dict) -> dict:
  """{"params", "batch_stats"} for the flax model `model_name` from a torch state_dict (numpy
  arrays, prefixes stripped); `template` gives the flax shapes. ValueError on any key that is
  missing, extra or of the wrong shape."""
  check_keys(state_dict, model_name)
  wanted = traverse_util.flatten_dict(template)
  flat = {}
  for key, path, transpose in _fields(model_name):
    value = np.asarray(state_dict[key], np.float32)
    value = value if transpose is None else value.transpose(transpose)
    if wanted[path].shape != value.shape:
      raise ValueError(f"{key} has shape {value.shape} in the checkpoint (as {'/'.join(path)}); "
                       f"the {model_name} here needs {wanted[path].shape}")
    flat[path] = value
  return traverse_util.unflatten_dict(flat)


def read_checkpoint(path) -> tuple[str, dict]:
  """(arch, state_dict as numpy arrays) of a Cohen-format checkpoint file."""
  try:
    import torch
  except ImportError:
    raise ValueError("importing PyTorch checkpoints needs torch: pip install -e '.[torch]'") from None
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint not found: {path}")
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises many types for a corrupt or foreign file
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ValueError(f"cannot read {path} as a PyTorch checkpoint: {detail}") from None
  if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "arch" not in checkpoint:
    raise ValueError(f"{path} is not in Cohen et al.'s format: a dict with 'arch' and 'state_dict'")
  arch = checkpoint["arch"]
  if arch not in ARCHES:
    raise ValueError(f"unknown arch {arch!r} in {path}; known: {sorted(ARCHES)}")
  state_dict = {k: v.detach().cpu().numpy() for k, v in checkpoint["state_dict"].items()}
  return arch, strip_prefixes(state_dict)


def import_checkpoint(path, workdir, dataset: str = "") -> Path:
  """Writes the workdir (config.json, run.json, one orbax checkpoint) of the checkpoint at
  `path`; `dataset` overrides the config's dataset (default: the arch's)."""
  arch, state_dict = read_checkpoint(path)
  model_name, stats, image_shape, default_dataset = ARCHES[arch]
  check_keys(state_dict, model_name)
  num_classes = int(state_dict["fc.bias"].shape[0])
  config = default.get_config()
  config.dataset = dataset or default_dataset
  config.model.name = model_name
  config.num_classes = num_classes
  config.train.epochs = 1
  workdir = Workdir(workdir)
  if workdir.config_path.exists():
    raise ValueError(f"{workdir.path} already holds a run: choose a new --workdir")
  facts = TrainingFacts(image_shape, num_classes, stats, num_train=1, steps_per_epoch=1,
                dataset=config.dataset, imported_from=str(Path(path).resolve()), torch_arch=arch)
  state = create_train_state(config, facts)
  template = {"params": state.params, "batch_stats": state.batch_stats}
  variables = convert(state_dict, model_name, jax.tree_util.tree_map(np.asarray, template))
  state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
  workdir.path.mkdir(parents=True, exist_ok=True)
  checkpoints.save(workdir.checkpoints(), 1, state, {"stage": "base", "step": 1, "steps": 1})
  workdir.write_facts(facts)
  workdir.write_config(config)
  return workdir.path


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m instars_jax.import_torch",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("checkpoint")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--dataset", default="", help="the config's dataset (default: the arch's)")
  args = parser.parse_args(argv)
  try:
    workdir = import_checkpoint(args.checkpoint, args.workdir, args.dataset)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  print(f"imported {args.checkpoint} into {workdir}")


if __name__ == "__main__":
  main()
