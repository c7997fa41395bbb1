"""σ experts: one trained classifier per σ of the grid, in place of the one base model.

Dual Randomized Smoothing (Sun, Mao & Vechev, ICLR 2026, Theorem 4.2) certifies
G(x) = g^{(k(x))}_{σ_{k(x)}}(x) with a different base classifier f_k behind each grid σ_k:
the selector's certificate fixes k on a ball, and the class test then runs CERTIFY of f_k at
σ_k, a fixed smoothed classifier there. So each sound kind that certifies on the grid keeps
its guarantee when the class test at σ_k uses f_k, and the proof in each kind's module reads
the same with g_{σ_k} the smoothed f_k.

`certify.experts` names one workdir per grid σ (smallest first, commas between), for example
the Cohen et al. models trained with `--config.train.insta=False --config.train.sigma=S`
("{workdir}" stands for the directory of the run that names them: the experts a run trains
itself, train/stages/sigma_experts.py), and `train.estimator.experts` the ones whose radius profiles label the σ-estimators (the classifiers
that certification will deploy). Each must be a finished fixed-σ run at its grid σ on the
same dataset, image shape, classes and model family as the run that uses it; anything else
is refused before any sampling or training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ml_collections.config_flags import config_path

from instars_jax.selection import classifier
from instars_jax.selection.estimator import grid_of
from instars_jax.storage.workdir import Workdir


CERTIFY_SETTING, LABELS_SETTING = "certify.experts", "train.estimator.experts"
RUN_DIR = "{workdir}"  # in a setting: the directory of the run that names the experts


def workdirs(config, setting: str = CERTIFY_SETTING, workdir=None) -> tuple[str, ...]:
  """The workdirs `setting` (certify.experts or train.estimator.experts) names, in grid order
  ((): no experts), with RUN_DIR replaced by `workdir` where it is given."""
  named = config_path.get_value(setting, config)
  if workdir is not None:
    named = named.replace(RUN_DIR, str(workdir))
  return tuple(part.strip() for part in named.split(",") if part.strip())


def check(config, workdir, needed, on_holdout: bool = False,
          setting: str = CERTIFY_SETTING) -> list[dict]:
  """[{sigma, workdir, step}] of the experts `setting` of `config` names, each checked against
  the run in `workdir` and its grid σ, and covering the σ `needed` by the certificate kind
  (its `sigmas(config)`; None: σ found by a search, which experts cannot serve);
  `on_holdout`: the experts will see the held-out examples, so they must have held out the
  same ones (train.holdout and seed). ValueError (a mismatch) or FileNotFoundError (a missing
  run or checkpoint) naming the expert otherwise."""
  paths, grid = workdirs(config, setting, Path(workdir)), grid_of(config)
  if not paths:
    return []
  if len(paths) != len(grid):
    raise ValueError(f"{setting} names {len(paths)} workdirs; train.table.grid={grid} "
                     f"needs one per σ, smallest first")
  if needed is None:
    raise ValueError(f"{setting} needs a certificate on the grid; this one searches σ over "
                     "an interval")
  off_grid = sorted(set(np.float32(needed)) - set(np.float32(grid)))
  if off_grid:
    raise ValueError(f"{setting} covers train.table.grid={grid}; the certificate also "
                     f"needs σ = {', '.join(f'{s:g}' for s in off_grid)}")
  base = Workdir(workdir).read_facts()
  found = []
  for sigma, path in zip(grid, paths):
    expert = Workdir(path)
    where = f"{setting}: {path}"
    if not expert.config_path.exists():
      raise FileNotFoundError(f"{where} holds no trained run (no {expert.config_path.name})")
    trained, info = expert.read_config(), expert.read_facts()
    mismatches = [
        (trained.dataset, config.dataset, "dataset"),
        (trained.model.name, config.model.name, "model.name"),
        (tuple(info.image_shape), tuple(base.image_shape), "image shape"),
        (info.num_classes, base.num_classes, "classes"),
    ]
    for theirs, ours, what in mismatches:
      if theirs != ours:
        raise ValueError(f"{where} was trained with {what} {theirs}, not {ours}")
    if on_holdout and (trained.train.get("holdout", 0.0), trained.seed) != (
        config.train.holdout, config.seed):
      raise ValueError(f"{where} trained on other examples than the held-out ones this run "
                       f"keeps out (train.holdout={trained.train.get('holdout', 0.0)}, seed="
                       f"{trained.seed}; this run: {config.train.holdout}, {config.seed})")
    if trained.train.insta or np.float32(trained.train.sigma) != np.float32(sigma):
      raise ValueError(f"{where} is not a fixed-σ model at grid σ = {sigma} (train.insta="
                       f"{trained.train.insta}, train.sigma={trained.train.sigma})")
    step = expert.checkpoints().latest_step()
    if step is None:
      raise FileNotFoundError(f"{where} has no checkpoint")
    found.append({"sigma": sigma, "workdir": str(Path(path).resolve()), "step": int(step)})
  return found


def load(checked: list[dict]) -> dict:
  """{float32 σ: x -> logits} of the experts `check` returned ({}: none), each at the
  checkpoint step it records."""
  return {np.float32(e["sigma"]): classifier.load(e["workdir"], e["step"]) for e in checked}
