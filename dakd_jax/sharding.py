"""Device mesh, shardings and the host-batch-to-global-array step.

Sits between the Grain pipeline and the compiled step: Grain yields this process's slice of the
global batch as NumPy arrays; `host_to_global` turns the whole batch pytree into global
`jax.Array`s sharded on the mesh's "data" axis in one call. Parameters, optimiser state and
centre memories use `replicated(mesh)`; batches use `data_sharding(mesh)`.
"""
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """Returns a 1-D mesh with the single axis "data" over the devices.

  Args:
    num_devices: how many of `jax.devices()` (all processes) to use, the first ones in order;
      None = all of them.

  Returns:
    A `Mesh` of shape (num_devices,) with axis name "data" and `AxisType.Auto` (classic
    data-parallel sharding propagation; `jax.make_mesh` would default to Explicit).

  Raises:
    ValueError: `num_devices` is not in 1..len(jax.devices()).
  """
  devices = jax.devices()
  count = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= count <= len(devices):
    raise ValueError(
        f"num_devices={num_devices} but {len(devices)} devices are visible; "
        f"pass a value in 1..{len(devices)} or None for all of them")
  return Mesh(np.array(devices[:count]), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Returns the sharding of a batch: leading axis split over "data", the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Returns the sharding of a value held whole on every device (parameters, memories)."""
  return NamedSharding(mesh, P())


def check_batch_divides(global_batch: int, num_devices: int, field_name: str) -> None:
  """Checks that a global batch splits evenly across the devices.

  Args:
    global_batch: images per step over all processes.
    num_devices: devices on the mesh's "data" axis.
    field_name: the config field(s) that set the batch, named in the error.

  Raises:
    ValueError: `global_batch` is not a positive multiple of `num_devices`; the message names
      `field_name`, both values and the nearest valid batch sizes.
  """
  if global_batch <= 0 or num_devices <= 0 or global_batch % num_devices:
    lower = (global_batch // num_devices) * num_devices if num_devices > 0 else 0
    upper = lower + num_devices
    choices = f"{lower} or {upper}" if lower > 0 else f"{upper}"
    raise ValueError(
        f"{field_name}: global batch {global_batch} does not split evenly across "
        f"{num_devices} devices; set it so that the batch is a multiple of {num_devices} "
        f"(e.g. {choices}) or run on a device count that divides {global_batch}")


def host_to_global(batch_tree: Any, mesh: Mesh) -> Any:
  """Turns this process's slice of a batch into global arrays sharded on "data".

  Args:
    batch_tree: pytree of NumPy arrays, each [local_batch, ...] where local_batch is this
      process's share of the global batch (all leaves the same local_batch); dtypes are kept.
    mesh: the mesh from `make_mesh`.

  Returns:
    The same pytree of `jax.Array`s, each [local_batch * process_count, ...] with sharding
    `data_sharding(mesh)`, made in one `jax.make_array_from_process_local_data` call.

  Raises:
    ValueError: a leaf is a scalar, the leaves disagree on local_batch, or local_batch does not
      divide by the number of this process's devices on the mesh.
  """
  leaves, _ = jax.tree.flatten_with_path(batch_tree)
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  sizes = set()
  for path, leaf in leaves:
    if np.ndim(leaf) == 0:
      raise ValueError(f"batch field {jax.tree_util.keystr(path)} is a scalar; every batch "
                       "field needs a leading batch axis")
    sizes.add(np.shape(leaf)[0])
  if len(sizes) > 1:
    raise ValueError(f"batch fields disagree on the local batch size: {sorted(sizes)}")
  for size in sizes:
    check_batch_divides(size, local_devices, "per-process batch (leading axis of the host batch)")
  return jax.make_array_from_process_local_data(data_sharding(mesh), batch_tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree (host or single-device values, identical on every process) replicated on
  `mesh`. Works across processes, where `jax.device_put` cannot target devices that are not
  addressable; typed PRNG keys are placed through their key data."""
  sharding = replicated(mesh)

  def put(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(leaf)),
                                      impl=jax.random.key_impl(leaf))
    if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
      return leaf
    return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

  return jax.tree.map(put, tree)


def gather_rows(x: jax.Array) -> jax.Array:
  """Returns `x` replicated when it is sharded over a mesh axis of type Explicit.

  Losses that compare every row with every other row (quantiles, triplet negatives) need the
  whole batch on each device. Under Auto sharding (or none) XLA inserts the gather itself and
  this is the identity; under Explicit sharding JAX refuses such operations unless asked.
  """
  sharding = jax.typeof(x).sharding
  if isinstance(sharding, NamedSharding) and any(a is not None for a in sharding.spec):
    x = jax.sharding.reshard(x, NamedSharding(sharding.mesh, P()))
  return x


def to_host(array: jax.Array) -> np.ndarray:
  """The whole value of a (possibly sharded, possibly multi-process) array as NumPy."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(array))
  from jax.experimental import multihost_utils  # Multi-host only.
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))
