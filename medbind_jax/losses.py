"""MEDBind's contrastive objective over a graph of modalities: a weighted sum of edge losses.

An edge binds two modalities and has a kind (DESIGN.md section 4), over a global batch of B rows per modality:

  tmcl (M, text)  1/2 [CE_rows(S, Y) + CE_cols(S, Y)],  S = s_e * Z_M U_M^T,  U_M = embeddings of M's reports,
                  Y_ij = 1[text_j == text_i] / |{j : text_j == text_i}|  (duplicate reports are extra positives)
  sigmoid (M, text)  SigLIP's pairwise loss: -1/B sum_ij log sigmoid(z_ij (s_e * z_i . u_j + b_e)), z_ij = +1 for
                  the same report text (duplicates included), -1 otherwise; b_e a learnable bias per edge
  pair (A, B)     symmetric CE of the rows whose `pair_mask` is set (A and B of one encounter) against B columns
                  (only the masked ones, or every B row of the batch as extra negatives), positive = the
                  partner; a column holding the partner's own record again is no negative; mean over masked
                  rows; 0 when no row is masked. MEDBind's EMCL is pair (cxr, ecg).

  L = sum_e weight_e * loss_e.  MEDBind: (cxr, text, tmcl, 1), (ecg, text, tmcl, 1), (cxr, ecg, pair, lambda).

All functions take *local* rows and *gathered* columns, so the single-device loss and the sharded loss are the
same code: on one device the local rows are the whole batch; under `shard_map` each device scores its rows
against the all-gathered columns and the per-device sums are `psum`med (open_clip's "local loss"). The gradient
of a tiled `all_gather` is a reduce-scatter, so gradients flow into every device's embeddings without extra work.

An edge with `chunk` > 0 streams its logits `chunk` columns at a time (`chunked_losses.py`: an online
log-sum-exp with a custom VJP that recomputes each block), so a device holds [rows, chunk] logits instead of
[rows, B]: the same loss and gradients at batch sizes whose whole logits would not fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

EDGE_KINDS = ("tmcl", "sigmoid", "pair")
TEXT_KINDS = ("tmcl", "sigmoid")  # edges between a modality and its reports
PAIR_NEGATIVES = ("linked", "all")
TEXT = "text"  # the anchor modality of tmcl edges


@dataclasses.dataclass(frozen=True)
class Edge:
  """One contrastive edge. `modalities`: (M, 'text') for tmcl, two non-text modalities for pair; `logit_scale`
  names the learnable temperature it uses (edges naming the same one share it); `negatives` is for pair edges."""

  name: str
  modalities: tuple[str, str]
  kind: str = "tmcl"
  weight: float = 1.0
  logit_scale: str = ""
  negatives: str = "linked"
  chunk: int = 0  # > 0: logits formed `chunk` columns at a time (memory O(rows x chunk); chunked_losses.py)

  def __post_init__(self):
    where = f"loss.edges.{self.name}"
    if self.kind not in EDGE_KINDS:
      raise ValueError(f"{where}: kind must be one of {EDGE_KINDS}, got {self.kind!r}")
    if len(self.modalities) != 2 or self.modalities[0] == self.modalities[1]:
      raise ValueError(f"{where}: modalities must be two different names, got {self.modalities!r}")
    if self.kind in TEXT_KINDS and TEXT not in self.modalities:
      raise ValueError(f"{where}: a {self.kind} edge binds a modality to {TEXT!r}, got {self.modalities!r}")
    if self.kind == "pair" and TEXT in self.modalities:
      raise ValueError(f"{where}: a pair edge binds two non-text modalities of linked records, got "
                       f"{self.modalities!r}; use kind='tmcl' for text")
    if self.negatives not in PAIR_NEGATIVES:
      raise ValueError(f"{where}: negatives must be one of {PAIR_NEGATIVES}, got {self.negatives!r}")
    if not isinstance(self.chunk, int) or self.chunk < 0:
      raise ValueError(f"{where}: chunk must be 0 (whole logits) or a positive column count, got {self.chunk!r}")
    if self.kind in TEXT_KINDS and self.modalities[0] == TEXT:  # canonical order: (M, text)
      object.__setattr__(self, "modalities", (self.modalities[1], TEXT))
    if not self.logit_scale:
      object.__setattr__(self, "logit_scale", self.name)

  @property
  def modality(self) -> str:
    """A text edge's non-text modality."""
    return self.modalities[0]

  @property
  def uses_text(self) -> bool:
    """A modality against its reports (tmcl or sigmoid)."""
    return self.kind in TEXT_KINDS


def bias_name(edge: Edge) -> str:
  """The key of a sigmoid edge's learnable bias among the model's temperatures."""
  return f"bias/{edge.name}"


def edges_from_config(edges_config, *, per_edge_logit_scale: bool = True) -> tuple[Edge, ...]:
  """`config.loss.edges` ({name: {modalities, kind, weight, logit_scale?, negatives?}}) as Edges, sorted by name.

  Without `per_edge_logit_scale`, edges that do not name a temperature share one ('shared')."""
  edges = []
  for name in sorted(edges_config):
    fields = dict(edges_config[name])
    fields["modalities"] = tuple(fields["modalities"])
    if not per_edge_logit_scale and not fields.get("logit_scale"):
      fields["logit_scale"] = "shared"
    edges.append(Edge(name=name, **fields))
  if not edges:
    raise ValueError("config.loss.edges is empty: name at least one contrastive edge")
  return tuple(edges)


def _gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def _psum(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _pmax(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.pmax(x, axis_name)


def _same_text(keys_rows: jax.Array, keys_cols: jax.Array) -> jax.Array:
  """[b, N] bool: row text equals column text. Keys are [.., 2] int32 halves of a 64-bit text hash."""
  return jnp.all(keys_rows[:, None, :] == keys_cols[None, :, :], axis=-1)


def tmcl_sum(mod_emb: jax.Array, text_emb: jax.Array, text_key: jax.Array, scale: jax.Array,
             axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Sum over this device's rows of the TMCL row and column losses, and the global batch size: the definition,
  differentiated by autodiff; `objective` runs `chunked_losses.chunked_tmcl_sum` (the same value and gradients
  with a hand-written VJP and no [b, N] masks, faster), which the tests hold equal to this.

  Args:
    mod_emb, text_emb: [b, d] L2-normalised local embeddings of paired modality / report.
    text_key: [b, 2] int32 text identity keys (equal keys = identical normalised report text).
    scale: scalar logit scale s.
    axis_name: mesh axis to gather over inside `shard_map`, or None on a single device.
  Returns:
    (sum over local rows i of 1/2 (CE_row(i) + CE_col(i)), global batch size B), where CE_col(i) is the loss of
    text i against every modality row of the global batch.

  One logits matmul: the local block S = s * Z_local U_all^T [b, B] gives the row losses directly, and each
  column's log-sum-exp over all B rows is assembled from every device's block: a per-column max (pmax) and a sum
  of exp(S - max) (psum), [B]-vectors instead of a second [b, B] matmul of local texts against gathered
  modality rows. The max is only a shift (log-sum-exp is shift-invariant), so it carries no gradient.
  """
  all_text, all_key = (_gather(x, axis_name) for x in (text_emb, text_key))
  positives = _same_text(text_key, all_key)  # [b, N]; text equality is symmetric: it serves rows and columns
  logits = scale * mod_emb @ all_text.T  # [b, N]: local modality rows vs every text
  positive_logits = jnp.where(positives, logits, 0.0)
  # CE against targets spread evenly over a row's positives = logsumexp(row) - mean of its positive logits
  # (-sum_j Y_ij log_softmax_ij for uniform Y, without forming the softmax).
  row = jax.nn.logsumexp(logits, axis=-1) - positive_logits.sum(-1) / positives.sum(-1)
  col_max = _pmax(jax.lax.stop_gradient(logits.max(axis=0)), axis_name)  # [N]
  col_lse = col_max + jnp.log(_psum(jnp.exp(logits - col_max).sum(axis=0), axis_name))
  col_positive_mean = (_psum(positive_logits.sum(axis=0), axis_name)
                       / _psum(positives.sum(axis=0).astype(jnp.float32), axis_name))
  col = col_lse - col_positive_mean  # [N], the same on every device
  b, n = mod_emb.shape[0], all_key.shape[0]
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  own_columns = jax.lax.dynamic_slice_in_dim(col, offset, b)  # the texts of this device's rows
  return (0.5 * (row + own_columns)).sum(), jnp.asarray(n, jnp.float32)


def sigmoid_sum(mod_emb: jax.Array, text_emb: jax.Array, text_key: jax.Array, scale: jax.Array, bias: jax.Array,
                axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Sum over this device's rows of SigLIP's pairwise sigmoid loss against every text of the global batch, and the
  global batch size (the loss is the sum over all B x B pairs divided by B).

  Every pair is its own binary problem, so rows need no normalisation across devices: each device scores its
  rows against the gathered texts. -log sigmoid(v) is computed as softplus(-v), stable for large |v|.
  """
  all_text, all_key = (_gather(x, axis_name) for x in (text_emb, text_key))
  sign = jnp.where(_same_text(text_key, all_key), 1.0, -1.0)  # [b, N]: duplicates of a row's report are positives
  logits = scale * mod_emb @ all_text.T + bias
  return jax.nn.softplus(-sign * logits).sum(), jnp.asarray(all_key.shape[0], jnp.float32)


def _linked_prefix(rows: int, *arrays):
  """The first `rows` rows of each array (None stays None): a device's static prefix of linked rows."""
  return tuple(None if x is None else x[:rows] for x in arrays)


def pair_sum(a_emb: jax.Array, b_emb: jax.Array, linked: jax.Array, scale: jax.Array,
             negatives: str = "linked", axis_name: str | None = None, a_ids: jax.Array | None = None,
             b_ids: jax.Array | None = None, rows: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Sum over this device's linked rows of the symmetric pair loss (EMCL for CXR-ECG), and the global number of
  linked pairs.

  Row i of `a_emb` and row i of `b_emb` come from the same encounter when `linked[i]`; unlinked rows add
  nothing. Shapes are static; the number of linked pairs is data and only ever used as a count. `a_ids`,
  `b_ids` ([b] int, e.g. record numbers): a column holding the partner's own record at another row (the same
  ECG drawn again by the unlinked pool, or a linked record repeated at an epoch boundary) is the positive
  itself, so it is left out of the negatives rather than pushed away. `rows`: every device's linked rows lie in
  its first `rows` rows (the pipeline's static linked prefix), so only those are scored: against the gathered
  prefixes alone with 'linked' negatives ([rows, devices * rows] logits instead of [b, B]), against every row
  with 'all'.
  """
  if rows == 0:  # no row can be linked (linked_per_batch = 0)
    return jnp.zeros((), jnp.float32), _psum(linked.sum().astype(jnp.float32), axis_name)
  if rows is not None and negatives == "linked":  # every column that can be a negative sits in a prefix
    a_emb, b_emb, linked, a_ids, b_ids = _linked_prefix(rows, a_emb, b_emb, linked, a_ids, b_ids)
    rows = None
  all_a, all_b, all_linked = (_gather(x, axis_name) for x in (a_emb, b_emb, linked))
  b, n = linked.shape[0], all_linked.shape[0]
  r = b if rows is None else rows
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  partner = (offset + jnp.arange(r))[:, None] == jnp.arange(n)[None, :]  # [r, N] global diagonal
  q_a, q_b, q_linked = a_emb[:r], b_emb[:r], linked[:r]
  if negatives == "linked":
    columns = jnp.broadcast_to(all_linked[None, :], (r, n))
  else:
    columns = jnp.ones((r, n), bool)

  def usable(ids):
    """[r, N] columns of one direction: `columns` less the partner's own record elsewhere. Unlinked rows would
    mask out every column in "linked" mode; give them all columns (finite logsumexp, so no NaN reaches the
    gradient) and drop their loss below."""
    keep = columns
    if ids is not None:
      keep = keep & ~((_gather(ids, axis_name)[None, :] == ids[:r, None]) & ~partner)
    return keep | ~q_linked[:, None]

  def directional(q, keys, keep):
    logits = jnp.where(keep, scale * q @ keys.T, -jnp.inf)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.where(partner, logits, 0.0).sum(-1)

  per_row = 0.5 * (directional(q_a, all_b, usable(b_ids)) + directional(q_b, all_a, usable(a_ids)))
  # Count with a psum, not from the gathered mask, so the count is typed as equal on every device.
  return jnp.where(q_linked, per_row, 0.0).sum(), _psum(linked.sum().astype(jnp.float32), axis_name)


def _pair_edge_sum(a_emb, b_emb, linked, scale, negatives, axis_name, a_ids, b_ids, rows: int | None, chunk: int):
  """A pair edge as `objective` runs it: `chunked_losses.chunked_pair_sum` (one custom-VJP block at chunk 0, 4
  matmuls where autodiff of `pair_sum` takes 6) on the linked prefix with 'linked' negatives; with 'all'
  negatives and a prefix but no chunk, `pair_sum` on the prefix rows against every column."""
  if rows == 0 or (rows is not None and negatives == "all" and not chunk):
    return pair_sum(a_emb, b_emb, linked, scale, negatives, axis_name, a_ids, b_ids, rows=rows)
  if rows is not None and negatives == "linked":
    a_emb, b_emb, linked, a_ids, b_ids = _linked_prefix(rows, a_emb, b_emb, linked, a_ids, b_ids)
  return chunked_losses.chunked_pair_sum(a_emb, b_emb, linked, scale, negatives, axis_name, a_ids, b_ids,
                                         chunk=chunk)


def objective(emb: Mapping[str, Mapping[str, jax.Array]], batch: Mapping[str, Mapping[str, jax.Array]],
              scales: Mapping[str, jax.Array], edges: Sequence[Edge], axis_name: str | None = None,
              precision: str | None = "highest", linked_rows: int | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss L = sum_e weight_e * loss_e and each edge's loss.

  Args:
    emb: {'inputs': {modality: [b, d]}, 'reports': {modality: [b, d]}} normalised embeddings of the local rows
      and of their reports (for the modalities of tmcl edges).
    batch: {'text_key': {modality: [b, 2] int32}, 'pair_mask': {pair edge name: [b] bool}} and optionally
      'index': {modality: [b] int} record ids (pair edges then keep a partner's own record out of its negatives).
    scales: logit scale per temperature name (already exponentiated and clipped), and for sigmoid edges their
      bias under `bias_name(edge)`.
    edges: the objective's edges.
    axis_name: data axis when called inside `shard_map`; None on a single device.
    precision: the contrastive matmuls' precision (`jax.default_matmul_precision` names: 'highest' = full
      float32, 'tensorfloat32', 'bfloat16'); None: the platform default.
    linked_rows: the static prefix of every device's rows that holds its linked rows (`pipeline.BatchSpec.
      linked_rows_per_shard`); pair edges then score only those. None: any row may be linked.
  Returns:
    (loss, {'loss/<edge>': value, 'num_pairs/<pair edge>': count}) with identical values on every device.
  """
  parts, loss = {}, jnp.zeros((), jnp.float32)
  # Scales up to 100 amplify rounding in the logits: on accelerators, bf16/TF32 passes unless `precision` says.
  with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
    for edge in edges:
      scale = scales[edge.logit_scale]
      if edge.uses_text:
        m = edge.modality
        args = (emb["inputs"][m], emb["reports"][m], batch["text_key"][m], scale)
        if edge.kind == "tmcl":  # chunk 0: one block (the custom VJP is faster than autodiff of tmcl_sum)
          total, count = chunked_losses.chunked_tmcl_sum(*args, axis_name=axis_name, chunk=edge.chunk)
        elif edge.chunk:
          total, count = chunked_losses.chunked_sigmoid_sum(*args, scales[bias_name(edge)], axis_name=axis_name,
                                                            chunk=edge.chunk)
        else:
          total, count = sigmoid_sum(*args, scales[bias_name(edge)], axis_name=axis_name)
        value = _psum(total, axis_name) / count
      else:
        a, b = edge.modalities
        ids = batch.get("index", {})
        total, count = _pair_edge_sum(emb["inputs"][a], emb["inputs"][b], batch["pair_mask"][edge.name], scale,
                                      edge.negatives, axis_name, ids.get(a), ids.get(b), linked_rows, edge.chunk)
        value = _psum(total, axis_name) / jnp.maximum(count, 1.0)
        parts[f"num_pairs/{edge.name}"] = count
      parts[f"loss/{edge.name}"] = value
      loss = loss + edge.weight * value
  return loss, parts


def sharded_objective(mesh: Mesh, edges: Sequence[Edge], axis_name: str | tuple[str, ...] = "data",
                      precision: str | None = "highest", linked_rows: int | None = None):
  """`objective` under `jax.shard_map`: batch arrays are split over `axis_name` (one mesh axis or several, in
  order), scales replicated.

  The result is a function of (emb, batch, scales) with `objective`'s result, usable inside jit.
  """

  def local(emb, batch, scales):
    return objective(emb, batch, scales, edges, axis_name=axis_name, precision=precision, linked_rows=linked_rows)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(axis_name), P(axis_name), P()), out_specs=(P(), P()))


# The chunked forms build on the helpers above; imported last, as they import this module.
from medbind_jax import chunked_losses  # noqa: E402  pylint: disable=wrong-import-position
