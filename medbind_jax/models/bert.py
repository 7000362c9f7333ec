"""BERT-family text tower (BERT, Bio_ClinicalBERT, PubMedBERT/BiomedBERT, MiniLM): word + position + token-type
embeddings with LayerNorm, post-LN transformer layers, padding mask.

Input: a dict with `input_ids` int32 [B, L] and `attention_mask` int32 [B, L] (1 = token, 0 = padding; padding
on the right), optionally `token_type_ids` int32 [B, L] (default zeros).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import linen as nn

from medbind_jax.models import layers, register_encoder

POOLINGS = ("cls", "mean", "eos")


def masked_mean(tokens, mask):
  """Mean over the valid tokens: tokens [B, L, C], mask [B, L] -> [B, C] float32 (sentence-transformers' mean)."""
  mask = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(tokens.astype(jnp.float32) * mask, axis=1)
  return total / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def last_token(tokens, mask):
  """Hidden state of the last valid token of each row: tokens [B, L, C], mask [B, L] -> [B, C]."""
  positions = jnp.arange(mask.shape[1])
  last = jnp.max(jnp.where(mask > 0, positions, 0), axis=1)
  return jnp.take_along_axis(tokens, last[:, None, None], axis=1)[:, 0]


class BertEmbeddings(nn.Module):
  """LayerNorm(word + token-type + position embeddings): [B, L] ids -> [B, L, hidden_size]."""

  vocab_size: int
  hidden_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids):
    embed = functools.partial(nn.Embed, features=self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                              embedding_init=layers.DEFAULT_KERNEL_INIT)
    x = (embed(self.vocab_size, name="word_embeddings")(input_ids)
         + embed(self.type_vocab_size, name="token_type_embeddings")(token_type_ids)
         + embed(self.max_position_embeddings, name="position_embeddings")(jnp.arange(input_ids.shape[1]))[None])
    return layers.layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name="norm")(x)


@register_encoder("bert")
class BertEncoder(nn.Module):
  """BERT tower. pooled, chosen by `pooling`: 'cls' (first token), 'mean' (masked mean over attention_mask;
  the sentence-transformers embedding before L2 normalisation) or 'eos' (last non-padding token); then Hugging
  Face's pooler (dense + tanh) when `use_pooler`. tokens = last hidden state [B, L, hidden_size]; values at
  padded positions are meaningless."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  pooling: str = "cls"
  use_pooler: bool = False
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  remat: bool = False

  @property
  def width(self) -> int:
    return self.hidden_size

  def example_inputs(self, batch_size: int = 1, length: int = 8):
    ones = jnp.ones((batch_size, length), jnp.int32)
    return {"input_ids": ones, "attention_mask": ones}

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
    input_ids = inputs["input_ids"]
    length = input_ids.shape[1]
    if length > self.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings {self.max_position_embeddings}")
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    token_type_ids = inputs.get("token_type_ids")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)

    x = BertEmbeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings, self.type_vocab_size,
                       self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="embeddings")(input_ids, token_type_ids)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    mask = (attention_mask > 0)[:, None, None, :]  # [B, 1, 1 (queries), L (keys)]
    block = functools.partial(
        layers.maybe_remat(layers.PostLNBlock, self.remat, static_argnums=(3,)), num_heads=self.num_heads,
        mlp_dim=self.intermediate_size, act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      x = block(name=f"layer_{i}")(x, mask, not train)

    if self.pooling == "cls":
      pooled = x[:, 0]
    elif self.pooling == "mean":
      pooled = masked_mean(x, attention_mask)
    else:
      pooled = last_token(x, attention_mask)
    if self.use_pooler:
      pooled = nn.tanh(nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                kernel_init=layers.DEFAULT_KERNEL_INIT, name="pooler")(pooled))
    return {"pooled": pooled.astype(jnp.float32), "tokens": x}
