"""The package's layers, read from its source with ast (nothing is imported): certification
and the selector stand below training, and no modules import each other in a circle.

Only modules of instars_jax are followed: configs/default.py, which certification reads for
its defaults, gathers the plug-ins' sections on its own terms."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "instars_jax"


def module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
TRAINING = "instars_jax.train"
CERTIFICATION = ("instars_jax.certificates", "instars_jax.certification", "instars_jax.tune")
SELECTION = "instars_jax.selection"


def within(module: str, *packages: str) -> bool:
  return any(module == p or module.startswith(p + ".") for p in packages)


def imports(module: str, at_import_time: bool = False) -> set:
  """The modules of the package that `module` imports: every import statement, or with
  `at_import_time` those that run when it is imported (not those inside functions)."""
  tree = ast.parse(MODULES[module].read_text())
  package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]

  def statements(node):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        yield child
      if not (at_import_time and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                    ast.Lambda))):
        yield from statements(child)

  found = set()
  for statement in statements(tree):
    if isinstance(statement, ast.Import):
      found |= {alias.name for alias in statement.names}
      continue
    base = statement.module or ""
    if statement.level:  # relative: from the package, one level up per further dot
      up = package.split(".")[: len(package.split(".")) - statement.level + 1]
      base = ".".join(up + ([base] if base else []))
    # `from P import x`: the submodule P.x where there is one, else P itself.
    found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
              for alias in statement.names}
  return {m for m in found if m in MODULES}


def import_chain(root: str, forbidden) -> list | None:
  """The shortest chain of imports from `root` to a module `forbidden(module)` holds, or None."""
  parents, frontier = {root: None}, [root]
  while frontier:
    reached = []
    for module in frontier:
      if forbidden(module):
        chain = [module]
        while parents[chain[-1]] is not None:
          chain.append(parents[chain[-1]])
        return chain[::-1]
      for imported in sorted(imports(module)):
        if imported not in parents:
          parents[imported] = module
          reached.append(imported)
    frontier = reached
  return None


@pytest.mark.parametrize("root", sorted(m for m in MODULES if within(m, *CERTIFICATION, SELECTION)))
def test_certification_and_the_selector_import_nothing_of_training(root):
  chain = import_chain(root, lambda m: within(m, TRAINING))
  assert chain is None, " -> ".join(chain)


@pytest.mark.parametrize("root", sorted(m for m in MODULES if within(m, SELECTION)))
def test_the_selector_imports_nothing_of_certification(root):
  chain = import_chain(root, lambda m: m != root and within(m, *CERTIFICATION))
  assert chain is None, " -> ".join(chain)


def test_no_modules_import_each_other_in_a_circle():
  graph = {m: imports(m, at_import_time=True) for m in MODULES}
  done, path = set(), []

  def visit(module):
    if module in path:
      raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
    if module in done:
      return
    path.append(module)
    for imported in sorted(graph[module]):
      visit(imported)
    path.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)


def test_the_reader_sees_imports_of_every_form():
  # What the checks above rest on, on this package's own files.
  assert "instars_jax.selection.estimator" in imports("instars_jax.certificates.router")
  assert "instars_jax.selection.classifier" in imports("instars_jax.certification")
  assert imports("instars_jax.train.stages.finetune") >= {
      "instars_jax.selection.estimator", "instars_jax.train.stages.base", "instars_jax.data"}
  assert "instars_jax.train.state" in imports("instars_jax.train.stages.sigma_estimators")
  assert import_chain("instars_jax.certificates.thresholded", lambda m: within(m, SELECTION))[-1].startswith(
      SELECTION)
