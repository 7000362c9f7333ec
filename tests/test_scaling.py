"""Exact gradient accumulation over micro-batches, FSDP parameter sharding (data x fsdp meshes), and checkpoints
that restore onto another mesh shape; over the 8 fake CPU devices."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from medbind_jax import losses, runs, sharding, steps, train
from medbind_jax.data import codecs, pipeline
from medbind_jax.data.text import TableRows
from medbind_jax.model import build_model
from test_train import _final_params, data_dir, tiny_config  # noqa: F401  (data_dir is a fixture)


def _setup(data_dir, fsdp=1, **overrides):  # noqa: F811
  """Model, parameters and one training batch of the tiny config (the frozen text trunk's features a random
  table, as the trainer caches them) on a data x fsdp mesh of the 8 devices."""
  config = tiny_config(data_dir, **{"data.batch_size": 32, "data.linked_per_batch": 12, "mesh.fsdp": fsdp,
                                    "mesh.fsdp_min_size": 64, **overrides})
  mesh = sharding.make_mesh(config.mesh)
  model, pretrained = build_model(config)
  params = runs.initial_params(config, model, pretrained)
  params["towers"].pop(codecs.TEXT)  # the cached trunk is not trained
  edges = runs.edges(config)
  layout = pipeline.Layout.from_edges(edges)
  index = pipeline.index_split(data_dir, "train", progress=False)
  texts = sorted({r.reports[m] for r in index.records for m in layout.report_modalities if r.has(m)})
  table = np.random.default_rng(0).normal(size=(len(texts), model.towers[codecs.TEXT].width)).astype(np.float32)
  spec = pipeline.BatchSpec(32, 12, shards=8)
  batch = pipeline.train_dataset(index, TableRows({t: i for i, t in enumerate(texts)}), spec, layout,
                                 specs=runs.data_specs(config), seed=0)[0]
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  params = jax.device_put(params, sharding.param_shardings(params, mesh, config.mesh))
  objective = losses.sharded_objective(mesh, edges, sharding.BATCH_AXES, linked_rows=spec.linked_rows_per_shard)
  return mesh, model, layout, objective, params, batch, jax.device_put(table, NamedSharding(mesh, P()))


def _grads(setup, microbatches):
  mesh, model, layout, objective, params, batch, table = setup
  constrain = lambda x: jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh))  # noqa: E731
  fn = jax.jit(lambda p, b, t: steps.loss_and_grads(model, layout, "cached", objective, p, b, t, jax.random.key(0),
                                                    microbatches=microbatches, shards=8, constrain=constrain))
  (loss, parts, _), grads = fn(params, batch, table)
  return float(loss), {k: float(v) for k, v in parts.items()}, grads


def _assert_trees_close(got, want, rtol=1e-5):
  """Every leaf within rtol of its own scale: max |got - want| <= rtol * max |want| (a sum of many terms in
  another order differs in its last digits wherever terms cancel). Leaves that are zero but for rounding (the
  attention key biases, to which softmax is invariant: ~1e-11 either way) are held to 1e-7 of the whole
  gradient's largest entry instead."""
  floor = 1e-7 * max(float(np.abs(np.asarray(w)).max()) for w in jax.tree.leaves(want))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    g, w = np.asarray(g), np.asarray(w)
    tolerance = max(rtol * float(np.abs(w).max()), floor)
    assert np.abs(g - w).max() <= tolerance, (jax.tree_util.keystr(path), np.abs(g - w).max(), tolerance)


def test_accumulating_micro_batches_gives_the_whole_batch_gradient(data_dir):  # noqa: F811
  setup = _setup(data_dir)
  loss, parts, grads = _grads(setup, 1)
  assert parts["num_pairs/cxr_ecg"] == 12 and all(np.isfinite(v) for v in parts.values())
  for k in (4,):  # 4 rows per device: one row of every device per micro-batch
    got_loss, got_parts, got_grads = _grads(setup, k)
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
    assert got_parts.keys() == parts.keys()
    _assert_trees_close(got_grads, grads)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads["heads"]))
  with pytest.raises(ValueError, match="do not split into 3 micro-batches"):
    _grads(setup, 3)


def test_fsdp_mesh_gives_the_data_parallel_loss_and_gradients(data_dir):  # noqa: F811
  data_only, fsdp = _setup(data_dir, fsdp=1), _setup(data_dir, fsdp=2)
  assert dict(fsdp[0].shape) == {"data": 4, "fsdp": 2}
  sharded = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(fsdp[4])
             if "fsdp" in x.sharding.spec]
  assert len(sharded) >= 10, sharded  # the kernels are split over fsdp, not replicated
  want_loss, want_parts, want_grads = _grads(data_only, 1)
  got_loss, got_parts, got_grads = _grads(fsdp, 1)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for key in want_parts:
    np.testing.assert_allclose(got_parts[key], want_parts[key], rtol=1e-6, err_msg=key)
  _assert_trees_close(got_grads, want_grads)
  _, _, accumulated = _grads(fsdp, 2)  # accumulation works on the sharded parameters too
  _assert_trees_close(accumulated, want_grads)


def test_parameter_rules_and_mesh_mistakes_are_explained():
  rules = ((r"embeddings/word", ("fsdp", None)),)
  assert sharding.param_spec("towers/text/embeddings/word/embedding", (30, 8), 2, rules, 1 << 30) == P("fsdp", None)
  assert sharding.param_spec("towers/cxr/block_0/fc1/kernel", (96, 288), 2, (), 1000) == P(None, "fsdp")
  assert sharding.param_spec("towers/cxr/block_0/fc1/bias", (288,), 2, (), 1000) == P()  # small: replicated
  assert sharding.param_spec("heads/cxr/out/kernel", (97, 256), 1, (), 0) == P()  # fsdp = 1: nothing to split
  with pytest.raises(ValueError, match="does not divide"):
    sharding.param_spec("x/w", (31, 8), 2, ((r"x/w", ("fsdp", None)),), 0)
  with pytest.raises(ValueError, match="must equal the 8 devices"):
    sharding.mesh_shape({"data": 3, "fsdp": 2}, 8)
  with pytest.raises(ValueError, match="positive divisor"):
    sharding.mesh_shape({"fsdp": 3}, 8)
  mesh = sharding.make_mesh({"fsdp": 2})
  with pytest.raises(ValueError, match="match no parameter"):
    sharding.param_shardings({"a": np.zeros((4, 4))}, mesh, {"param_rules": ((r"^nothing", (None, None)),)})
  opt = {"mu": {"a": np.zeros((4, 4))}, "count": np.zeros(())}
  like = sharding.like_params(opt, {"a": np.zeros((4, 4))}, {"a": NamedSharding(mesh, P("fsdp", None))}, mesh)
  assert like["mu"]["a"].spec == P("fsdp", None) and like["count"].spec == P()


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


def test_a_checkpoint_restores_onto_another_mesh_shape(data_dir, tmp_path):  # noqa: F811
  """Trained 2 steps data-parallel over 8 devices, resumed on data 4 x fsdp 2 (parameters and optimiser state
  re-split by orbax) and on with 2 micro-batches: the same losses and parameters as the uninterrupted run."""
  base = {"total_steps": 4, "eval.evaluators": ("retrieval",), "mesh.fsdp_min_size": 64}
  full, parted = str(tmp_path / "full"), str(tmp_path / "parted")
  train.train_and_evaluate(tiny_config(data_dir, **base), full)
  assert train.train_and_evaluate(tiny_config(data_dir, **base), parted, stop_after_step=2) is None
  train.train_and_evaluate(tiny_config(data_dir, **base, **{"mesh.fsdp": 2, "optim.microbatches": 1}), parted)
  want, got = _losses(full), _losses(parted)
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)], rtol=1e-5)
  _assert_trees_close(_final_params(parted, 4), _final_params(full, 4), rtol=1e-4)
