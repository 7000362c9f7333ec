"""TMCL / EMCL (tmcl and pair edges) against an independent plain-numpy implementation, and sharded ==
single-device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from medbind_jax import losses
from medbind_jax.data import pipeline
from test_chunked_losses import _dot_precisions


def _np_log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def np_tmcl(z, u, texts, s):
  """Row and column cross-entropy with targets spread over identical texts, written loop by loop."""
  n = len(texts)
  logits = s * z.astype(np.float64) @ u.astype(np.float64).T
  target = np.array([[float(texts[i] == texts[j]) for j in range(n)] for i in range(n)])
  target /= target.sum(1, keepdims=True)
  rows = -(target * _np_log_softmax(logits)).sum(1)
  cols = -(target * _np_log_softmax(logits.T)).sum(1)  # Y is symmetric for text equality
  return float(0.5 * (rows.mean() + cols.mean()))


def np_emcl(zc, ze, linked, s, negatives, ids_c=None, ids_e=None):
  """Pair loss; with record ids, a column holding the partner's own record at another row is no negative."""
  idx = np.flatnonzero(linked)
  if idx.size == 0:
    return 0.0
  total = 0.0
  for i in idx:
    for q, keys, ids in ((zc, ze, ids_e), (ze, zc, ids_c)):
      cols = [j for j in (idx if negatives == "linked" else range(len(linked)))
              if j == i or ids is None or ids[j] != ids[i]]
      logits = s * keys[cols].astype(np.float64) @ q[i].astype(np.float64)
      m = logits.max()
      lse = m + np.log(np.exp(logits - m).sum())
      total += 0.5 * (lse - logits[cols.index(i)])
  return total / idx.size


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _text_keys(texts):
  ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
  return np.stack([[ids[t], 7 * ids[t] + 1] for t in texts]).astype(np.int32)


def _problem(n, d, seed, num_linked, distinct=False):
  rng = np.random.default_rng(seed)
  vocab = [f"report {k}" for k in range(n if distinct else max(2, n // 3))]
  cxr_texts = [vocab[k] for k in (rng.permutation(n) if distinct else rng.integers(0, len(vocab), n))]
  ecg_texts = [vocab[k] for k in (rng.permutation(n) if distinct else rng.integers(0, len(vocab), n))]
  linked = np.zeros(n, bool)
  linked[rng.choice(n, num_linked, replace=False)] = True
  emb = {"inputs": {m: _unit(rng, n, d) for m in ("cxr", "ecg")},
         "reports": {m: _unit(rng, n, d) for m in ("cxr", "ecg")}}
  batch = {"text_key": {"cxr": _text_keys(cxr_texts), "ecg": _text_keys(ecg_texts)},
           "pair_mask": {"cxr_ecg": linked}}
  scales = {"cxr_text": np.float32(9.0), "ecg_text": np.float32(11.0), "cxr_ecg": np.float32(7.5)}
  return emb, batch, scales, cxr_texts, ecg_texts


def _edges(emcl_weight=1.0, negatives="linked"):
  """MEDBind's objective as edges: the default of configs/medbind.py."""
  return (losses.Edge("cxr_text", ("cxr", "text"), "tmcl"), losses.Edge("ecg_text", ("ecg", "text"), "tmcl"),
          losses.Edge("cxr_ecg", ("cxr", "ecg"), "pair", weight=emcl_weight, negatives=negatives))


@pytest.mark.parametrize("num_linked", [0, 1, 5, 16])
@pytest.mark.parametrize("negatives", ["linked", "all"])
def test_loss_matches_numpy(num_linked, negatives):
  emb, batch, scales, cxr_texts, ecg_texts = _problem(16, 8, seed=num_linked, num_linked=num_linked)
  assert len(set(cxr_texts)) < len(cxr_texts)  # the case of interest: duplicate reports
  edges = _edges(emcl_weight=0.7, negatives=negatives)
  loss, parts = jax.jit(lambda e, b, s: losses.objective(e, b, s, edges))(emb, batch, scales)
  z, u = emb["inputs"], emb["reports"]
  want_cxr = np_tmcl(z["cxr"], u["cxr"], cxr_texts, 9.0)
  want_ecg = np_tmcl(z["ecg"], u["ecg"], ecg_texts, 11.0)
  want_emcl = np_emcl(z["cxr"], z["ecg"], batch["pair_mask"]["cxr_ecg"], 7.5, negatives)
  np.testing.assert_allclose(parts["loss/cxr_text"], want_cxr, rtol=1e-5)
  np.testing.assert_allclose(parts["loss/ecg_text"], want_ecg, rtol=1e-5)
  np.testing.assert_allclose(parts["loss/cxr_ecg"], want_emcl, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, want_cxr + want_ecg + 0.7 * want_emcl, rtol=1e-5)
  assert int(parts["num_pairs/cxr_ecg"]) == num_linked


def test_zero_linked_gives_zero_emcl_and_finite_gradients():
  emb, batch, scales, _, _ = _problem(8, 4, seed=3, num_linked=0)
  edges = _edges(negatives="linked")
  grads = jax.grad(lambda e, s: losses.objective(e, batch, s, edges)[1]["loss/cxr_ecg"], argnums=(0, 1))(emb, scales)
  assert float(losses.objective(emb, batch, scales, edges)[1]["loss/cxr_ecg"]) == 0.0
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0)


def test_distinct_texts_reduce_to_clip():
  emb, batch, scales, cxr_texts, _ = _problem(12, 6, seed=1, num_linked=4, distinct=True)
  assert len(set(cxr_texts)) == len(cxr_texts)
  z, u = emb["inputs"]["cxr"], emb["reports"]["cxr"]
  total, count = losses.tmcl_sum(z, u, batch["text_key"]["cxr"], scales["cxr_text"])
  # CLIP: text i is the only positive of image i, so the labels are the positions of each row's own text.
  logits = scales["cxr_text"] * z @ u.T
  labels = jnp.arange(12)
  clip = 0.5 * (jnp.mean(-jax.nn.log_softmax(logits, axis=1)[labels, labels])
                + jnp.mean(-jax.nn.log_softmax(logits.T, axis=1)[labels, labels]))
  np.testing.assert_allclose(total / count, clip, rtol=1e-6)


def test_duplicates_change_the_loss():
  """Guards against a TMCL that ignores the positive sets: merging texts must change the value."""
  emb, batch, scales, _, _ = _problem(12, 6, seed=1, num_linked=4, distinct=True)
  z, u = emb["inputs"]["cxr"], emb["reports"]["cxr"]
  merged = batch["text_key"]["cxr"].copy()
  merged[1] = merged[0]
  a = losses.tmcl_sum(z, u, batch["text_key"]["cxr"], scales["cxr_text"])[0]
  b = losses.tmcl_sum(z, u, merged, scales["cxr_text"])[0]
  assert abs(float(a) - float(b)) > 1e-3


@pytest.mark.parametrize("num_devices", [1, 2, 8])
@pytest.mark.parametrize("negatives", ["linked", "all"])
def test_sharded_equals_single_device(num_devices, negatives):
  assert jax.device_count() >= 8, "tests/conftest.py must force 8 CPU devices"
  emb, batch, scales, _, _ = _problem(32, 8, seed=num_devices, num_linked=11)
  edges = _edges(emcl_weight=1.3, negatives=negatives)
  mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:num_devices])
  sharded = losses.sharded_objective(mesh, edges)

  def single(e, s):
    return losses.objective(e, batch, s, edges)[0]

  def multi(e, s):
    return sharded(e, batch, s)[0]

  want, want_grads = jax.jit(jax.value_and_grad(single, argnums=(0, 1)))(emb, scales)
  got, got_grads = jax.jit(jax.value_and_grad(multi, argnums=(0, 1)))(emb, scales)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
    assert np.abs(np.asarray(w)).max() > 0, path
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_edges_from_config_and_bad_edges_are_explained():
  config = {"b_text": {"modalities": ("text", "b"), "kind": "tmcl", "weight": 1.0},
            "a_b": {"modalities": ("a", "b"), "kind": "pair", "weight": 0.5, "negatives": "all"}}
  edges = losses.edges_from_config(config)
  assert [e.name for e in edges] == ["a_b", "b_text"]  # sorted by name
  assert edges[1].modalities == ("b", "text") and edges[1].modality == "b"  # tmcl: (modality, text)
  assert [e.logit_scale for e in edges] == ["a_b", "b_text"]  # one temperature per edge by default
  shared = losses.edges_from_config(config, per_edge_logit_scale=False)
  assert {e.logit_scale for e in shared} == {"shared"}
  with pytest.raises(ValueError, match="binds a modality to 'text'"):
    losses.Edge("x", ("a", "b"), "tmcl")
  with pytest.raises(ValueError, match="two non-text modalities"):
    losses.Edge("x", ("a", "text"), "pair")
  with pytest.raises(ValueError, match="kind must be one of"):
    losses.Edge("x", ("a", "b"), "triplet")
  with pytest.raises(ValueError, match="empty"):
    losses.edges_from_config({})


def test_a_fourth_modality_adds_its_edges_to_the_objective():
  """Edges over any names: a 'labs' modality with its own tmcl edge and a pair edge to ECG."""
  emb, batch, scales, _, ecg_texts = _problem(16, 8, seed=5, num_linked=6)
  rng = np.random.default_rng(9)
  lab_texts = [f"labs {k}" for k in rng.integers(0, 4, 16)]
  emb["inputs"]["labs"], emb["reports"]["labs"] = _unit(rng, 16, 8), _unit(rng, 16, 8)
  batch["text_key"]["labs"] = _text_keys(lab_texts)
  batch["pair_mask"]["labs_ecg"] = batch["pair_mask"]["cxr_ecg"]
  scales = {**scales, "labs_text": np.float32(5.0), "labs_ecg": np.float32(6.0)}
  edges = _edges() + (losses.Edge("labs_text", ("labs", "text"), "tmcl", weight=0.5),
                      losses.Edge("labs_ecg", ("labs", "ecg"), "pair", weight=2.0))
  loss, parts = losses.objective(emb, batch, scales, edges)
  z, u = emb["inputs"], emb["reports"]
  want_labs = np_tmcl(z["labs"], u["labs"], lab_texts, 5.0)
  want_pair = np_emcl(z["labs"], z["ecg"], batch["pair_mask"]["labs_ecg"], 6.0, "linked")
  np.testing.assert_allclose(parts["loss/labs_text"], want_labs, rtol=1e-5)
  np.testing.assert_allclose(parts["loss/labs_ecg"], want_pair, rtol=1e-5)
  base = parts["loss/cxr_text"] + parts["loss/ecg_text"] + parts["loss/cxr_ecg"]
  np.testing.assert_allclose(loss, base + 0.5 * want_labs + 2.0 * want_pair, rtol=1e-5)


@pytest.mark.parametrize("negatives", ["linked", "all"])
@pytest.mark.parametrize("num_devices", [1, 8])
def test_a_partners_own_record_elsewhere_in_the_batch_is_no_negative(negatives, num_devices):
  """Unlinked rows draw from every record with the modality, linked ones included: the partner ECG can appear
  again as an unlinked row (and a linked record twice at an epoch boundary). Those copies are the positive
  itself and are left out of the negatives (same value on 1 and 8 devices)."""
  emb, batch, scales, _, _ = _problem(16, 8, seed=11, num_linked=0)
  linked = np.arange(16) < 6
  batch["pair_mask"]["cxr_ecg"] = linked
  ids = {m: np.arange(16, dtype=np.int32) + (0 if m == "cxr" else 100) for m in ("cxr", "ecg")}
  for copy, of in ((10, 2), (15, 4), (5, 1)):  # unlinked rows 10, 15 and linked row 5 repeat partners 2, 4, 1
    ids["ecg"][copy] = ids["ecg"][of]
    emb["inputs"]["ecg"][copy] = emb["inputs"]["ecg"][of]  # the same record embeds the same
  ids["cxr"][12] = ids["cxr"][3]  # and a CXR: unlinked row 12 repeats linked row 3's
  emb["inputs"]["cxr"][12] = emb["inputs"]["cxr"][3]
  batch["index"] = ids
  edges = _edges(negatives=negatives)
  mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:num_devices])
  _, parts = jax.jit(losses.sharded_objective(mesh, edges))(emb, batch, scales)
  z = emb["inputs"]
  want = np_emcl(z["cxr"], z["ecg"], linked, 7.5, negatives, ids["cxr"], ids["ecg"])
  np.testing.assert_allclose(parts["loss/cxr_ecg"], want, rtol=1e-5)
  naive = np_emcl(z["cxr"], z["ecg"], linked, 7.5, negatives)  # copies counted as negatives: a different loss
  assert abs(want - naive) > 1e-3


def np_sigmoid(z, u, texts, s, b):
  """SigLIP's loss with duplicate texts as positives, pair by pair."""
  total = 0.0
  for i in range(len(texts)):
    for j in range(len(texts)):
      v = (1.0 if texts[i] == texts[j] else -1.0) * (s * float(z[i].astype(np.float64) @ u[j]) + b)
      total += np.log1p(np.exp(-v))
  return total / len(texts)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_sigmoid_edge_matches_numpy_with_duplicates_as_positives(num_devices):
  emb, batch, scales, cxr_texts, _ = _problem(16, 8, seed=21, num_linked=0)
  assert len(set(cxr_texts)) < len(cxr_texts)
  edge = losses.Edge("cxr_text", ("text", "cxr"), "sigmoid")  # either order; stored as (cxr, text)
  assert edge.modalities == ("cxr", "text") and edge.uses_text
  scales = {**scales, losses.bias_name(edge): np.float32(-3.0)}
  mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:num_devices])
  sharded = losses.sharded_objective(mesh, (edge,))
  loss, parts = jax.jit(sharded)(emb, batch, scales)
  want = np_sigmoid(emb["inputs"]["cxr"], emb["reports"]["cxr"], cxr_texts, 9.0, -3.0)
  np.testing.assert_allclose(parts["loss/cxr_text"], want, rtol=1e-5)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # Gradients (embeddings, scale and bias) equal the single-device loss's.
  single = jax.grad(lambda e, s: losses.objective(e, batch, s, (edge,))[0], argnums=(0, 1))(emb, scales)
  multi = jax.grad(lambda e, s: sharded(e, batch, s)[0], argnums=(0, 1))(emb, scales)
  for g, w in zip(jax.tree.leaves(multi), jax.tree.leaves(single)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  # Duplicates are positives: treating them as negatives gives another loss.
  distinct = [f"{t} #{i}" for i, t in enumerate(cxr_texts)]
  assert abs(want - np_sigmoid(emb["inputs"]["cxr"], emb["reports"]["cxr"], distinct, 9.0, -3.0)) > 1e-2


def test_the_contrastive_matmuls_run_at_the_configured_precision():
  """Full float32 by default (on accelerators the platform default would be bf16/TF32 passes), or as set."""
  emb, batch, scales, _, _ = _problem(8, 4, seed=2, num_linked=3)
  edges = _edges() + (losses.Edge("ecg_sigmoid", ("ecg", "text"), "sigmoid"),)
  scales = {**scales, "ecg_sigmoid": np.float32(3.0), losses.bias_name(edges[-1]): np.float32(-1.0)}

  def dots(**kwargs):  # forward and backward, inside the custom VJPs too
    return _dot_precisions(jax.make_jaxpr(jax.grad(
        lambda e: losses.objective(e, batch, scales, edges, **kwargs)[0]))(emb).jaxpr)

  highest = dots()
  # tmcl x2 and pair: one logits matmul forward, its recomputation and two gradient matmuls backward (custom
  # VJP); sigmoid: one forward, two backward (autodiff)
  assert len(highest) == 3 * 4 + 3, highest
  assert all("HIGHEST" in p for p in highest), highest
  assert all("HIGHEST" not in p for p in dots(precision=None)), dots(precision=None)
  assert all("HIGH" in p and "HIGHEST" not in p for p in dots(precision="tensorfloat32"))


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("num_linked", [0, 5, 16])
@pytest.mark.parametrize("negatives", ["linked", "all"])
def test_pair_edges_score_only_the_static_linked_prefix(num_devices, num_linked, negatives):
  """With the pipeline's layout (each device's linked rows dealt into a prefix of its rows), scoring only the
  prefix gives the loss and gradients of scoring every row, with fewer logits (5 linked rows over 8 devices:
  some prefixes hold an unlinked row)."""
  spec = pipeline.BatchSpec(32, num_linked, shards=num_devices)
  linked = spec.linked_slots() >= 0
  assert linked.sum() == num_linked
  assert all(not linked[d * (32 // num_devices) + spec.linked_rows_per_shard:(d + 1) * (32 // num_devices)].any()
             for d in range(num_devices))  # the linked rows of every device lie in its prefix
  emb, batch, scales, _, _ = _problem(32, 8, seed=num_linked, num_linked=0)
  batch["pair_mask"]["cxr_ecg"] = linked
  batch["index"] = {m: np.arange(32, dtype=np.int32) for m in ("cxr", "ecg")}
  batch["index"]["ecg"][31] = batch["index"]["ecg"][0]  # an unlinked copy of a linked row's ECG
  edges = _edges(negatives=negatives)
  mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:num_devices])

  def run(rows):
    objective = losses.sharded_objective(mesh, edges, linked_rows=rows)
    return jax.jit(jax.value_and_grad(lambda e, s: objective(e, batch, s)[1]["loss/cxr_ecg"], argnums=(0, 1)))(
        emb, scales)

  (got, got_grads), (want, want_grads) = run(spec.linked_rows_per_shard), run(None)
  z = emb["inputs"]
  np.testing.assert_allclose(want, np_emcl(z["cxr"], z["ecg"], linked, 7.5, negatives, batch["index"]["cxr"],
                                           batch["index"]["ecg"]), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  if negatives == "linked" and num_linked:  # the prefix path forms [k, devices * k] logits, not [b, B]
    jaxpr = str(jax.make_jaxpr(lambda e: losses.objective(e, batch, scales, edges[2:],
                                                          linked_rows=spec.linked_rows_per_shard)[0])(emb))
    k = spec.linked_rows_per_shard
    assert f"f32[{k},{k}]" in jaxpr and "f32[32,32]" not in jaxpr


def test_chunked_edges_in_the_objective_equal_whole_logits():
  """`chunk` on an edge (config.loss.edges.<name>.chunk) switches it to the streamed form: same loss and
  gradients, with the static linked prefix on pair edges."""
  emb, batch, scales, _, _ = _problem(16, 8, seed=4, num_linked=0)
  batch["pair_mask"]["cxr_ecg"] = np.arange(16) < 6
  whole = _edges()
  whole += (losses.Edge("ecg_sigmoid", ("ecg", "text"), "sigmoid"),)
  scales = {**scales, "ecg_sigmoid": np.float32(3.0), losses.bias_name(whole[-1]): np.float32(-1.0)}
  chunked = tuple(dataclasses.replace(e, chunk=4 if e.kind != "pair" else 2) for e in whole)

  def run(edges):
    return jax.jit(jax.value_and_grad(lambda e, s: losses.objective(e, batch, s, edges, linked_rows=6)[0],
                                      argnums=(0, 1)))(emb, scales)

  (got, got_grads), (want, want_grads) = run(chunked), run(whole)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="chunk must be 0"):
    losses.Edge("x", ("cxr", "text"), "sigmoid", chunk=-4)
