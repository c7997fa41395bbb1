"""The training losses of randomized smoothing, one module each, found by name (big_vision's
plug-in pattern): `--config.train.loss=NAME` selects `instars_jax/train/losses/NAME.py`, and
the config section `train.NAME` holds that module's settings, passed to it as keyword
arguments. A new loss is one new file here; `configs/default.py` finds its section.

A loss module has
  DEFAULTS                a literal dict: its config section, with the published defaults
                          (read without importing the module, so flags parse before JAX loads)
  SOFT_TARGETS            whether it trains on targets over the classes too (the
                          σ-estimators' weighted soft labels), not only on class indices
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
(SmoothAdv's ε warm-up, MACER's deferral); `labels` are int32[B], or float32[B, C] targets
for a loss with SOFT_TARGETS.

The base model trains with `train.loss` and its section `train.<loss>`; the σ-estimators and
router nodes with `estimator.loss` and `estimator.<loss>` (consistency by default).
"""

from __future__ import annotations

import dataclasses
import importlib

from instars_jax import plugins

DEFAULT_LOSS = "gaussian"


def names() -> list:
  """The losses of this package (its modules not named with a leading underscore)."""
  return plugins.names(__name__)


def defaults(name: str) -> dict:
  """The DEFAULTS dict of loss `name`, read from its source (the module is not imported)."""
  return plugins.literal(plugins.source_path(__name__, name), "DEFAULTS")


def sections() -> dict:
  """{loss name: its config section's defaults}, for configs/default.py."""
  return {name: defaults(name) for name in names()}


# The σ-estimators' settings where they differ from the published ones of a base model: the
# consistency λ = 10 without the entropy term, as the estimator was tuned (docs/results.md).
ESTIMATOR_DEFAULTS = {"consistency": {"lbd": 10.0, "eta": 0.0}}


def estimator_defaults(name: str) -> dict:
  """The defaults of loss `name`'s section under `estimator`."""
  return defaults(name) | ESTIMATOR_DEFAULTS.get(name, {})


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


def from_config(section) -> Loss:
  """The loss `section.loss` names (section: config.train or config.estimator), with its
  settings `section.<loss>`."""
  name = section.loss
  return Loss(name, tuple(sorted(section[name].to_dict().items())))


def validate(section, prefix: str, defaults_of=defaults, soft_targets: bool = False) -> list:
  """(ok, message) checks of the loss settings of `section` (config.train, or
  config.estimator with `soft_targets`): a known loss, good values of its own settings, and
  no other loss's settings changed from `defaults_of(loss)` (an option given for another
  loss would be silently ignored)."""
  name = section.loss
  if name not in names():
    return [(False, f"{prefix}.loss must be one of {names()}; got {name!r}")]
  module = importlib.import_module(f"{__name__}.{name}")
  if soft_targets and not module.SOFT_TARGETS:
    trainable = [n for n in names() if importlib.import_module(f"{__name__}.{n}").SOFT_TARGETS]
    return [(False, f"{prefix}.loss={name} needs class labels; the σ-estimators train on soft "
                    f"labels: use one of {trainable}")]
  checks = [(False, f"{prefix}.{name}.{message}")
            for message in module.validate(**section[name].to_dict())]
  for other in names():
    if other == name:
      continue
    changed = sorted(k for k, v in defaults_of(other).items() if section[other].get(k) != v)
    checks += [(False, f"{prefix}.{other}.{k} is set but {prefix}.loss is {name!r}: it would "
                       f"be ignored (set {prefix}.loss={other}, or leave {prefix}.{other} at "
                       "its defaults)")
               for k in changed]
  return checks
