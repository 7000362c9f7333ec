"""The loss and its gradient for one training batch, whole or accumulated exactly over micro-batches.

A contrastive loss couples every row with every other, so averaging the gradients of k small batches is not
the gradient of one batch k times larger (each small batch would see only its own negatives). Exact
accumulation (as in gradient caching) splits the work at the embeddings instead:

  1. embed each micro-batch without keeping activations (a forward pass only): the whole batch's embeddings;
  2. the loss and its gradient w.r.t. those embeddings (and the temperatures) on the whole batch;
  3. re-run each micro-batch's towers with its slice of that gradient as the cotangent (a vector-Jacobian
     product) and sum the parameter gradients.

The result is the whole batch's gradient (up to float summation order), with tower activations held for one
micro-batch at a time: a batch k times larger than fits in device memory. The towers run twice forward, so a
step costs about 4/3 of an unaccumulated one. Micro-batch j takes rows [j r, (j + 1) r) of every device's block
(r = rows per device / k), so no row changes device and each device's static linked prefix stays whole.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from medbind_jax.data import codecs
from medbind_jax.model import MedBind

LOSS_KEYS = ("text_key", "pair_mask", "index")  # the batch fields the objective reads (the towers read the rest)


def embed_batch(model: MedBind, layout, text_mode: str, params, rows: Mapping[str, Any], text_table: jax.Array,
                rng: jax.Array, train: bool = True) -> dict:
  """{'inputs': {modality: [b, d]}, 'reports': {modality: [b, d]}} for `rows` = {'inputs', 'reports'} of a batch.

  Dropout keys come from `rng`, one per tower. Reports of every tmcl modality go through one pass of the text
  tower (or one lookup in `text_table`, the frozen trunk's cached features, then the text head)."""
  variables = {"params": params}

  def embed(modality, inputs, salt):
    return model.apply(variables, modality, inputs, train, method=MedBind.embed,
                       rngs={"dropout": jax.random.fold_in(rng, salt)})

  emb = {"inputs": {m: embed(m, rows["inputs"][m], k) for k, m in enumerate(layout.modalities)}}
  reports = [rows["reports"][m] for m in layout.report_modalities]
  if not reports:
    text_emb = None
  elif text_mode == "cached":
    text_feats = text_table[jnp.concatenate([r["row"] for r in reports])]
    text_emb = model.apply(variables, codecs.TEXT, text_feats, method=MedBind.project)
  else:
    text_emb = embed(codecs.TEXT, jax.tree.map(lambda *a: jnp.concatenate(a), *reports), len(layout.modalities))
  emb["reports"] = dict(zip(layout.report_modalities, jnp.split(text_emb, len(reports)) if reports else []))
  return emb


def loss_and_grads(model: MedBind, layout, text_mode: str, objective: Callable, params, batch: Mapping[str, Any],
                   text_table: jax.Array, rng: jax.Array, *, microbatches: int = 1, shards: int = 1,
                   constrain: Callable[[jax.Array], jax.Array] = lambda x: x):
  """((loss, parts, scales), gradient w.r.t. `params`) of `objective(emb, batch, scales)` on `batch`.

  Args:
    objective: `losses.objective`'s signature without edges (e.g. `losses.sharded_objective(...)`).
    microbatches: k; 1 is one value_and_grad over the whole batch, k > 1 the exact accumulation above.
    shards: the number of device blocks the batch rows are split into (the mesh's batch shards); every
      block's rows must divide by `microbatches`.
    constrain: applied to every micro-batch array (rows first): keeps it split over the devices like the batch.
  """
  loss_batch = {k: batch[k] for k in LOSS_KEYS}

  def scales_of(p):
    return model.apply({"params": p}, method=MedBind.logit_scales)

  def objective_of(emb, p):
    scales = scales_of(p)
    loss, parts = objective(emb, loss_batch, scales)
    return loss, (parts, scales)

  rows = {"inputs": batch["inputs"], "reports": batch["reports"]}
  if microbatches == 1:
    def whole(p):
      return objective_of(embed_batch(model, layout, text_mode, p, rows, text_table, rng), p)

    (loss, (parts, scales)), grads = jax.value_and_grad(whole, has_aux=True)(params)
    return (loss, parts, scales), grads

  k = microbatches
  total = jax.tree.leaves(rows)[0].shape[0]
  if total % (shards * k):
    raise ValueError(f"the batch's {total} rows over {shards} devices do not split into {k} micro-batches "
                     "(optim.microbatches must divide the rows per device)")
  per_block = total // shards // k

  def split(x):  # [B, ...] -> [k, B / k, ...]: micro-batch j = rows j r .. (j + 1) r of every device block
    x = x.reshape(shards, k, per_block, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(k, shards * per_block, *x.shape[3:])

  def merge(x):  # the inverse of split
    x = x.reshape(k, shards, per_block, *x.shape[2:]).swapaxes(0, 1)
    return x.reshape(total, *x.shape[3:])

  micro = jax.tree.map(split, rows)
  micro_rngs = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(k))

  def embed_micro(p, mb, key):
    return embed_batch(model, layout, text_mode, p, jax.tree.map(constrain, mb), text_table, key)

  def forward(_, xs):  # embeddings only: no activations are kept for the backward pass
    mb, key = xs
    return None, jax.lax.stop_gradient(embed_micro(params, mb, key))

  _, stacked = jax.lax.scan(forward, None, (micro, micro_rngs))
  emb = jax.tree.map(merge, stacked)
  (loss, (parts, scales)), (emb_grads, grads) = jax.value_and_grad(objective_of, argnums=(0, 1), has_aux=True)(
      emb, params)  # `grads` so far: the temperatures' (the only parameters outside the towers and heads)
  micro_grads = jax.tree.map(split, emb_grads)

  def backward(acc, xs):  # one micro-batch's towers again, pulled back with its slice of the embedding gradient
    mb, cotangent, key = xs
    _, pull = jax.vjp(lambda p: embed_micro(p, mb, key), params)
    return jax.tree.map(jnp.add, acc, pull(cotangent)[0]), None

  grads, _ = jax.lax.scan(backward, grads, (micro, micro_grads, micro_rngs))
  return (loss, parts, scales), grads
