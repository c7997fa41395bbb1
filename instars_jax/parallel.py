"""Device meshes: instances sharded over this host's devices, training batches over all of
them, and multi-host set-up."""

from __future__ import annotations

import functools
import os

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


def initialize_distributed() -> None:
  """Joins JAX's multi-controller runtime; a no-op when already joined.

  On Cloud TPU, SLURM, Open MPI and Kubernetes JAX finds the coordinator and this process's
  rank by itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (and, on CPU hosts,
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo).
  """
  if jax.distributed.is_initialized():
    return
  explicit = {arg: int(os.environ[name]) for arg, name in
              (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
              if name in os.environ}
  jax.distributed.initialize(**explicit)
