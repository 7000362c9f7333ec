"""Device mesh and parameter sharding: data parallelism over `data`, fully sharded parameters over `fsdp`.

The mesh has two axes from `config.mesh`: `data` (replicas) x `fsdp` (parameter shards). Batches are split over
both (`BATCH_AXES`), so every device holds its own rows; parameters and the optimiser state are split over
`fsdp` alone, and XLA gathers a layer's weights where it is used and reduce-scatters its gradient (ZeRO-3 /
FSDP, as in GSPMD). With `fsdp = 1` this is plain data parallelism with replicated parameters.

Which dimension of a parameter is split comes from path rules, `config.mesh.param_rules`: a sequence of
(regex over '/'-joined parameter paths, spec) where spec names a mesh axis or None per dimension, e.g.
(r"^towers/text/embeddings/word_embeddings/", ("fsdp", None)); the first match wins. Unmatched parameters of at
least `fsdp_min_size` elements get the default rule: their largest dimension that `fsdp` divides is split, the
rest replicated; smaller ones (biases, norms, temperatures) are replicated, since gathering them costs more
than it saves.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # batch rows are split over both axes, data-major


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from `config.mesh` (`data=-1`: every device `fsdp` leaves), checked against the devices."""
  data, fsdp = int(mesh_config.get("data", -1)), int(mesh_config.get("fsdp", 1))
  if fsdp < 1 or num_devices % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must be a positive divisor of the {num_devices} devices")
  if data == -1:
    data = num_devices // fsdp
  if data < 1 or data * fsdp != num_devices:
    raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} must equal the {num_devices} devices (data=-1: the rest)")
  return data, fsdp


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
  """The (data, fsdp) mesh over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows split over every device (data-major, then fsdp)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _path(key_path) -> str:
  """'/'-joined dict keys of a pytree path (other entries, e.g. optimiser-state tuple positions, are skipped)."""
  return "/".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))


def param_spec(path: str, shape: tuple[int, ...], fsdp: int, rules: Sequence[tuple[str, Sequence[Any]]],
               min_size: int) -> P:
  """The PartitionSpec of one parameter (see the module docstring)."""
  for regex, spec in rules:
    if re.search(regex, path):
      spec = tuple(spec)
      if len(spec) != len(shape):
        raise ValueError(f"mesh.param_rules: {regex!r} gives {spec} for {path} of shape {shape}")
      for axis, size in zip(spec, shape):
        if axis == FSDP_AXIS and size % fsdp:
          raise ValueError(f"mesh.param_rules: {regex!r} splits a dimension of size {size} of {path} over "
                           f"fsdp={fsdp}, which does not divide it")
      return P(*spec)
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [d for d in np.argsort(shape, kind="stable")[::-1] if shape[d] % fsdp == 0]
  if not candidates:
    return P()
  spec = [None] * len(shape)
  spec[int(candidates[0])] = FSDP_AXIS
  return P(*spec)


def param_shardings(params, mesh: Mesh, mesh_config) -> Any:
  """NamedSharding per parameter, as a pytree like `params`."""
  fsdp = mesh.shape[FSDP_AXIS]
  rules = tuple(mesh_config.get("param_rules", ()))
  min_size = int(mesh_config.get("fsdp_min_size", 1 << 14))
  unused = {regex for regex, _ in rules}

  def one(key_path, x):
    path = _path(key_path)
    unused.difference_update(regex for regex, _ in rules if re.search(regex, path))
    return NamedSharding(mesh, param_spec(path, tuple(x.shape), fsdp, rules, min_size))

  shardings = jax.tree_util.tree_map_with_path(one, params)
  if unused:
    names = ["/".join(k) for k in traverse_util.flatten_dict(params)][:5]
    raise ValueError(f"mesh.param_rules regexes match no parameter: {sorted(unused)}; parameters look like {names}")
  return shardings


def like_params(tree, params, params_shardings, mesh: Mesh) -> Any:
  """Shardings for a pytree that holds parameter-shaped leaves (the optimiser state: Adam's moments mirror the
  parameters' paths): a leaf whose dict-key path ends with a parameter's path and has its shape is sharded like
  it; the rest (step counts, scalars) are replicated."""
  shapes = {_path(k): tuple(x.shape) for k, x in jax.tree_util.tree_leaves_with_path(params)}
  by_path = {_path(k): s for k, s in jax.tree_util.tree_leaves_with_path(params_shardings)}
  replicated = NamedSharding(mesh, P())

  def one(key_path, x):
    parts = _path(key_path).split("/")
    for start in range(len(parts)):  # an optimiser wraps the parameter tree in containers of its own
      path = "/".join(parts[start:])
      if path in by_path and shapes[path] == tuple(x.shape):
        return by_path[path]
    return replicated

  return jax.tree_util.tree_map_with_path(one, tree)
