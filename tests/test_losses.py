"""TMCL / EMCL against an independent plain-numpy implementation, and sharded == single-device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from medbind_jax import losses


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


def np_emcl(zc, ze, linked, s, negatives):
  idx = np.flatnonzero(linked)
  if idx.size == 0:
    return 0.0
  cols = idx if negatives == "linked" else np.arange(len(linked))
  total = 0.0
  for i in idx:
    for q, keys in ((zc, ze), (ze, zc)):
      logits = s * keys[cols].astype(np.float64) @ q[i].astype(np.float64)
      m = logits.max()
      lse = m + np.log(np.exp(logits - m).sum())
      total += 0.5 * (lse - logits[list(cols).index(i)])
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
  emb = {k: _unit(rng, n, d) for k in ("cxr", "cxr_text", "ecg", "ecg_text")}
  batch = {"cxr_text_key": _text_keys(cxr_texts), "ecg_text_key": _text_keys(ecg_texts), "linked": linked}
  scales = {"cxr_text": np.float32(9.0), "ecg_text": np.float32(11.0), "cxr_ecg": np.float32(7.5)}
  return emb, batch, scales, cxr_texts, ecg_texts


@pytest.mark.parametrize("num_linked", [0, 1, 5, 16])
@pytest.mark.parametrize("negatives", ["linked", "all"])
def test_loss_matches_numpy(num_linked, negatives):
  emb, batch, scales, cxr_texts, ecg_texts = _problem(16, 8, seed=num_linked, num_linked=num_linked)
  assert len(set(cxr_texts)) < len(cxr_texts)  # the case of interest: duplicate reports
  cfg = losses.LossConfig(emcl_weight=0.7, emcl_negatives=negatives)
  loss, parts = jax.jit(lambda e, b, s: losses.medbind_loss(e, b, s, cfg))(emb, batch, scales)
  want_cxr = np_tmcl(emb["cxr"], emb["cxr_text"], cxr_texts, 9.0)
  want_ecg = np_tmcl(emb["ecg"], emb["ecg_text"], ecg_texts, 11.0)
  want_emcl = np_emcl(emb["cxr"], emb["ecg"], batch["linked"], 7.5, negatives)
  np.testing.assert_allclose(parts["tmcl_cxr"], want_cxr, rtol=1e-5)
  np.testing.assert_allclose(parts["tmcl_ecg"], want_ecg, rtol=1e-5)
  np.testing.assert_allclose(parts["emcl"], want_emcl, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, want_cxr + want_ecg + 0.7 * want_emcl, rtol=1e-5)
  assert int(parts["num_linked"]) == num_linked


def test_zero_linked_gives_zero_emcl_and_finite_gradients():
  emb, batch, scales, _, _ = _problem(8, 4, seed=3, num_linked=0)
  cfg = losses.LossConfig(emcl_negatives="linked")
  grads = jax.grad(lambda e, s: losses.medbind_loss(e, batch, s, cfg)[1]["emcl"], argnums=(0, 1))(emb, scales)
  assert float(losses.medbind_loss(emb, batch, scales, cfg)[1]["emcl"]) == 0.0
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0)


def test_distinct_texts_reduce_to_clip():
  emb, batch, scales, cxr_texts, _ = _problem(12, 6, seed=1, num_linked=4, distinct=True)
  assert len(set(cxr_texts)) == len(cxr_texts)
  total, count = losses.tmcl_sum(emb["cxr"], emb["cxr_text"], batch["cxr_text_key"], scales["cxr_text"])
  # CLIP: text i is the only positive of image i, so the labels are the positions of each row's own text.
  logits = scales["cxr_text"] * emb["cxr"] @ emb["cxr_text"].T
  labels = jnp.arange(12)
  clip = 0.5 * (jnp.mean(-jax.nn.log_softmax(logits, axis=1)[labels, labels])
                + jnp.mean(-jax.nn.log_softmax(logits.T, axis=1)[labels, labels]))
  np.testing.assert_allclose(total / count, clip, rtol=1e-6)


def test_duplicates_change_the_loss():
  """Guards against a TMCL that ignores the positive sets: merging texts must change the value."""
  emb, batch, scales, _, _ = _problem(12, 6, seed=1, num_linked=4, distinct=True)
  merged = batch["cxr_text_key"].copy()
  merged[1] = merged[0]
  a = losses.tmcl_sum(emb["cxr"], emb["cxr_text"], batch["cxr_text_key"], scales["cxr_text"])[0]
  b = losses.tmcl_sum(emb["cxr"], emb["cxr_text"], merged, scales["cxr_text"])[0]
  assert abs(float(a) - float(b)) > 1e-3


@pytest.mark.parametrize("num_devices", [1, 2, 8])
@pytest.mark.parametrize("negatives", ["linked", "all"])
def test_sharded_equals_single_device(num_devices, negatives):
  assert jax.device_count() >= 8, "tests/conftest.py must force 8 CPU devices"
  emb, batch, scales, _, _ = _problem(32, 8, seed=num_devices, num_linked=11)
  cfg = losses.LossConfig(emcl_weight=1.3, emcl_negatives=negatives)
  mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:num_devices])
  sharded = losses.sharded_medbind_loss(mesh, cfg)

  def single(e, s):
    return losses.medbind_loss(e, batch, s, cfg)[0]

  def multi(e, s):
    return sharded(e, batch, s)[0]

  want, want_grads = jax.jit(jax.value_and_grad(single, argnums=(0, 1)))(emb, scales)
  got, got_grads = jax.jit(jax.value_and_grad(multi, argnums=(0, 1)))(emb, scales)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(got_grads):
    w = want_grads[path[0].idx][path[1].key]
    assert np.abs(np.asarray(w)).max() > 0, path
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7, err_msg=str(path))
