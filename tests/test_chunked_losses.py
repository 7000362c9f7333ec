"""Chunked edge losses (medbind_jax/chunked_losses.py) == the unchunked ones in losses.py: value, per-device sums
and gradients (both embeddings, the scale, the bias), on one device and sharded over 8 (tests/conftest.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Jaxpr
from jax.sharding import AxisType, PartitionSpec as P

from medbind_jax import chunked_losses, losses

N, D = 64, 16  # global batch: 8 rows per device on 8 devices


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _keys(ids):
  return np.stack([ids, 7 * ids + 1], axis=1).astype(np.int32)


def _tmcl_problem(seed):
  """Embeddings and text keys with duplicate reports, one group of five spread over four devices' rows."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, N // 3, N)
  ids[[0, 9, 18, 27, 30]] = N  # a text of its own, five times, on devices 0-3
  assert len(set(ids.tolist())) < N
  return _unit(rng, N, D), _unit(rng, N, D), _keys(ids)


def _close(got, want, what):
  """rtol 1e-5, with an absolute floor of 1e-6 of the largest entry for entries near zero."""
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * max(np.abs(want).max(), 1e-30), err_msg=what)


# The programs are tiny, and XLA's CPU compiler, not running them, is the tests' time: each test compiles one
# program holding every variant it compares, without LLVM's optimisation passes.
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def _program(variants, args, diff, num_devices):
  """A jitted function of `args` returning, for each of `variants` (loss_sum(*args, axis_name) -> (sum, count)),
  (psum(sum) / max(count, 1), the per-device sums, gradients w.r.t. args[diff]).

  One device: no mesh, axis_name None. Else shard_map over 'data', scalars (scale, bias) replicated, arrays split by
  rows."""
  mesh = None
  if num_devices > 1:
    mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:num_devices])

  def value_and_grads(loss_sum):
    def single(*a):
      total, count = loss_sum(*a, None)
      return total / jnp.maximum(count, 1.0), total[None]

    def local(*a):
      total, count = loss_sum(*a, "data")
      return jax.lax.psum(total, "data") / jnp.maximum(count, 1.0), total[None]

    fn = single
    if mesh is not None:
      specs = tuple(P() if np.ndim(x) == 0 else P("data") for x in args)
      fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P("data")))
    return jax.value_and_grad(fn, argnums=diff, has_aux=True)

  def run(*a):
    return [((value, sums), grads) for (value, sums), grads in (value_and_grads(v)(*a) for v in variants)]

  return jax.jit(run, compiler_options=_COMPILER_OPTIONS)


def _assert_same(got, want, what):
  ((got_value, got_sums), got_grads), ((want_value, want_sums), want_grads) = got, want
  _close(got_value, want_value, f"{what}: loss")
  _close(got_sums, want_sums, f"{what}: per-device sums")
  for i, (g, w) in enumerate(zip(got_grads, want_grads)):
    assert np.all(np.isfinite(g)), f"{what}: gradient {i}"
    _close(g, w, f"{what}: gradient {i}")


TMCL_CHUNKS = (N, N // 2, N // 8, 2 * N)  # one block, two, eight, and chunk > N (one block)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_tmcl_matches_unchunked_with_duplicate_reports(num_devices):
  z, u, keys = _tmcl_problem(seed=num_devices)
  args = (z, u, keys, np.float32(9.0))
  variants = [losses.tmcl_sum] + [
      lambda z, u, k, s, axis, c=c: chunked_losses.chunked_tmcl_sum(z, u, k, s, axis, chunk=c) for c in TMCL_CHUNKS]
  want, *got = _program(variants, args, (0, 1, 3), num_devices)(*args)
  assert all(np.abs(np.asarray(g)).max() > 0 for g in want[1])
  for chunk, result in zip(TMCL_CHUNKS, got):
    _assert_same(result, want, f"tmcl chunk={chunk} devices={num_devices}")


def _pair_problem(seed):
  """Some rows linked; partners' own records repeated at other rows (linked and unlinked), as record ids."""
  rng = np.random.default_rng(seed)
  a, b = _unit(rng, N, D), _unit(rng, N, D)
  linked = rng.random(N) < 0.4
  linked[[1, 2, 40]] = True
  a_ids, b_ids = np.arange(N, dtype=np.int32), np.arange(N, dtype=np.int32) + 1000
  for copy, of in ((10, 2), (63, 40), (5, 1), (33, 1)):  # rows 10, 63, 5, 33 repeat the B records of 2, 40, 1, 1
    b_ids[copy], b[copy] = b_ids[of], b[of]
  a_ids[50], a[50] = a_ids[2], a[2]
  return a, b, linked, a_ids, b_ids


# (negatives, record ids?, chunk or None for losses.pair_sum); the unchunked ones first
PAIR_VARIANTS = tuple((negatives, with_ids, chunk) for negatives in losses.PAIR_NEGATIVES
                      for with_ids, chunk in ((True, None), (False, None), (True, N), (True, N // 2), (True, N // 8),
                                              (False, N // 8)))


@functools.lru_cache(maxsize=None)
def _pair_program(num_devices):
  """Every PAIR_VARIANTS entry in one program of (a, b, linked, a_ids, b_ids, scale): compiled once per device
  count, shared by the pair tests."""

  def variant(negatives, with_ids, chunk):
    def loss_sum(a, b, linked, a_ids, b_ids, s, axis):
      ids = (a_ids, b_ids) if with_ids else (None, None)
      if chunk is None:
        return losses.pair_sum(a, b, linked, s, negatives, axis, *ids)
      return chunked_losses.chunked_pair_sum(a, b, linked, s, negatives, axis, *ids, chunk=chunk)
    return loss_sum

  args = _pair_problem(0) + (np.float32(1.0),)
  return _program([variant(*v) for v in PAIR_VARIANTS], args, (0, 1, 5), num_devices)


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("linked", ["some", "all"])
def test_pair_matches_unchunked(linked, num_devices):
  """Both negatives modes, with record ids repeating partners elsewhere and without ids, three chunk sizes."""
  a, b, some, a_ids, b_ids = _pair_problem(seed=3 + num_devices)
  results = _pair_program(num_devices)(a, b, some if linked == "some" else np.ones(N, bool), a_ids, b_ids,
                                       np.float32(7.5))
  want = {(negatives, with_ids): r for (negatives, with_ids, chunk), r in zip(PAIR_VARIANTS, results) if chunk is None}
  for (negatives, with_ids, chunk), result in zip(PAIR_VARIANTS, results):
    if chunk is not None:
      _assert_same(result, want[negatives, with_ids],
                   f"pair {negatives} ids={with_ids} {linked} linked chunk={chunk} devices={num_devices}")


@pytest.mark.parametrize("num_devices", [1, 8])
def test_pair_with_zero_linked_rows_is_zero_with_zero_finite_gradients(num_devices):
  a, b, _, a_ids, b_ids = _pair_problem(seed=0)
  results = _pair_program(num_devices)(a, b, np.zeros(N, bool), a_ids, b_ids, np.float32(7.5))
  for (negatives, with_ids, chunk), ((value, sums), grads) in zip(PAIR_VARIANTS, results):
    what = f"{negatives} ids={with_ids} chunk={chunk}"
    assert float(value) == 0.0 and np.all(np.asarray(sums) == 0.0), what
    for g in grads:
      assert np.all(np.isfinite(g)) and np.all(np.asarray(g) == 0), what


@pytest.mark.parametrize("num_devices", [1, 8])
def test_sigmoid_matches_unchunked(num_devices):
  z, u, keys = _tmcl_problem(seed=5)
  args = (z, u, keys, np.float32(9.0), np.float32(-3.0))
  chunks = (N, N // 8)
  variants = [losses.sigmoid_sum] + [
      lambda z, u, k, s, bias, axis, c=c: chunked_losses.chunked_sigmoid_sum(z, u, k, s, bias, axis, chunk=c)
      for c in chunks]
  want, *got = _program(variants, args, (0, 1, 3, 4), num_devices)(*args)
  for chunk, result in zip(chunks, got):
    _assert_same(result, want, f"sigmoid chunk={chunk} devices={num_devices}")


def test_a_chunk_that_does_not_divide_the_global_batch_is_explained():
  z, u, keys = _tmcl_problem(seed=1)
  linked, s = np.ones(N, bool), np.float32(1.0)
  calls = {"chunked_tmcl_sum": lambda c: chunked_losses.chunked_tmcl_sum(z, u, keys, s, chunk=c),
           "chunked_pair_sum": lambda c: chunked_losses.chunked_pair_sum(z, u, linked, s, chunk=c),
           "chunked_sigmoid_sum": lambda c: chunked_losses.chunked_sigmoid_sum(z, u, keys, s, s, chunk=c)}
  for name, call in calls.items():
    with pytest.raises(ValueError, match=f"{name}: chunk=24 does not divide the global column count N=64"):
      call(24)
    with pytest.raises(ValueError, match="non-negative int"):
      call(-8)
  # Sharded, N is the gathered batch (64), not the 8 local rows: 16 divides it, 12 does not.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))

  def sharded(chunk):
    return jax.shard_map(lambda z, u, k: chunked_losses.chunked_tmcl_sum(z, u, k, s, "data", chunk=chunk)[0][None],
                         mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data"))

  jax.eval_shape(sharded(16), z, u, keys)
  with pytest.raises(ValueError, match="chunk=12 does not divide the global column count N=64"):
    jax.eval_shape(sharded(12), z, u, keys)


def _dot_precisions(jaxpr):
  """The precision of every dot_general in a jaxpr and the jaxprs nested in its equations (scan bodies,
  custom_vjp forward and backward)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(str(eqn.params["precision"]))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, Jaxpr):
          found += _dot_precisions(inner)
  return found


def test_backward_matmuls_run_at_the_precision_in_force_at_the_call():
  """`losses.objective` sets the matmul precision around the loss call; the custom_vjp's backward is traced later,
  outside that context, and must still use it."""
  z, u, keys = _tmcl_problem(seed=2)
  linked = np.arange(N) < 20

  def loss(z, u, s):
    with jax.default_matmul_precision("highest"):
      return (chunked_losses.chunked_tmcl_sum(z, u, keys, s, chunk=N // 4)[0]
              + chunked_losses.chunked_pair_sum(z, u, linked, s, chunk=N // 4)[0])

  def sigmoid(z, u, s):
    with jax.default_matmul_precision("highest"):
      return chunked_losses.chunked_sigmoid_sum(z, u, keys, s, -s, chunk=N // 4)[0]

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(z, u, np.float32(3.0))
  found = _dot_precisions(jaxpr.jaxpr)
  assert len(found) == 8, found  # per loss call: 1 logits matmul forward; backward: 1 recomputed, dQ and dK
  assert all("HIGHEST" in p for p in found), found
  found = _dot_precisions(jax.make_jaxpr(jax.grad(sigmoid, argnums=(0, 1, 2)))(z, u, np.float32(3.0)).jaxpr)
  assert len(found) >= 3 and all("HIGHEST" in p for p in found), found
