"""What train.py and certify.py share: the --config / --workdir flags and clean failure.

Only absl and ml_collections load before the flags are parsed, so a bad flag is refused in a
fraction of a second; the library (JAX, orbax, ...) loads when the run starts.

train.py needs --config. certify.py and `python -m instars_jax.tune` read the trained run from
--workdir: its saved config, with the certification settings of the command line
(`--config.certify.*`, where the data lives, runtime settings; certification.owns); a
training setting there is refused. Given --config (a run made elsewhere), it must agree with
the saved run; --config=configs/default.py:my_pkg.my_kind only adds an outside plug-in's
section (plugins.py) to the run's.
"""

import contextlib
import importlib
import sys

from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

# The default only gives `--config.key=value` its types where --config is not given
# (certify.py: the run's saved config is completed by it).
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.py"
CONFIG = config_flags.DEFINE_config_file(
    "config", str(DEFAULT_CONFIG),
    "Path to a config file (configs/*.py); certify.py: the run's own by default.",
    lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, metrics, results.")
flags.mark_flags_as_required(["workdir"])

EXPECTED_ERRORS = (ValueError, FileNotFoundError)


def _fail(message, status: int = 2, prefix: str = "error: ") -> None:
  sys.stdout.flush()
  sys.stderr.write(f"{prefix}{message}\n")
  sys.stderr.flush()
  sys.exit(status)  # a normal shutdown: input worker processes are cleaned up quietly


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:  # a config file that raised: its first line and its error's
    lines = [line for line in str(error).splitlines() if line.strip()]
    _fail(f"{lines[0]} {lines[-1]}" if "Traceback" in str(error) else error)
  except (AttributeError, KeyError) as error:  # config_flags: --config.<key> that does not exist
    detail = str(error.args[0] if error.args else error).strip("'").replace("\\'", "'")
    _fail(f"unknown config key {detail.replace(chr(92) + 'n', ' ')}")


def _config(reads_run: bool):
  """The config the run gets: --config's, or (reads_run, without --config) the saved run's in
  --workdir with the command line's certification settings."""
  given = flags.FLAGS["config"].present
  if not given and not reads_run:
    _fail("--config is required: the config file of the run (configs/*.py)")
  try:
    CONFIG.value.distributed
  except OSError as error:  # config_flags reports a config file it could not load lazily
    _fail(f"cannot load --config: {str(error).strip().splitlines()[-1].strip()}")
  path = Path(config_flags.get_config_filename(flags.FLAGS["config"]).partition(":")[0])
  if not reads_run or (given and path.resolve() != DEFAULT_CONFIG):
    return CONFIG.value
  from instars_jax import certification
  try:
    return certification.run_config(WORKDIR.value,
                                    config_flags.get_override_values(flags.FLAGS["config"]),
                                    CONFIG.value.plugins)
  except (ValueError, FileNotFoundError) as error:
    _fail(error)


def main(target: str, reads_run: bool = False) -> None:
  """Parses flags, then imports `target` ("package.module:function") and calls
  function(config, workdir); `reads_run`: the config is the run's in --workdir (module doc).
  A bad flag, config value, path or dataset ends the process with one line naming the problem
  (exit status 2), not a traceback; a stop request that was checkpointed ends it with status
  143 (128 + SIGTERM); a lost host of a multi-host run ends the others with one line, status
  75 (parallel.HostWatch)."""

  def call_target(argv):
    if len(argv) > 1:
      _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    config = _config(reads_run)
    distributed = config.distributed
    if distributed:
      from instars_jax import parallel
      parallel.initialize_distributed()
    module, function = target.split(":")
    main_fn = getattr(importlib.import_module(module), function)
    from instars_jax.storage import checkpoints
    try:
      with parallel.lost_hosts_reported(WORKDIR.value) if distributed else contextlib.nullcontext():
        main_fn(config, WORKDIR.value)
    except EXPECTED_ERRORS as error:
      _fail(error)
    except checkpoints.Interrupted as stopped:  # SIGTERM/SIGINT, after a checkpoint
      _fail(stopped, status=128 + 15, prefix="")
    finally:
      if distributed:
        parallel.shutdown_distributed()

  app.run(call_target, flags_parser=_parse_flags)
