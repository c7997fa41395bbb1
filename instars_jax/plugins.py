"""Plug-ins found by name (big_vision's pattern): a package's modules are its plug-ins, each
naming itself by its file, and a literal dict in each (its config section's defaults) is read
from the source without importing the module, so that configs/default.py can gather every
section before JAX loads and flags are parsed. A dotted module path names a plug-in that lives
outside the package."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path


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
    spec = importlib.util.find_spec(name)
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
  found = {}
  for node in ast.parse(Path(path).read_text()).body:
    targets = [getattr(target, "id", None) for target in getattr(node, "targets", ())]
    if isinstance(node, ast.Assign) and len(targets) == 1 and targets[0] in variables:
      found[targets[0]] = ast.literal_eval(node.value)
  return found


def literal(path: Path, variable: str):
  """The value of the module-level literal `variable = ...` in the source at `path`."""
  found = literals(path, variable)
  if variable not in found:
    raise ValueError(f"{Path(path).name} has no literal {variable}")
  return found[variable]


def sections(package: str) -> dict:
  """{section: defaults} of the plug-ins of `package` that declare a literal DEFAULTS, each
  under its literal SECTION (default: its own name). Plug-ins sharing a section add their
  keys to it, and must agree on the defaults of the keys they share."""
  found = {}
  for name in names(package):
    path = source_path(package, name)
    declared = literals(path, "DEFAULTS", "SECTION")
    if "DEFAULTS" not in declared:
      continue
    section = found.setdefault(declared.get("SECTION", name), {})
    for key, value in declared["DEFAULTS"].items():
      if section.setdefault(key, value) != value:
        raise ValueError(f"{path.name} declares another default for "
                         f"{declared.get('SECTION', name)}.{key}")
  return found


def load(package: str, name: str):
  """The plug-in module `name` of `package`, or the dotted module `name`."""
  return importlib.import_module(name if "." in name else f"{package}.{name}")
