"""What train.py and certify.py share: the --config / --workdir flags and clean failure.

Only absl and ml_collections load before the flags are parsed, so a bad flag is refused in a
fraction of a second; the library (JAX, orbax, ...) loads when the run starts.
"""

import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                         lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, metrics, results.")
flags.mark_flags_as_required(["config", "workdir"])

EXPECTED_ERRORS = (ValueError, FileNotFoundError)


def _fail(message, status: int = 2, prefix: str = "error: ") -> None:
  sys.stdout.flush()
  sys.stderr.write(f"{prefix}{message}\n")
  sys.stderr.flush()
  sys.exit(status)  # a normal shutdown: input worker processes are cleaned up quietly


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    _fail(error)
  except (AttributeError, KeyError) as error:  # config_flags: --config.<key> that does not exist
    detail = str(error.args[0] if error.args else error).strip("'").replace("\\'", "'")
    _fail(f"unknown config key {detail.replace(chr(92) + 'n', ' ')}")


def main(target: str) -> None:
  """Parses flags, then imports `target` ("package.module:function") and calls
  function(config, workdir). A bad flag, config value, path or dataset ends the process with
  one line naming the problem (exit status 2), not a traceback; a stop request that was
  checkpointed ends it with status 143 (128 + SIGTERM)."""

  def call_target(argv):
    if len(argv) > 1:
      _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    config = CONFIG.value
    try:
      distributed = config.distributed
    except OSError as error:  # config_flags reports a config file it could not load lazily
      _fail(f"cannot load --config: {str(error).strip().splitlines()[-1].strip()}")
    if distributed:
      from instars_jax import parallel
      parallel.initialize_distributed()
    module, function = target.split(":")
    main_fn = getattr(importlib.import_module(module), function)
    from instars_jax.storage import checkpoints
    try:
      main_fn(config, WORKDIR.value)
    except EXPECTED_ERRORS as error:
      _fail(error)
    except checkpoints.Interrupted as stopped:  # SIGTERM/SIGINT, after a checkpoint
      _fail(stopped, status=128 + 15, prefix="")
    finally:
      if distributed:
        import jax
        jax.distributed.shutdown()

  app.run(call_target, flags_parser=_parse_flags)
