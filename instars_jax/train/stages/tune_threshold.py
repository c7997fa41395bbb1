"""The thresholded chain's τ chosen on held-out training examples, as the run's last stage
(train.tune.threshold): `python -m instars_jax.tune`'s sweep (tune.py) over
certify.thresholded.sweep with the config's certification settings (certify.n, certify.alpha,
certify.skip, certify.experts, the estimator's β share and n), on the examples that
train.holdout kept out of every earlier stage, never on test images.

The τ of the largest held-out ACR is written to WORKDIR/tuned.json (storage/workdir.py), which
certify.py --workdir=DIR reads as the run's certify.thresholded.threshold, under the command
line's. The file also keeps what the choice was made from (`inputs`): a rerun with the same
inputs finds it done; one with others tunes again. A stop or a kill inside the sweep loses at
most its sampling call in flight: the rerun goes on from the calls kept (tune.py).
"""

from __future__ import annotations

import json

import jax

from instars_jax import tune
from instars_jax.storage.files import write_json_atomic
from instars_jax.train.interface import WithoutSteps

ORDER = 3
SECTION = "tune"
OFF = {"threshold": False}  # adds no stage (stages/__init__.py)
DEFAULTS = {
    # After the router's nodes: choose certify.thresholded.threshold on the held-out examples.
    "threshold": False,
}


def validate(config) -> None:
  if not config.train.tune.threshold:
    return
  e = config.train.estimator
  if not (e.epochs and e.router) or config.train.holdout <= 0:
    raise ValueError("train.tune.threshold tunes the thresholded chain's τ on held-out "
                     "examples: it needs the router's nodes (train.estimator.epochs > 0, "
                     "train.estimator.router=True) and train.holdout > 0")
  tune.validate(config)


def stages(context) -> list:
  return [TuneStage(context)] if context.config.train.tune.threshold else []


def tuning_inputs(config) -> dict:
  """The settings the choice of τ depends on beyond the trained models."""
  c = config.certify
  return {"sweep": list(c.thresholded.sweep), "shared_samples": c.thresholded.shared_samples,
          "n": c.n, "n0": c.n0, "alpha": c.alpha,
          "skip": c.skip, "max": c.max, "experts": c.experts,
          "estimator": json.loads(c.estimator.to_json())}


class TuneStage(WithoutSteps):
  name = "tune"

  def start(self, base_state, offset: int):
    del offset
    c = self.context
    inputs, path = tuning_inputs(c.config), c.workdir.tuned_path
    if path.exists() and json.loads(path.read_text())["inputs"] == inputs:
      return base_state, self.first_step
    summaries = tune.tune_thresholds(c.config, c.workdir.path, c.check_stop)
    best = tune.best_threshold(summaries)
    if jax.process_index() == 0:
      write_json_atomic(path, {"settings": {"certify.thresholded.threshold": best},
                               "inputs": inputs, "held_out": summaries[best]})
    return base_state, self.first_step
