"""Device meshes: instances sharded over this host's devices, training batches over all of
them, and multi-host set-up."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
import threading
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


@functools.lru_cache(maxsize=None)
def local_data_mesh() -> Mesh:
  """A 1-D mesh named `data` over this host's devices."""
  return Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))


def pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
  """Pads axis 0 up to a multiple of `multiple` by repeating row 0 (a valid input to drop later)."""
  array = np.asarray(array)
  missing = -len(array) % multiple
  if missing == 0:
    return array
  return np.concatenate([array, np.repeat(array[:1], missing, axis=0)], axis=0)


def per_device(rows: int) -> int:
  """Rows each local device holds when `rows` instances are split by `map_instances`."""
  return -(-rows // jax.local_device_count())


def map_instances(local_fn, sharded: tuple, replicated: tuple = (), **static):
  """local_fn(*sharded, *replicated, **static) with the instances split over this host's
  devices: the `sharded` host arrays are padded on axis 0 to a multiple of the device count
  (`pad_rows`), each device gets its contiguous share, the `replicated` arguments are given
  whole to every device, and the outputs (split like the inputs) are cut back to the
  instances given. One compiled program per shape and `static` settings (hashable).

  A `static` value that is a jax.tree_util.Partial (a model with its weights, as
  train.state.logits_fn returns) travels as an argument instead: its weights are not baked
  into the program as constants, so one program serves every set of weights of a shape, and
  JAX's persistent compilation cache finds it again in the next run."""
  mesh = local_data_mesh()
  padded = tuple(pad_rows(a, mesh.devices.size) for a in sharded)
  traced = {k: v for k, v in static.items() if isinstance(v, jax.tree_util.Partial)}
  fixed = tuple(sorted((k, v) for k, v in static.items() if k not in traced))
  whole = local_replicas((tuple(replicated), traced), mesh)
  outputs = _mapped(padded, *whole, local_fn=local_fn, static=fixed, mesh=mesh)
  return jax.tree_util.tree_map(lambda a: a[: len(sharded[0])], outputs)


def local_replicas(tree, mesh: Mesh):
  """`tree` replicated on every device of `mesh` (this host's): arrays already there stay,
  others are copied there; a global array replicated across hosts gives its local copy."""
  target = NamedSharding(mesh, PartitionSpec())

  def place(leaf):
    if isinstance(leaf, jax.Array):
      if leaf.sharding == target:
        return leaf
      if not leaf.is_fully_addressable:
        leaf = leaf.addressable_data(0)
    return jax.device_put(leaf, target)

  return jax.tree_util.tree_map(place, tree)


@functools.partial(jax.jit, static_argnames=("local_fn", "static", "mesh"))
def _mapped(sharded, replicated, traced, *, local_fn, static, mesh):
  local = functools.partial(local_fn, **dict(static))
  return jax.shard_map(lambda s, r, t: local(*s, *r, **t), mesh=mesh,
                       in_specs=(PartitionSpec(DATA_AXIS), PartitionSpec(), PartitionSpec()),
                       out_specs=PartitionSpec(DATA_AXIS), check_vma=False)(
                           sharded, replicated, traced)


class Sharder:
  """Puts host-local batches onto the data mesh of every device as global arrays (one host
  or many): training is data parallel, and jit inserts the gradient reductions."""

  def __init__(self):
    self.mesh = Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
    self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())

  @property
  def local_devices(self) -> int:
    return jax.local_device_count()

  def batch(self, local: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items()}

  def replicate(self, tree):
    return jax.device_put(tree, self.replicated)


# The exit status of a host whose peer was lost (sysexits' EX_TEMPFAIL: rerun to resume).
LOST_HOST_STATUS = 75
_LEFT = "instars_jax/left"  # host k sets <_LEFT>/k to "finished" or "failed" as it leaves


def initialize_distributed() -> None:
  """Joins JAX's multi-controller runtime; a no-op when already joined.

  On Cloud TPU, SLURM, Open MPI and Kubernetes JAX finds the coordinator and this process's
  rank by itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (and, on CPU hosts,
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo). JAX_HEARTBEAT_TIMEOUT_SECONDS (default 100,
  JAX's) is how long a host may go without a heartbeat before the others count it lost.

  A lost host ends the others within that time with one line naming it (`HostWatch`), where
  JAX's own fate-sharing would abort them with a fatal-error dump: the runtime joins with
  `jax_enable_recoverability`, and `shutdown_distributed` (also run at exit) replaces the
  shutdown barrier that recoverability drops. Losing host 0, which runs JAX's coordination
  service, still ends the others at once with JAX's own message: its client aborts in C++
  when the service goes away, before Python can run.
  """
  global _watch
  if jax.distributed.is_initialized():
    return
  explicit = {arg: int(os.environ[name]) for arg, name in
              (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"),
               ("heartbeat_timeout_seconds", "JAX_HEARTBEAT_TIMEOUT_SECONDS"))
              if name in os.environ}
  jax.config.update("jax_enable_recoverability", True)
  jax.distributed.initialize(**explicit)
  from jax._src import distributed  # the client: JAX has no public handle on it
  _watch = HostWatch(distributed.global_state.client,
                     explicit.get("heartbeat_timeout_seconds", 100))
  atexit.register(shutdown_distributed)  # runs before JAX's own clean-up (registered earlier)


class HostWatch:
  """Ends this process when another host is lost, with one line naming it and the step a
  rerun resumes from (exit status LOST_HOST_STATUS): JAX's fate-sharing, said in one line.

  A thread asks JAX's coordination service which hosts are alive (`get_live_nodes`) about
  once a second. The service answers every host at once (the call is a barrier among live
  hosts) when each has asked or was declared dead after `heartbeat_timeout` seconds without
  a heartbeat, so every survivor learns of a loss within that time, and all learn the same.
  A host that left has said how (`_LEFT`): one that finished was not lost, and one that
  failed ends the others that do not stop within `heartbeat_timeout` themselves (a failure
  that every host meets ends each with its own message).
  """

  ROUND_SECONDS = 1.0

  def __init__(self, client, heartbeat_timeout: int):
    self.client, self.heartbeat_timeout = client, heartbeat_timeout
    self.hosts = list(range(jax.process_count()))
    self.workdir = None  # the run's, for the line (`lost_hosts_reported`)
    self.failed = False  # this host's run raised
    self.leaving = False
    self.rounds = 0
    self.answered = threading.Condition()
    self.thread = threading.Thread(target=self._watch, name="host-watch", daemon=True)
    self.thread.start()

  def _watch(self) -> None:
    me, failed_since = jax.process_index(), {}
    while True:
      try:
        live = self.client.get_live_nodes(self.hosts)
      except Exception:  # noqa: BLE001 (the client left while host 0 still waited for others)
        if self.leaving:
          return
        raise
      for host in (k for k in self.hosts if k not in live):
        how = self._how_left(host)
        if how is None:
          self._end(f"host {host} of {len(self.hosts)} was lost (no heartbeat for "
                    f"{self.heartbeat_timeout} s)")
        waited = time.monotonic() - failed_since.setdefault(host, time.monotonic())
        if how == "failed" and not self.leaving and waited >= self.heartbeat_timeout:
          self._end(f"host {host} of {len(self.hosts)} stopped with an error (see its output)")
      with self.answered:
        self.rounds += 1
        self.answered.notify_all()
      if self.leaving and (me != 0 or list(live) == [me]):  # host 0 serves until all left
        return
      time.sleep(self.ROUND_SECONDS)

  def _how_left(self, host: int) -> str | None:
    try:
      return self.client.key_value_try_get(f"{_LEFT}/{host}")
    except Exception:  # noqa: BLE001 (jaxlib raises its runtime error for a missing key)
      return None

  def _end(self, what: str) -> None:
    from instars_jax.storage import checkpoints
    step = checkpoints.latest_step_saved(self.workdir) if self.workdir else None
    rerun = "rerun the same command on every host"
    if step is not None:
      then = f"the run's last checkpoint is step {step} in {self.workdir}: {rerun} to resume"
    elif self.workdir:
      then = f"the run in {self.workdir} has no checkpoint yet: {rerun} to start it again"
    else:
      then = f"{rerun} to resume"
    sys.stdout.flush()
    sys.stderr.write(f"error: {what}; {then}\n")
    sys.stderr.flush()
    os._exit(LOST_HOST_STATUS)  # the main thread may be stuck in a collective with the lost host

  def verdict(self, timeout: float) -> None:
    """Returns after two more answers from the service (the first may predate a loss), or
    after `timeout` seconds; a loss ends the process first."""
    with self.answered:
      target = self.rounds + 2
      self.answered.wait_for(lambda: self.rounds >= target, timeout)

  def leave(self, timeout: float) -> None:
    """Says how this host leaves and stops watching: at once on hosts other than 0, and on
    host 0 once every other host has left (at most `timeout` seconds)."""
    how = "failed" if self.failed else "finished"
    self.client.key_value_set(f"{_LEFT}/{jax.process_index()}", how, allow_overwrite=True)
    self.leaving = True
    self.thread.join(timeout)


_watch: HostWatch | None = None


@contextlib.contextmanager
def lost_hosts_reported(workdir):
  """Names `workdir` in the lost-host line, and lets a failure inside the block (a collective
  whose peer died raises at once on CPU) wait up to the heartbeat timeout for the verdict: a
  lost host ends the process with its line instead of the failure's. A failure marks this
  host failed for the others (`HostWatch`)."""
  _watch.workdir = workdir
  try:
    yield
  except BaseException:
    _watch.verdict(timeout=_watch.heartbeat_timeout + 2 * HostWatch.ROUND_SECONDS)
    _watch.failed = True
    raise


def shutdown_distributed(timeout: float = 300) -> None:
  """Leaves JAX's multi-controller runtime: host 0, which runs the coordination service,
  leaves once every other host has left (up to `timeout` seconds, JAX's shutdown timeout);
  the others leave at once. A no-op when not joined."""
  global _watch
  if _watch is None or not jax.distributed.is_initialized():
    return
  _watch.leave(timeout)
  _watch = None
  jax.distributed.shutdown()
