"""Device meshes, padding to the device count, and multi-host set-up."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

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


def shard_instances(fn, mesh: Mesh, num_sharded: int, num_replicated: int = 0):
  """shard_map `fn` so its first `num_sharded` arguments split on axis 0 over `mesh`.

  The trailing `num_replicated` arguments are given whole to every device; the
  outputs are split like the inputs.
  """
  in_specs = (PartitionSpec(DATA_AXIS),) * num_sharded + (PartitionSpec(),) * num_replicated
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec(DATA_AXIS),
                       check_vma=False)


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
