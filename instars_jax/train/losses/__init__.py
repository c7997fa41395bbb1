"""The training losses of randomized smoothing, one module each, found by name (big_vision's
plug-in pattern): `--config.train.loss=NAME` selects `instars_jax/train/losses/NAME.py`, and
the config section `train.NAME` holds that module's settings, passed to it as keyword
arguments. A new loss is one new file here; `configs/default.py` finds its section.

A loss module has
  DEFAULTS                a literal dict: its config section, with the published defaults
                          (read without importing the module, so flags parse before JAX loads)
  validate(**settings)    -> messages naming each bad value (none when all are good)
  inputs(images, labels, sigma, keys, *, predict, epoch, **settings) -> float32[m, B, ...]
        the m inputs of each example that the step's one forward pass sees: its noise
        copies, SmoothAdv's attacked point plus those copies, stability's clean image and
        its noisy copy
  objective(logits, labels, sigma, *, epoch, **settings) -> (float32[B], metrics)
        each example's loss from the logits [m, B, C] of those inputs, and metrics to log

`images` are [0, 1] pixels; `sigma` is float32[B], each example's own σ (its σ-table entry, or
the explore rule's grid σ), so every loss composes with Insta-RS Train; `keys` are the
examples' keys, fold_in(step's noise key, index), whose sub-streams are
streams.ExampleStream; `predict` maps inputs to the logits of the current model in evaluation
mode, with no gradient to the weights (SmoothAdv's attack); `epoch` is a traced int32
(SmoothAdv's ε warm-up, MACER's deferral); `labels` are int32[B].
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
from pathlib import Path

DEFAULT_LOSS = "gaussian"


def names() -> list:
  """The losses of this package (its modules not named with a leading underscore)."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def defaults(name: str) -> dict:
  """The DEFAULTS dict of loss `name`, read from its source (the module is not imported)."""
  tree = ast.parse((Path(__file__).parent / f"{name}.py").read_text())
  for node in tree.body:
    targets = [getattr(target, "id", None) for target in getattr(node, "targets", ())]
    if isinstance(node, ast.Assign) and targets == ["DEFAULTS"]:
      return ast.literal_eval(node.value)
  raise ValueError(f"the loss module {name}.py has no literal DEFAULTS dict")


def sections() -> dict:
  """{loss name: its config section's defaults}, for configs/default.py."""
  return {name: defaults(name) for name in names()}


@dataclasses.dataclass(frozen=True)
class Loss:
  """One loss with its settings: hashable, so the jitted step takes it as a static argument
  (one compiled program per loss and settings)."""
  name: str
  settings: tuple  # sorted (key, value) pairs of the loss's config section

  @property
  def module(self):
    return importlib.import_module(f"{__name__}.{self.name}")

  def inputs(self, images, labels, sigma, keys, *, predict, epoch):
    return self.module.inputs(images, labels, sigma, keys, predict=predict, epoch=epoch,
                              **dict(self.settings))

  def objective(self, logits, labels, sigma, *, epoch):
    return self.module.objective(logits, labels, sigma, epoch=epoch, **dict(self.settings))


def from_config(train_config) -> Loss:
  """The loss `train.loss` names, with its section `train.<loss>`."""
  name = train_config.loss
  return Loss(name, tuple(sorted(train_config[name].to_dict().items())))


def validate(train_config) -> list:
  """(ok, message) checks of the loss settings: a known loss, good values of its own
  section, and no other loss's section changed from its defaults (an option given for
  another loss would be silently ignored)."""
  name = train_config.loss
  if name not in names():
    return [(False, f"train.loss must be one of {names()}; got {name!r}")]
  module = importlib.import_module(f"{__name__}.{name}")
  checks = [(False, f"train.{name}.{message}")
            for message in module.validate(**train_config[name].to_dict())]
  for other in names():
    if other == name:
      continue
    changed = sorted(k for k, v in defaults(other).items()
                     if train_config[other].get(k) != v)
    checks += [(False, f"train.{other}.{k} is set but train.loss is {name!r}: it would be "
                       f"ignored (set train.loss={other}, or leave train.{other} at its defaults)")
               for k in changed]
  return checks
