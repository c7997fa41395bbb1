"""The training losses of randomized smoothing, one module each, found by name (big_vision's
plug-in pattern, instars_jax/plugins.py): `--config.train.loss=NAME` selects
`instars_jax/train/losses/NAME.py`, and the config section `train.NAME` holds that module's
settings, passed to it as keyword arguments. A new loss is one new file here, which
`configs/default.py` finds with its section; or a module outside the package, named by its
dotted path (train.loss=my_pkg.my_loss, declaring FAMILY = "instars_jax.train.losses"), whose
section train.my_loss is added by naming it to the config: --config=configs/x.py:my_pkg.my_loss.

A loss module has
  DEFAULTS                a literal dict: its config section, with its defaults (read without
                          importing the module, so flags parse before JAX loads): its own
                          settings, `preset` (below) and, for a loss with m noise copies,
                          `batching` (below)
  PRESETS                 a literal dict {dataset: {σ: {key: value}}}: the settings its paper
                          and code published per dataset and σ (the module docstring cites
                          each); absent for a loss with nothing to preset
  SOFT_TARGETS            whether it trains on targets over the classes too (the
                          σ-estimators' weighted soft labels), not only on class indices
  SEPARATE_PASSES         whether its m inputs of each example go through the model in m
                          passes, each with its own BatchNorm statistics (else one pass)
  validate(**settings)    -> messages naming each bad value (none when all are good)
  inputs(images, labels, sigma, keys, *, predict, epoch, **settings) -> float32[m, B, ...]
        the m inputs of each example that the step's forward pass sees: its noise
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

Presets. `train.<loss>.preset=mnist|cifar10|...` fills the settings the loss's paper used on
that dataset at the run's σ (train.sigma; an Insta-RS run's examples also train at other grid
σ, under the same settings). An explicit setting wins: every key a preset can fill is unset
(None) in the config until the run resolves it, so a value given by a flag or a config file,
even one equal to the default, is kept; an unset key takes the preset's value, or without a
preset its DEFAULTS value. The resolved section is what config.json records. A preset the
module does not know, or one without a published setting at the run's σ, is refused.

Batching. The reference code of the losses with m noise copies (consistency, SmoothAdv) splits
each batch of B examples into m SGD steps of B/m examples, each with its m copies:
`batching = "split"`, their default. `"whole"` takes all B examples with their m copies in one
step (MACER's reference, and this project's batching before): the same images per epoch
through the model, m times fewer SGD updates. With "split", one training step (one batch of
the input pipeline, one checkpoint step) makes m updates: the learning-rate schedule counts
updates (Loss.updates_per_step).

The base model trains with `train.loss` and its section `train.<loss>`; the σ-estimators and
router nodes with `train.estimator.loss` and `train.estimator.<loss>` (consistency by default),
which take no preset.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from instars_jax import plugins

BATCHINGS = ("split", "whole")
# Keys added to the loss sections after runs were saved, with what those runs trained with
# (workdir.check_resumable): no preset, all B examples with their copies in one step, and
# stability's KL term.
EARLIER = {"preset": "", "batching": "whole", "term": "kl"}


def names() -> list:
  """The losses of this package (its modules not named with a leading underscore)."""
  return plugins.names(__name__)


def defaults(name: str) -> dict:
  """The DEFAULTS dict of loss `name`, read from its source (the module is not imported)."""
  return plugins.literal(plugins.source_path(__name__, name), "DEFAULTS")


def presets(name: str) -> dict:
  """The PRESETS dict of loss `name` ({} if it has none), read from its source."""
  return plugins.literals(plugins.source_path(__name__, name), "PRESETS").get("PRESETS", {})


def unset(name: str) -> dict:
  """train.<name> as configs/default.py builds it: DEFAULTS, with None for each key a preset
  can fill."""
  return plugins.defaults(__name__, name)


def section_name(name: str) -> str:
  """The config section of loss `name` (a dotted module's: its last name, or its SECTION)."""
  return plugins.section_name(__name__, name)


def later_keys(name: str) -> dict:
  """The dotted config keys of loss `name`'s section added after runs were saved, with what
  those runs trained with (workdir.check_resumable; the other losses' sections do not count)."""
  return {"train.loss": "gaussian"} | {f"train.{section_name(name)}.{key}": value
                                         for key, value in EARLIER.items()
                                         if key in defaults(name)}


def inactive_sections(section, prefix: str, outside=()) -> tuple:
  """The config prefixes of the loss sections that `section.loss` does not read (the
  package's, and those of the outside plug-ins `outside` that are losses)."""
  return tuple(f"{prefix}.{section_name(name)}." for name in names()
               + plugins.outside(__name__, outside) if name != section.loss)


def resolve(name: str, given: dict, sigma) -> dict:
  """The settings of loss `name` from its config section `given`: each set value, the rest
  from its preset at `sigma` or from DEFAULTS (the module docstring). ValueError naming a
  preset the loss does not know, or a σ it has no published setting for."""
  preset, table = given.get("preset", ""), presets(name)
  published = {}
  if preset:
    if preset not in table:
      raise ValueError(f"preset must be one of {sorted(table)} (or '' for none); got "
                       f"{preset!r}")
    if sigma is None or float(sigma) not in table[preset]:
      raise ValueError(f"preset={preset} has no published setting at σ = {sigma} (it has "
                       f"σ = {', '.join(str(s) for s in sorted(table[preset]))})")
    published = table[preset][float(sigma)]
  return {key: value if (value := given.get(key)) is not None else published.get(key, default)
          for key, default in defaults(name).items()}


@dataclasses.dataclass(frozen=True)
class Loss:
  """One loss with its resolved settings: hashable, so the jitted step takes it as a static
  argument (one compiled program per loss and settings)."""
  name: str
  settings: tuple  # sorted (key, value) pairs of the module's own settings
  batching: str = "whole"

  @property
  def module(self):
    return plugins.load(__name__, self.name)

  @property
  def updates_per_step(self) -> int:
    """SGD updates per training step: m with the references' batching, else 1."""
    return dict(self.settings).get("num_noise_vec", 1) if self.batching == "split" else 1

  @property
  def separate_passes(self) -> bool:
    return self.module.SEPARATE_PASSES

  def inputs(self, images, labels, sigma, keys, *, predict, epoch):
    return self.module.inputs(images, labels, sigma, keys, predict=predict, epoch=epoch,
                              **dict(self.settings))

  def objective(self, logits, labels, sigma, *, epoch):
    return self.module.objective(logits, labels, sigma, epoch=epoch, **dict(self.settings))


def of(name: str, settings: dict) -> Loss:
  """Loss `name` with resolved `settings` (its section's keys; `preset` is spent)."""
  own = {k: v for k, v in settings.items() if k not in ("preset", "batching")}
  return Loss(name, tuple(sorted(own.items())), settings.get("batching", "whole"))


def from_config(section, sigma) -> Loss:
  """The loss `section.loss` names (section: config.train or config.train.estimator), with its
  settings `section.<loss>` resolved at `sigma` (the run's train.sigma)."""
  name = section.loss
  return of(name, resolve(name, section[section_name(name)].to_dict(), sigma))


def resolved_config(config) -> ml_collections.ConfigDict:
  """A copy of `config` whose train.<loss> section (the one train.loss names) holds its
  resolved settings: what the run trains with, as config.json records it."""
  config = config.copy_and_resolve_references()
  t = config.train
  own = t[section_name(t.loss)]
  own.update(resolve(t.loss, own.to_dict(), t.sigma))
  return config


def validate(section, prefix: str, sigma, batch_size: int, defaults_of=unset,
             soft_targets: bool = False) -> list:
  """(ok, message) checks of the loss settings of `section` (config.train at `sigma`, or
  config.train.estimator with `soft_targets`): a known loss, a known preset with a setting at
  `sigma`, good values of its own settings, a batch that splits into its m steps, and no other
  loss's settings changed from `defaults_of(loss)` (an option given for another loss would be
  silently ignored)."""
  name = section.loss
  if name not in names() and "." not in name:
    return [(False, f"{prefix}.loss must be one of {names()} or a dotted module path; got "
                    f"{name!r}")]
  try:
    module, own = plugins.load(__name__, name), section_name(name)
  except (ImportError, ValueError) as error:
    return [(False, f"{prefix}.loss={name}: cannot import it: {error}")]
  if own not in section:
    return [(False, f"{prefix}.loss={name} has no section {prefix}.{own}: name the module "
                    f"to the config (--config=configs/x.py:{name})")]
  if soft_targets and not module.SOFT_TARGETS:
    trainable = [n for n in names() if plugins.load(__name__, n).SOFT_TARGETS]
    return [(False, f"{prefix}.loss={name} needs class labels; the σ-estimators train on soft "
                    f"labels: use one of {trainable}")]
  try:
    loss = of(name, resolve(name, section[own].to_dict(), sigma))
  except ValueError as error:
    return [(False, f"{prefix}.{own}.{error}")]
  checks = [(False, f"{prefix}.{own}.{message}")
            for message in module.validate(**dict(loss.settings))]
  if "batching" in section[own]:
    checks.append((loss.batching in BATCHINGS, f"{prefix}.{own}.batching must be one of "
                                               f"{BATCHINGS}; got {loss.batching!r}"))
    checks.append((batch_size % max(loss.updates_per_step, 1) == 0,
                   f"train.batch_size={batch_size} must be a multiple of {prefix}.{own}."
                   f"num_noise_vec={loss.updates_per_step} with batching='split' (B/m examples "
                   "per SGD step)"))
  for other in names():
    if other == name:
      continue
    changed = sorted(k for k, v in defaults_of(other).items() if section[other].get(k) != v)
    checks += [(False, f"{prefix}.{other}.{k} is set but {prefix}.loss is {name!r}: it would "
                       f"be ignored (set {prefix}.loss={other}, or leave {prefix}.{other} at "
                       "its defaults)")
               for k in changed]
  return checks
