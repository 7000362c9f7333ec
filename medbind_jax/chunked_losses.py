"""Chunked ("memory-efficient") TMCL, pair and sigmoid edge losses: the values and gradients of `losses.tmcl_sum`,
`losses.pair_sum` and `losses.sigmoid_sum` without ever forming a [b, N] logits block.

The unchunked losses score this device's b rows against all N gathered columns at once, so their temporaries
(logits, masks, softmaxes and their gradients) grow as b x N per device: at B = 4096 on one device that is several
64 MiB blocks. Here the gathered columns ([N, d], small) are cut into N / chunk column blocks, and a `lax.scan`
streams over them with an online log-sum-exp, flash-attention style, so only O(b x chunk) logits are live:

  forward   per block: S = (s Q) K_c^T [b, c]; the rows' running max and sum of exp (online log-sum-exp), and the
            columns' log-sum-exp over this device's rows (complete within the block: a column's rows are all here).
  backward  a `jax.custom_vjp` that saved only Q, K, s, the row log-sum-exps [b] and the column ones [N]: per
            block it recomputes S and dS = g_row softmax_row(S) + g_col softmax_col(S), then accumulates
            d(sQ) += dS K_c and writes dK_c = dS^T (sQ): one logits and two gradient matmuls per block.

Why a custom_vjp and not `jax.checkpoint` on the scan body: both recompute each block's logits once in the backward
(4 matmuls in all instead of 3), but AD of the checkpointed body also carries cotangents back through the online
max / rescale chain and keeps more of each block's intermediates live; measured on one CPU device at B = 4096 (TMCL
log-sum-exps, value and gradient), the checkpointed scan took 37 / 21 MiB of temporaries at chunk = B/4 / B/8
against 25 / 16.5 MiB here, at 1.05-1.1x the time.

The linear parts need no streaming at all: a row's mean positive logit is s z_i . (sum of the texts equal to text i)
/ their count, so the positives (duplicate report texts) are handled with per-text group sums ([N, d] segment sums
over text groups found by sorting the keys) instead of a [b, N] equality mask, and a pair edge's partner logit is
s a_i . b_i. Only the log-sum-exps stream. A pair edge's two directions share one logits block S = s A B^T: A -> B
are its rows and B -> A its columns (each with its own mask, rebuilt per block from [b] / [N] vectors), so the
chunked pair edge does 4 matmuls where `losses.pair_sum` does 6.

Under `shard_map` the column log-sum-exp over all N rows of every device is combined once, after the scan, from the
per-device column log-sum-exps ([N] vectors: a stop-gradient pmax and a psum, as in `losses.tmcl_sum`), rather than
once per chunk; the result is the same, with one pair of small collectives instead of N / chunk.

With chunk = 0 (one block, no scan) the same custom VJP is also the fastest whole-logits form (no [b, N] masks,
4 matmuls for a pair edge): `losses.objective` runs tmcl edges and 'linked' pair edges through it whatever their
chunk, and keeps `losses.tmcl_sum` / `pair_sum`, plain autodiff of the definitions, as the reference they equal.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from medbind_jax.losses import PAIR_NEGATIVES, _gather, _pmax, _psum


def _num_chunks(n: int, chunk: int, what: str) -> int:
  """How many column blocks of `chunk` the N = `n` gathered columns split into; chunk = 0 or >= N is one block."""
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
    raise ValueError(f"{what}: chunk must be a non-negative int (0: one block), got {chunk!r}")
  if chunk == 0 or chunk >= n:
    return 1
  if n % chunk:
    raise ValueError(f"{what}: chunk={chunk} does not divide the global column count N={n} (the batch gathered "
                     f"over the mesh); use a divisor of {n}, or chunk >= {n} for no chunking")
  return n // chunk


def _varying(x: jax.Array, axis_name: str | None) -> jax.Array:
  """`x` typed as device-varying inside `shard_map`, so a custom_vjp sees one per-device value and AD of the cast
  (a psum) sums its per-device gradients, as it does for a replicated scale used in a per-device loss."""
  if axis_name is None:
    return x
  aval = jax.typeof(x)  # the varying axes: `manual_axis_type.varying` in current JAX, `vma` before
  varying = getattr(getattr(aval, "manual_axis_type", None), "varying", getattr(aval, "vma", frozenset()))
  if axis_name in varying:
    return x
  return jax.lax.pcast(x, axis_name, to="varying")


def _group_ids(keys: jax.Array) -> jax.Array:
  """[N] int32 group of each text key ([N, 2] int32 halves of a hash): equal keys share an id in [0, N). Found by a
  lexicographic sort (N log N), not an N x N comparison."""
  keys = jnp.asarray(keys)
  order = jnp.lexsort((keys[:, 1], keys[:, 0]))
  ordered = keys[order]
  starts = jnp.concatenate([jnp.zeros((1,), bool), jnp.any(ordered[1:] != ordered[:-1], axis=-1)])
  return jnp.zeros(keys.shape[0], jnp.int32).at[order].set(jnp.cumsum(starts, dtype=jnp.int32))


def _split(x: jax.Array | None, num: int) -> jax.Array | None:
  """[N, ...] -> [num, N / num, ...] column blocks for the scan."""
  return None if x is None else x.reshape((num, x.shape[0] // num) + x.shape[1:])


def _scan(body, init, xs, num: int):
  """`lax.scan` over the `num` column blocks; one block is a plain call (a simpler program, the unchunked one)."""
  if num > 1:
    return jax.lax.scan(body, init, xs)
  carry, out = body(init, jax.tree.map(lambda x: x[0], xs))
  return carry, jax.tree.map(lambda x: x[None], out)


def _precision(precision: str | None):
  """The matmul precision context captured at the loss call (see `_matmul_precision`), or none."""
  return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()


def _mask_block(spec, rows, cols):
  """[b, c] bool: the logits one direction keeps in a column block, or None for all.

  `spec` = ((row_ok, row_ids, row_open), (col_ok, col_ids, col_open)), each [b] (rows) or this block's [c]
  (columns), or None. A logit is kept where its row and column are ok and it is not a partner's own record at another
  column (equal ids off the global diagonal), or where its row or column is open (keeps everything: the rows of
  unlinked pairs, whose losses are dropped, so that every log-sum-exp is finite). `rows` = the [b] global column of
  each row's partner, `cols` = this block's [c] global column numbers."""
  (row_ok, row_ids, row_open), (col_ok, col_ids, col_open) = spec
  terms = [] if row_ok is None else [row_ok[:, None]]
  terms += [] if col_ok is None else [col_ok[None, :]]
  if row_ids is not None:
    terms.append(~((row_ids[:, None] == col_ids[None, :]) & (rows[:, None] != cols[None, :])))
  opens = ([] if row_open is None else [row_open[:, None]]) + ([] if col_open is None else [col_open[None, :]])
  if not terms:
    return None
  keep = functools.reduce(jnp.logical_and, terms)
  keep = functools.reduce(jnp.logical_or, opens, keep)
  return jnp.broadcast_to(keep, (rows.shape[0], cols.shape[0]))


def _masked(logits, spec, rows, cols):
  """`logits` with the entries `spec` drops at -inf (they then add exp(-inf) = 0 to sums and gradients)."""
  keep = None if spec is None else _mask_block(spec, rows, cols)
  return logits if keep is None else jnp.where(keep, logits, -jnp.inf)


def _finite_or_zero(m: jax.Array) -> jax.Array:
  """A log-sum-exp shift that is 0 where every logit so far was masked (-inf), so exp(-inf - shift) = 0, not NaN."""
  return jnp.where(jnp.isfinite(m), m, 0.0)


def _scan_inputs(keys, masks, num):
  """The scan's per-block inputs: key rows, global column numbers, and the column parts of the masks' specs."""
  col_parts = jax.tree.map(lambda x: _split(x, num), tuple(None if m is None else m[1] for m in masks))
  return _split(keys, num), _split(jnp.arange(keys.shape[0]), num), col_parts


def _block_specs(masks, col_parts):
  return tuple(None if m is None else (m[0], c) for m, c in zip(masks, col_parts))


def _lse_forward(num: int, with_cols: bool, precision, q, keys, scale, rows, masks):
  """Row log-sum-exps [b] of S = s Q K^T and, with `with_cols`, its column log-sum-exps over these rows [N] (-inf
  for a column all of whose entries here are masked); `masks` = (row direction's spec, column direction's spec)."""
  qs = scale * q

  def body(carry, x):
    row_max, row_sum = carry
    k, cols, col_parts = x
    row_spec, col_spec = _block_specs(masks, col_parts)
    with _precision(precision):
      logits = qs @ k.T  # [b, c]
    row_logits = _masked(logits, row_spec, rows, cols)
    new_max = jnp.maximum(row_max, row_logits.max(axis=1))
    shift = _finite_or_zero(new_max)
    row_sum = row_sum * jnp.exp(row_max - shift) + jnp.exp(row_logits - shift[:, None]).sum(axis=1)
    col_lse = None
    if with_cols:
      col_logits = _masked(logits, col_spec, rows, cols)
      col_shift = _finite_or_zero(col_logits.max(axis=0))
      col_lse = col_shift + jnp.log(jnp.exp(col_logits - col_shift[None, :]).sum(axis=0))
    return (new_max, row_sum), col_lse

  init = (jnp.full_like(qs[:, 0], -jnp.inf), jnp.zeros_like(qs[:, 0]))  # typed like Q (device-varying)
  (row_max, row_sum), col_lse = _scan(body, init, _scan_inputs(keys, masks, num), num)
  return row_max + jnp.log(row_sum), (col_lse.reshape(keys.shape[0]) if with_cols else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked_lse(num, with_cols, precision, q, keys, scale, rows, masks):
  """(row log-sum-exps [b], column log-sum-exps over these rows [N] or None) of S = s Q K^T, streamed over `num`
  column blocks, whose backward recomputes each block instead of saving it.

  `rows`: [b] int global column of each row's partner (the diagonal of the global S); `masks`: (row direction's,
  column direction's) mask spec (see `_mask_block`), or None for no mask."""
  return _lse_forward(num, with_cols, precision, q, keys, scale, rows, masks)


def _chunked_lse_fwd(num, with_cols, precision, q, keys, scale, rows, masks):
  row_lse, col_lse = _lse_forward(num, with_cols, precision, q, keys, scale, rows, masks)
  return (row_lse, col_lse), (q, keys, scale, rows, masks, row_lse, col_lse)


def _chunked_lse_bwd(num, with_cols, precision, residuals, cotangents):
  q, keys, scale, rows, masks, row_lse, col_lse = residuals
  g_row, g_col = cotangents
  qs = scale * q
  columns = (_split(g_col, num), _split(_finite_or_zero(col_lse), num)) if with_cols else None

  def body(d_qs, x):
    (k, cols, col_parts), column = x
    row_spec, col_spec = _block_specs(masks, col_parts)
    with _precision(precision):
      logits = qs @ k.T
    # dS = g_row softmax over the row + g_col softmax over the column, each over its own direction's kept logits.
    d_logits = g_row[:, None] * jnp.exp(_masked(logits, row_spec, rows, cols) - row_lse[:, None])
    if with_cols:
      g_col_block, col_lse_block = column
      d_logits = d_logits + g_col_block[None, :] * jnp.exp(_masked(logits, col_spec, rows, cols)
                                                           - col_lse_block[None, :])
    with _precision(precision):
      return d_qs + d_logits @ k, d_logits.T @ qs

  d_qs, d_keys = _scan(body, jnp.zeros_like(qs), (_scan_inputs(keys, masks, num), columns), num)
  no_cotangent = jax.tree.map(lambda _: None, (rows, masks))
  return (scale * d_qs, d_keys.reshape(keys.shape), jnp.sum(d_qs * q).astype(scale.dtype)) + no_cotangent


_chunked_lse.defvjp(_chunked_lse_fwd, _chunked_lse_bwd)


def _matmul_precision() -> str | None:
  """The `jax.default_matmul_precision` in force where the loss is called (`losses.objective` sets one): passed to
  the custom_vjp explicitly, because its backward is traced later, outside that context."""
  return jax.config.jax_default_matmul_precision


def chunked_tmcl_sum(mod_emb: jax.Array, text_emb: jax.Array, text_key: jax.Array, scale: jax.Array,
                     axis_name: str | None = None, *, chunk: int) -> tuple[jax.Array, jax.Array]:
  """`losses.tmcl_sum` (same arguments, value and gradients) with O(b x chunk) logits memory per device.

  `chunk`: columns per block of the N gathered texts; must divide N, or be >= N (one block, the unchunked result).
  Returns (sum over local rows of 1/2 (CE_row + CE_col), global batch size N).
  """
  all_text, all_key, all_mod = (_gather(x, axis_name) for x in (text_emb, text_key, mod_emb))
  b, n = mod_emb.shape[0], all_key.shape[0]
  num = _num_chunks(n, chunk, "chunked_tmcl_sum")
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  # Positives: the mean positive logit of row i is s z_i . (sum of the texts equal to text i) / their count, and
  # that of column (text) j is s u_j . (sum of the modality rows whose text equals text j) / the same count.
  group = _group_ids(all_key)
  size = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), group, num_segments=n)
  text_sums = jax.ops.segment_sum(all_text, group, num_segments=n)  # [N, d], indexed by group
  mod_sums = jax.ops.segment_sum(all_mod, group, num_segments=n)
  own = jax.lax.dynamic_slice_in_dim(group, offset, b)  # the groups of this device's rows
  row_positive = scale * jnp.sum(mod_emb * text_sums[own], axis=-1) / size[own]
  col_positive = scale * jnp.sum(text_emb * mod_sums[own], axis=-1) / size[own]

  s = _varying(jnp.asarray(scale), axis_name)
  row_lse, col_lse = _chunked_lse(num, True, _matmul_precision(), mod_emb, all_text, s, None, (None, None))
  if axis_name is not None:  # each column's log-sum-exp over the rows of every device; the max is only a shift
    col_max = _pmax(jax.lax.stop_gradient(col_lse), axis_name)
    col_lse = col_max + jnp.log(_psum(jnp.exp(col_lse - col_max), axis_name))
  own_col_lse = jax.lax.dynamic_slice_in_dim(col_lse, offset, b)
  total = 0.5 * ((row_lse - row_positive) + (own_col_lse - col_positive))
  return total.sum(), jnp.asarray(n, jnp.float32)


def chunked_pair_sum(a_emb: jax.Array, b_emb: jax.Array, linked: jax.Array, scale: jax.Array,
                     negatives: str = "linked", axis_name: str | None = None, a_ids: jax.Array | None = None,
                     b_ids: jax.Array | None = None, *, chunk: int) -> tuple[jax.Array, jax.Array]:
  """`losses.pair_sum` (same arguments, value and gradients) with O(b x chunk) logits memory per device.

  The column masks (linked columns in 'linked' mode; a partner's own record at another column) are rebuilt per
  block from [N] vectors; unlinked rows keep every column (a finite log-sum-exp) and their loss is dropped, so zero
  linked rows give 0 and zero gradients. Returns (sum over local linked rows, global number of linked pairs).
  """
  if negatives not in PAIR_NEGATIVES:
    raise ValueError(f"chunked_pair_sum: negatives must be one of {PAIR_NEGATIVES}, got {negatives!r}")
  all_b, all_linked = _gather(b_emb, axis_name), _gather(linked, axis_name)
  b, n = linked.shape[0], all_linked.shape[0]
  num = _num_chunks(n, chunk, "chunked_pair_sum")
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  ok, all_ok = (linked, all_linked) if negatives == "linked" else (None, None)
  all_a_ids, all_b_ids = (None if ids is None else _gather(ids, axis_name) for ids in (a_ids, b_ids))
  # One logits block S = s A_local B_all^T serves both directions: its rows are A -> B (the B columns of a local A
  # row), its columns B -> A (column j holds the A rows scored against B row j), each with its own mask:
  #   A -> B  row i keeps B column j if linked_j ('linked') and b_id_j != b_id_i off the diagonal, or i unlinked;
  #   B -> A  column j keeps A row i if linked_i ('linked') and a_id_i != a_id_j off the diagonal, or j unlinked.
  # Column log-sum-exps over this device's A rows are combined over devices below, as in tmcl.
  masks = (None if ok is None and b_ids is None else ((None, b_ids, ~linked), (all_ok, all_b_ids, None)),
           None if ok is None and a_ids is None else ((ok, a_ids, None), (None, all_a_ids, ~all_linked)))
  s = _varying(jnp.asarray(scale), axis_name)
  lse_ab, col_lse = _chunked_lse(num, True, _matmul_precision(), a_emb, all_b, s, offset + jnp.arange(b), masks)
  if axis_name is not None:
    col_max = _finite_or_zero(_pmax(jax.lax.stop_gradient(col_lse), axis_name))
    col_lse = col_max + jnp.log(_psum(jnp.exp(col_lse - col_max), axis_name))
  lse_ba = jax.lax.dynamic_slice_in_dim(col_lse, offset, b)  # B -> A for this device's B rows
  partner = jnp.sum((scale * a_emb) * b_emb, axis=-1)  # the partner of local row i is local column i
  per_row = 0.5 * ((lse_ab - partner) + (lse_ba - partner))
  return jnp.where(linked, per_row, 0.0).sum(), _psum(linked.sum().astype(jnp.float32), axis_name)


def chunked_sigmoid_sum(mod_emb: jax.Array, text_emb: jax.Array, text_key: jax.Array, scale: jax.Array,
                        bias: jax.Array, axis_name: str | None = None, *, chunk: int) -> tuple[jax.Array, jax.Array]:
  """`losses.sigmoid_sum` (same arguments, value and gradients) with O(b x chunk) logits memory per device.

  Every pair is its own binary problem (no normaliser), so the chunks are independent terms of one sum: a scan
  whose body is `jax.checkpoint`ed saves nothing per chunk but the running sum, and AD recomputes each block in the
  backward. Duplicate reports (positives) are found per block by comparing text group ids, one int per column.
  """
  all_text, all_key = (_gather(x, axis_name) for x in (text_emb, text_key))
  b, n = mod_emb.shape[0], all_key.shape[0]
  num = _num_chunks(n, chunk, "chunked_sigmoid_sum")
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  group = _group_ids(all_key)
  own = jax.lax.dynamic_slice_in_dim(group, offset, b)
  qs = scale * mod_emb

  @jax.checkpoint
  def body(total, x):
    k, col_group = x
    sign = jnp.where(own[:, None] == col_group[None, :], 1.0, -1.0)
    return total + jax.nn.softplus(-sign * (qs @ k.T + bias)).sum(), None

  total, _ = _scan(body, jnp.zeros_like(qs[0, 0]), (_split(all_text, num), _split(group, num)), num)
  return total, jnp.asarray(n, jnp.float32)
