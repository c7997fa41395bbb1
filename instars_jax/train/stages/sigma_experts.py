"""σ experts trained inside the run (train.experts): one fixed-σ classifier per σ of
`train.experts.sigmas`, each a run of its own in WORKDIR/experts/sigma_<σ>, trained after the
base model and before the σ-estimators that they label (selection/experts.py: DualRS's
experts, one base classifier behind each grid σ).

Each expert's config is this run's with train.insta = False, train.sigma = σ and every later
stage switched off by its module's OFF (stages.base_only): the same data, held-out
share, seed, model, loss and epochs, so it holds out the same examples; certify.py
--workdir=WORKDIR/experts/sigma_<σ> certifies it alone at σ (certify.sigma_mode = fixed). It is trained by the
loop's own entry point and resumes from its own checkpoints; a stop inside it checkpoints it
and stops the whole run, which a rerun resumes there.

`train.estimator.experts` and `certify.experts` name the experts with `{workdir}` standing for
this run's directory, for example "{workdir}/experts/sigma_0.5,{workdir}", where the base
model, a fixed-σ run at the grid's top σ, is the top expert (configs/fashion_mnist_sound.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from instars_jax.train.stages import base_only
from instars_jax.train.interface import WithoutSteps

ORDER = 0.5
SECTION = "experts"
OFF = {"sigmas": ()}  # adds no stage (stages/__init__.py)
DEFAULTS = {
    # σ of the fixed-σ experts to train in WORKDIR/experts/sigma_<σ> (): none.
    "sigmas": (),
}
EXPERTS_DIR = "experts"


def expert_dir(workdir, sigma: float) -> Path:
  return Path(workdir) / EXPERTS_DIR / f"sigma_{float(sigma):g}"


def expert_config(config, sigma: float):
  """The config of the expert at `sigma` (module doc)."""
  expert = base_only(config)
  expert.train.update(insta=False, sigma=float(sigma))
  expert.certify.update(sigma_mode="fixed", experts="")  # certify.py certifies it at its σ
  return expert


def validate(config) -> None:
  sigmas = tuple(float(s) for s in config.train.experts.sigmas)
  if not all(np.isfinite(s) and s > 0 for s in sigmas) or len(set(sigmas)) < len(sigmas):
    raise ValueError(f"train.experts.sigmas must list distinct σ > 0; got {sigmas}")
  if sigmas:
    base_only(config)  # every later stage can be switched off in the experts' runs
  if not config.train.insta and np.float32(config.train.sigma) in np.float32(sigmas):
    raise ValueError(f"train.experts.sigmas lists σ = {config.train.sigma:g}, the base model's "
                     "own train.sigma: name the base run ({workdir}) as that expert instead")


def stages(context) -> list:
  return [ExpertsStage(context)] if context.config.train.experts.sigmas else []


class ExpertsStage(WithoutSteps):
  """Trains (or resumes, or finds finished) each expert run in turn."""
  name = "experts"

  def start(self, base_state, offset: int):
    del offset
    c = self.context
    for sigma in c.config.train.experts.sigmas:
      c.check_stop(f"the σ = {sigma:g} expert")
      c.train_run(expert_config(c.config, sigma), expert_dir(c.workdir.path, sigma))
    return base_state, self.first_step
