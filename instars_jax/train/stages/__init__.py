"""The stages the training loop (loop.py) runs, one module each, behind one interface
(train/interface.py), found by name (plugins.py): adding a stage is one new file here, or a
module outside the package that declares FAMILY = "instars_jax.train.stages", named to the
config (--config=configs/x.py:my_pkg.my_stage; config.plugins). A stage module declares

  ORDER                 a literal number: where its stages run
  DEFAULTS, SECTION     optional: its settings, the section train.<SECTION> (plugins.py)
  CHECKS_OWN_RESUME     optional, True: its section may differ on resume from the saved
                        run's, because the stage compares the settings its checkpoints were
                        made with itself (a finished run can add the stage); otherwise a
                        changed setting refuses the resume (Workdir.check_resumable)
  OFF                   a literal dict, required of every stage module but the base: values
                        of its section's settings with which it adds no stage; an expert's
                        run (sigma_experts) trains the base model alone (`base_only`)
  validate(config)      ValueError naming a bad value of its settings
  stages(context)       the stages it adds for the run's config (none, one, or one per
                        σ-estimator)

  base               the base model: Gaussian augmentation, or Insta-RS Train (ORDER 0)
  sigma_experts      fixed-σ expert runs beside the base model (ORDER 0.5; train.experts)
  sigma_estimators   the σ-estimator, or the router's nodes (ORDER 1; train.estimator)
  finetune           the base model again at the σ the estimator picks (ORDER 2;
                     train.finetune)
  tune_threshold     the thresholded chain's τ chosen on held-out data (ORDER 3; train.tune)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from instars_jax import data, plugins
from instars_jax.storage import checkpoints
from instars_jax.storage.workdir import TrainingFacts, Workdir
from instars_jax.train import actions


@dataclasses.dataclass
class Context:
  """What every stage reads: the config, the run's directory and dataset, the device mesh,
  the stop request, the run's shapes, the metrics rows written so far, and the loop's entry
  point `train_run(config, workdir)` for a stage that trains runs of its own."""
  config: object
  workdir: Workdir
  dataset: data.Dataset
  sharder: object
  stop: checkpoints.StopRequest
  facts: TrainingFacts
  history: list
  train_run: Callable | None = None

  def check_stop(self, doing: str) -> None:
    """checkpoints.Interrupted where a stop was requested (between a stage's own units of
    work that keep nothing half done: `doing` says what a rerun starts again). Every host calls
    it at the same units, and with several they stop together where any was asked to, so none
    is left waiting in the next unit's collectives."""
    requested = self.stop is not None and self.stop.requested
    if jax.process_count() > 1:
      requested = bool(np.any(multihost_utils.process_allgather(np.asarray(requested))))
    if requested:
      raise checkpoints.Interrupted(f"stopped before {doing}: rerun the same command to "
                                    "resume there")

  @classmethod
  def start(cls, config, workdir: Workdir, dataset, sharder, stop,
            train_run: Callable | None = None) -> "Context":
    """Writes config.json and run.json (process 0) and keeps the metrics rows of the epochs
    that a resume does not redo."""
    steps_per_epoch = data.num_batches(len(dataset.train), config.train.batch_size, True)
    if steps_per_epoch == 0:
      raise ValueError(f"train.batch_size={config.train.batch_size} exceeds the "
                       f"{len(dataset.train)} training examples")
    facts = TrainingFacts(tuple(dataset.image_shape), dataset.num_classes, dataset.stats,
                  len(dataset.train), steps_per_epoch, dataset.name)
    done = workdir.checkpoints().latest_step() or 0
    path = workdir.metrics_path
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    history = [row for row in rows if row["step"] <= done]
    if jax.process_index() == 0:
      workdir.write_config(config)
      workdir.write_facts(facts)
      actions.write_rows(path, history)
    return cls(config, workdir, dataset, sharder, stop, facts, history, train_run)


BASE = "base"  # the stage module of the base model, which base_only keeps


def modules(config) -> list:
  """The stage modules of the package and the outside ones config.plugins names, in the order
  of their ORDER."""
  found = plugins.names(__name__) + plugins.outside(__name__, config.plugins)
  return sorted(found, key=lambda name: plugins.literal(plugins.source_path(__name__, name),
                                                        "ORDER"))


def validate(config) -> None:
  """Each stage module's validate(config): ValueError naming a bad stage setting."""
  for name in modules(config):
    plugins.load(__name__, name).validate(config)


def self_checked_sections(config) -> tuple:
  """The config prefixes (train.<section>.) of the stages that check their own settings on
  resume (CHECKS_OWN_RESUME)."""
  return tuple(f"train.{plugins.section_name(__name__, name)}." for name in modules(config)
               if plugins.literals(plugins.source_path(__name__, name),
                                   "CHECKS_OWN_RESUME").get("CHECKS_OWN_RESUME"))


def base_only(config):
  """A copy of `config` whose run trains the base model alone: every later stage module's OFF
  applied to its section. ValueError naming a later stage module that declares no OFF."""
  alone = config.copy_and_resolve_references()
  for name in modules(config):
    if name == BASE:
      continue
    off = plugins.literals(plugins.source_path(__name__, name), "OFF").get("OFF")
    if off is None:
      raise ValueError(f"the stage module {name} declares no OFF (its settings that add no "
                       "stage), so a run of the base model alone (train.experts) cannot "
                       "switch it off")
    section = alone.train[plugins.section_name(__name__, name)]
    unknown = sorted(set(off) - set(section))
    if unknown:
      raise ValueError(f"the stage module {name}'s OFF names settings its section lacks: "
                       f"{', '.join(unknown)}")
    section.update(off)
  return alone


def for_config(context: Context) -> list:
  """The stages `context.config` asks for, in the order of their modules' ORDER."""
  return [stage for name in modules(context.config)
          for stage in plugins.load(__name__, name).stages(context)]
