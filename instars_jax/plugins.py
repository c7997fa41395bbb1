"""Plug-ins found by name (big_vision's pattern), one contract for every family.

A family is a package whose modules are its plug-ins (FAMILIES), each named by its file; a
dotted module path names a plug-in that lives outside the package. Every plug-in declares its
settings the same way, as module-level literals read from the source without importing the
module (so configs/default.py gathers every section before JAX loads and flags are parsed):

  DEFAULTS   a dict: its config section <parent>.<SECTION> (FAMILIES gives the parent) with
             its defaults, passed to it as keyword arguments or read from the config
  SECTION    optional: the section's name (default: the module's last name); plug-ins that
             share a section must agree on the defaults of the keys they share
  PRESETS    optional: {preset: {σ: {key: value}}}; a key a preset fills stays unset (None)
             in the config until the run resolves it, so an explicit value always wins
  FAMILY     an outside module only: the package of the family it belongs to

An outside plug-in with a section is named where the config is built:
`--config=configs/x.py:my_pkg.my_loss,my_pkg.my_stage` (configs/default.get_config's
argument), which records the modules in config.plugins and adds their sections; an outside
stage also runs, in its ORDER. Each family's docstring states the rest of its interface and its
validate hook."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import ml_collections
from ml_collections import config_dict

STAGES, LOSSES = "instars_jax.train.stages", "instars_jax.train.losses"
# Each family's package: the config section its plug-ins' sections live in.
FAMILIES = {
    "instars_jax.data": "sources",
    LOSSES: "train",
    STAGES: "train",
    "instars_jax.certificates": "certify",
}


def package_dirs(package: str) -> list:
  """The folders of `package`, found without running its __init__ (the live __path__ once it
  is imported)."""
  return list(importlib.util.find_spec(package).submodule_search_locations)


def names(package: str) -> list:
  """The plug-ins of `package`: its modules not named with a leading underscore, sorted."""
  return sorted({m.name for m in pkgutil.iter_modules(package_dirs(package))
                 if not m.name.startswith("_")})


def source_path(package: str, name: str) -> Path:
  """The source file of the plug-in `name` of `package`, or of the dotted module `name`."""
  if "." in name:
    try:
      spec = importlib.util.find_spec(name)
    except ImportError:  # its package is missing
      spec = None
    if spec is None or spec.origin is None:
      raise ValueError(f"cannot find the module {name!r}")
    return Path(spec.origin)
  for folder in package_dirs(package):
    path = Path(folder) / f"{name}.py"
    if path.exists():
      return path
  raise ValueError(f"{package} has no plug-in {name!r}; known: {names(package)}")


def literals(path: Path, *variables: str) -> dict:
  """{variable: value} of the module-level literal assignments `variable = ...` among
  `variables` in the source at `path` (the ones it lacks are left out)."""
  stat = Path(path).stat()
  assigned = _assignments(str(path), stat.st_mtime_ns, stat.st_size)
  return {name: ast.literal_eval(assigned[name]) for name in variables if name in assigned}


@functools.lru_cache(maxsize=None)
def _assignments(path: str, mtime_ns: int, size: int) -> dict:
  """{variable: value node} of the module-level single-target assignments in the source at
  `path`, parsed once per version of the file (a config is built several times a run)."""
  del mtime_ns, size  # the cache key: an edited file is parsed again
  found = {}
  for node in ast.parse(Path(path).read_text()).body:
    targets = [getattr(target, "id", None) for target in getattr(node, "targets", ())]
    if isinstance(node, ast.Assign) and len(targets) == 1 and targets[0]:
      found[targets[0]] = node.value
  return found


def literal(path: Path, variable: str):
  """The value of the module-level literal `variable = ...` in the source at `path`."""
  found = literals(path, variable)
  if variable not in found:
    raise ValueError(f"{Path(path).name} has no literal {variable}")
  return found[variable]


def section_name(package: str, name: str) -> str:
  """The config section of the plug-in `name` of `package` (or of the dotted module `name`)."""
  path = source_path(package, name)
  return literals(path, "SECTION").get("SECTION", name.rpartition(".")[2])


def defaults(package: str, name: str) -> dict:
  """The section of plug-in `name` as a config starts it: its DEFAULTS ({} without), with None
  for each key one of its PRESETS fills (unset until the run resolves it)."""
  declared = literals(source_path(package, name), "DEFAULTS", "PRESETS")
  filled = {key for by_sigma in declared.get("PRESETS", {}).values()
            for values in by_sigma.values() for key in values}
  return {key: None if key in filled else value
          for key, value in declared.get("DEFAULTS", {}).items()}


def outside(package: str, modules) -> list:
  """The dotted modules among `modules` that declare themselves plug-ins of `package`;
  ValueError naming one that declares no family FAMILIES knows."""
  found = []
  for module in modules:
    family = literals(source_path(package, module), "FAMILY").get("FAMILY")
    if family not in FAMILIES:
      raise ValueError(f"the plug-in {module!r} must declare FAMILY, one of {list(FAMILIES)}; "
                       f"got {family!r}")
    found += [module] * (family == package)
  return found


def add_sections(config, modules=()) -> None:
  """Every family's sections under its parent in `config`: the DEFAULTS of the plug-ins of
  each package and of the outside `modules` (which config.plugins records) that declare
  them, each under its `section_name` (plug-ins sharing a section add their keys to it, and
  must agree on the defaults of the keys they share), each unset key a placeholder of its
  DEFAULTS value's type (so that a flag sets it). ValueError naming a section that would
  replace a setting the config already has (another family's section, or its own keys)."""
  config.plugins = tuple(modules)
  for package, parent in FAMILIES.items():
    for section, keys in _typed_sections(package, modules).items():
      if section in config[parent]:
        raise ValueError(f"a plug-in of {package} declares the section {parent}.{section}, "
                         "which the config already has: name its SECTION otherwise")
      config[parent][section] = ml_collections.ConfigDict({
          key: config_dict.placeholder(kind) if value is None else value
          for key, (value, kind) in keys.items()})


def _typed_sections(package: str, modules) -> dict:
  """{section: {key: (default, type of its DEFAULTS value)}} of the plug-ins of `package` and
  of the outside `modules` of its family that declare DEFAULTS (add_sections)."""
  found = {}
  for name in names(package) + outside(package, modules):
    path = source_path(package, name)
    declared = literals(path, "DEFAULTS")
    if "DEFAULTS" not in declared:
      continue
    section = found.setdefault(section_name(package, name), {})
    for key, value in defaults(package, name).items():
      known = section.setdefault(key, (value, type(declared["DEFAULTS"][key])))
      if known[0] != value:
        raise ValueError(f"{path.name} declares another default for {section}.{key}")
  return found


def stage_loss_section(stage: str, loss: str) -> dict:
  """The settings of `loss` (a loss plug-in) for the training stage `stage` that trains with a
  loss of its own (its section's train.<stage section>.<loss section>): the loss's DEFAULTS
  without a preset, updated by the stage's literal LOSS_DEFAULTS for that loss."""
  own = literals(source_path(STAGES, stage), "LOSS_DEFAULTS").get("LOSS_DEFAULTS", {})
  values = literals(source_path(LOSSES, loss), "DEFAULTS").get("DEFAULTS", {})
  return {k: v for k, v in values.items() if k != "preset"} | own.get(loss, {})


def raise_first_failure(checks) -> None:
  """The validate hooks' convention for lists of (ok, message) checks: ValueError with the
  message of the first that failed."""
  for ok, message in checks:
    if not ok:
      raise ValueError(message)


def load(package: str, name: str):
  """The plug-in module `name` of `package`, or the dotted module `name`."""
  return importlib.import_module(name if "." in name else f"{package}.{name}")
