"""One of two processes joined with jax.distributed (as in multihost_probe.py), whose run
inside `parallel.lost_hosts_reported(argv[2])` raises a ValueError on the hosts listed in
argv[1] ("1": host 1 only, "0,1": both), printed as the host's own error line, while a host
that does not fail waits, as one stuck in a collective with the failed host would."""

import sys
import time

from instars_jax import parallel

parallel.initialize_distributed()

import jax  # noqa: E402

if __name__ == "__main__":
  failing = {int(k) for k in sys.argv[1].split(",")}
  try:
    with parallel.lost_hosts_reported(sys.argv[2]):
      if jax.process_index() in failing:
        raise ValueError(f"host {jax.process_index()} failed")
      time.sleep(600)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
  parallel.shutdown_distributed()
