"""MEDBind's contrastive losses: TMCL (text <-> modality, multi-positive) and EMCL (CXR <-> ECG on linked pairs).

Definitions (DESIGN.md section 4), over a global batch of B CXR-text pairs and B ECG-text pairs:

  TMCL_M = 1/2 [CE_rows(S, Y) + CE_cols(S, Y)],  S = s_M * Z_M U_M^T,
           Y_ij = 1[text_j == text_i] / |{j : text_j == text_i}|  (duplicate reports are extra positives)
  EMCL   = symmetric CE of linked CXRs against ECG columns (only the linked ECGs, or every ECG of the batch as
           extra negatives), positive = the partner ECG; mean over linked rows; 0 when no row is linked.
  L      = TMCL_cxr + TMCL_ecg + lambda * EMCL

All functions take *local* rows and *gathered* columns, so the single-device loss and the sharded loss are the
same code: on one device the local rows are the whole batch; under `shard_map` each device scores its rows
against the all-gathered columns and the per-device sums are `psum`med (open_clip's "local loss"). The gradient
of a tiled `all_gather` is a reduce-scatter, so gradients flow into every device's embeddings without extra work.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

EDGES = ("cxr_text", "ecg_text", "cxr_ecg")
EMCL_NEGATIVES = ("linked", "all")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  emcl_weight: float = 1.0  # lambda; 0 is the paper's "unbound" ablation
  emcl_negatives: str = "linked"  # "linked": only linked ECGs are columns; "all": every ECG of the batch

  def __post_init__(self):
    if self.emcl_negatives not in EMCL_NEGATIVES:
      raise ValueError(f"emcl_negatives must be one of {EMCL_NEGATIVES}, got {self.emcl_negatives!r}")


def multi_positive_ce(logits: jax.Array, positives: jax.Array) -> jax.Array:
  """Per-row cross-entropy against targets spread evenly over each row's positives.

  Args:
    logits: [b, N]. positives: [b, N] bool, at least one True per row.
  Returns:
    [b] losses. Uses CE(Y) = logsumexp(row) - mean of the positive logits, which equals
    -sum_j Y_ij log_softmax_ij for Y uniform over the positives and never forms the softmax itself.
  """
  lse = jax.nn.logsumexp(logits, axis=-1)
  num_pos = positives.sum(-1)
  return lse - jnp.where(positives, logits, 0.0).sum(-1) / num_pos


def _gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def _psum(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _same_text(keys_rows: jax.Array, keys_cols: jax.Array) -> jax.Array:
  """[b, N] bool: row text equals column text. Keys are [.., 2] int32 halves of a 64-bit text hash."""
  return jnp.all(keys_rows[:, None, :] == keys_cols[None, :, :], axis=-1)


def tmcl_sum(mod_emb: jax.Array, text_emb: jax.Array, text_key: jax.Array, scale: jax.Array,
             axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Sum over this device's rows of the TMCL row and column losses, and the global batch size.

  Args:
    mod_emb, text_emb: [b, d] L2-normalised local embeddings of paired modality / report.
    text_key: [b, 2] int32 text identity keys (equal keys = identical normalised report text).
    scale: scalar logit scale s.
    axis_name: mesh axis to gather over inside `shard_map`, or None on a single device.
  Returns:
    (sum over local rows of 1/2 (CE_row + CE_col), global batch size B).
  """
  all_mod, all_text, all_key = (_gather(x, axis_name) for x in (mod_emb, text_emb, text_key))
  positives = _same_text(text_key, all_key)  # text equality is symmetric: the same mask serves both CEs
  row_logits = scale * mod_emb @ all_text.T  # local modality rows vs every text
  col_logits = scale * text_emb @ all_mod.T  # local text rows vs every modality sample
  local = 0.5 * (multi_positive_ce(row_logits, positives) + multi_positive_ce(col_logits, positives))
  return local.sum(), jnp.asarray(all_key.shape[0], jnp.float32)


def emcl_sum(cxr_emb: jax.Array, ecg_emb: jax.Array, linked: jax.Array, scale: jax.Array,
             negatives: str = "linked", axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Sum over this device's linked rows of the symmetric EMCL loss, and the global number of linked pairs.

  Row i of `cxr_emb` and row i of `ecg_emb` come from the same encounter when `linked[i]`; unlinked rows add
  nothing. Shapes are static; the number of linked pairs is data and only ever used as a count.
  """
  all_cxr, all_ecg, all_linked = (_gather(x, axis_name) for x in (cxr_emb, ecg_emb, linked))
  b, n = linked.shape[0], all_linked.shape[0]
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * b
  partner = (offset + jnp.arange(b))[:, None] == jnp.arange(n)[None, :]  # [b, N] global diagonal
  if negatives == "linked":
    columns = jnp.broadcast_to(all_linked[None, :], (b, n))
  else:
    columns = jnp.ones((b, n), bool)
  # Unlinked rows would mask out every column in "linked" mode; give them all columns (finite logsumexp, so no
  # NaN reaches the gradient) and drop their loss below.
  columns = columns | ~linked[:, None]

  def directional(q, keys):
    logits = jnp.where(columns, scale * q @ keys.T, -jnp.inf)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.where(partner, logits, 0.0).sum(-1)

  per_row = 0.5 * (directional(cxr_emb, all_ecg) + directional(ecg_emb, all_cxr))
  # Count with a psum, not from the gathered mask, so the count is typed as equal on every device.
  return jnp.where(linked, per_row, 0.0).sum(), _psum(linked.sum().astype(jnp.float32), axis_name)


def medbind_loss(emb: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], scales: Mapping[str, jax.Array],
                 config: LossConfig, axis_name: str | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss L = TMCL_cxr + TMCL_ecg + lambda * EMCL and its parts.

  Args:
    emb: {'cxr', 'cxr_text', 'ecg', 'ecg_text'} -> [b, d] normalised embeddings (local rows).
    batch: {'cxr_text_key', 'ecg_text_key'} -> [b, 2] int32 and {'linked'} -> [b] bool.
    scales: logit scale per edge in EDGES (already exponentiated and clipped).
    axis_name: data axis when called inside `shard_map`; None on a single device.
  Returns:
    (loss, metrics) with identical values on every device.
  """
  parts = {}
  for mod in ("cxr", "ecg"):
    total, count = tmcl_sum(emb[mod], emb[f"{mod}_text"], batch[f"{mod}_text_key"], scales[f"{mod}_text"],
                            axis_name)
    parts[f"tmcl_{mod}"] = _psum(total, axis_name) / count
  total, num_linked = emcl_sum(emb["cxr"], emb["ecg"], batch["linked"], scales["cxr_ecg"],
                               config.emcl_negatives, axis_name)
  parts["emcl"] = _psum(total, axis_name) / jnp.maximum(num_linked, 1.0)
  loss = parts["tmcl_cxr"] + parts["tmcl_ecg"] + config.emcl_weight * parts["emcl"]
  parts["num_linked"] = num_linked
  return loss, parts


def sharded_medbind_loss(mesh: Mesh, config: LossConfig, axis_name: str = "data"):
  """`medbind_loss` under `jax.shard_map`: batch arrays are split over `axis_name`, scales replicated.

  The result is a function with the signature of `medbind_loss` minus `config`/`axis_name`, usable inside jit.
  """

  def local(emb, batch, scales):
    return medbind_loss(emb, batch, scales, config, axis_name=axis_name)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(axis_name), P(axis_name), P()),
                       out_specs=(P(), P()))
