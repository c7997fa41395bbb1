"""Import of Cohen et al.-format PyTorch checkpoints: the same logits as torch, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import instars_jax as ij
from instars_jax import certification, import_torch
from instars_jax.storage import results

# make test installs torch and sets INSTARS_REQUIRE_TORCH, so there these tests run or fail;
# elsewhere torch is an optional extra (pip install -e '.[torch]') and they are skipped.
if os.environ.get("INSTARS_REQUIRE_TORCH"):
  import torch
else:
  torch = pytest.importorskip("torch", reason="torch is the optional extra: pip install -e '.[torch]'")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from torch_models import ARCHES, Normalize  # noqa: E402
nn = torch.nn


def published(arch, path, seed=0):
  """A randomly initialised model with non-trivial BatchNorm statistics, saved like Cohen et
  al.'s checkpoints; returns the torch model (eval mode) with its Normalize layer."""
  torch.manual_seed(seed)
  build, stats, _ = ARCHES[arch]
  net = build()
  for m in net.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.running_mean.uniform_(-0.3, 0.3)
      m.running_var.uniform_(0.5, 2.0)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.2, 0.2)
  inner = nn.DataParallel(net) if arch == "resnet50" else net
  model = nn.Sequential(Normalize(stats), inner).eval()
  torch.save({"epoch": 90, "arch": arch, "state_dict": model.state_dict()}, path)
  return model


@pytest.mark.parametrize("arch", ["cifar_resnet20",  # basic and bottleneck blocks
                                  pytest.param("resnet50", marks=pytest.mark.slow)])
def test_imported_logits_match_torch(arch, tmp_path):
  model = published(arch, tmp_path / "checkpoint.pth.tar")
  workdir = import_torch.import_checkpoint(tmp_path / "checkpoint.pth.tar", tmp_path / "run")
  state = ij.load_train_state(workdir)
  size = ARCHES[arch][2]
  x = np.random.default_rng(1).uniform(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    expected = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  got = np.asarray(ij.logits_fn(state)(x))  # op by op: compiling a ResNet-110 costs more
  assert np.max(np.abs(got - expected)) <= 1e-4
  run = json.loads((workdir / "run.json").read_text())
  assert run["torch_arch"] == arch and run["stats"] == ARCHES[arch][1]


def test_import_then_certify_end_to_end(tmp_path):
  published("cifar_resnet20", tmp_path / "checkpoint.pth.tar")
  rng = np.random.default_rng(0)
  npz = tmp_path / "tiny.npz"
  np.savez(npz, x_train=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
           y_train=np.arange(8) % 10, x_test=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
           y_test=np.arange(4))
  import_torch.import_checkpoint(tmp_path / "checkpoint.pth.tar", tmp_path / "run",
                                 dataset=f"npz:{npz}")
  # certify.py --workdir=run: the imported run's own config, certification's settings set
  config = certification.run_config(tmp_path / "run", {
      "certify.n0": 8, "certify.n": 64, "certify.batch": 64, "certify.sigma": 0.25,
      "certify.skip": 1})
  path = certification.certify_test_set(config, tmp_path / "run")
  assert len(results.read_results(path)["idx"]) == 4


@pytest.mark.slow
def test_every_tensor_of_resnet110_finds_its_flax_parameter(tmp_path):
  # ResNet-110 is ResNet-20's blocks, 18 per stage: its mapping is checked key by key and
  # shape by shape (running it would only repeat the ResNet-20 check, at the cost of compiling
  # 110 layers).
  published("cifar_resnet110", tmp_path / "checkpoint.pth.tar")
  workdir = import_torch.import_checkpoint(tmp_path / "checkpoint.pth.tar", tmp_path / "run")
  state = ij.load_train_state(workdir)
  arch, state_dict = import_torch.read_checkpoint(tmp_path / "checkpoint.pth.tar")
  np.testing.assert_array_equal(
      np.asarray(state.params["BasicBlock_53"]["Conv_1"]["kernel"]),
      state_dict["layer3.17.conv2.weight"].transpose(2, 3, 1, 0))
  assert len(import_torch.layer_map("resnet110")) == 3 + 54 * 4 + 2 * 2


@pytest.mark.slow
def test_bad_checkpoints_fail_with_one_line(tmp_path):
  model = published("cifar_resnet20", tmp_path / "good.pth.tar")
  state = model.state_dict()
  cases = {
      "unknown.pth": ({"arch": "vgg16", "state_dict": state}, "unknown arch 'vgg16'"),
      "missing.pth": ({"arch": "cifar_resnet20",
                       "state_dict": {k: v for k, v in state.items() if "fc." not in k}},
                      "2 missing keys"),
      "extra.pth": ({"arch": "cifar_resnet20", "state_dict": {**state, "1.head.weight": state["1.fc.weight"]}},
                    "1 extra keys"),
      "other.pth": ({"arch": "cifar_resnet110", "state_dict": state}, "does not match resnet110"),
  }
  for name, (content, message) in cases.items():
    torch.save(content, tmp_path / name)
    with pytest.raises(ValueError, match=message):
      import_torch.import_checkpoint(tmp_path / name, tmp_path / name.replace(".pth", ""))
  (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
  done = subprocess.run([sys.executable, "-m", "instars_jax.import_torch", tmp_path / "corrupt.pth",
                         f"--workdir={tmp_path / 'c'}"], cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 2
  assert done.stderr.count("\n") == 1 and "cannot read" in done.stderr and "Traceback" not in done.stderr
  assert not (tmp_path / "c").exists()
