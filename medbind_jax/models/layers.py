"""Building blocks shared by the encoder towers: attention, MLP, stochastic depth, pre-/post-LN blocks.

Shapes use `...` for any leading batch dimensions: ViT/ECG tokens are [B, T, C], Swin windows are
[B, windows, T, C]. Every matmul runs in the module's `dtype` (compute dtype) with parameters stored in
`param_dtype`; attention logits and softmax are always float32.

Submodule names (`query`, `key`, `value`, `out`, `fc1`, `fc2`, `norm1`, ...) are the names the Hugging Face
loader (`hf_loading.py`) maps checkpoint keys onto, so renaming one here means renaming it there.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any

# Random init as Hugging Face does for these families: weights drawn with std 0.02 (truncated at 2 std).
DEFAULT_KERNEL_INIT = nn.initializers.truncated_normal(0.02)

ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # erf form, as torch's default GELU
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  # Two-pass variance (mean of squared deviations) like torch, not E[x^2] - E[x]^2, which loses digits.
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name)


def maybe_remat(block_cls: type[nn.Module], enabled: bool, static_argnums: tuple[int, ...] = (2,)):
  """`nn.remat(block_cls)` when enabled. `static_argnums` counts `self` as 0: (2,) is `deterministic` in
  `__call__(self, x, deterministic)`; Python booleans must be static to choose dropout on/off."""
  return nn.remat(block_cls, static_argnums=static_argnums) if enabled else block_cls


class Attention(nn.Module):
  """Multi-head self-attention over the second-to-last axis of x [..., T, C].

  `bias` is added to the float32 logits (broadcastable to [..., heads, T, T]; Swin's relative position bias and
  shift mask); `mask` is boolean (broadcastable to [..., heads, T, T]; False = do not attend).
  """

  num_heads: int
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, bias=None, mask=None, deterministic: bool = True):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    dense = functools.partial(nn.Dense, width, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=DEFAULT_KERNEL_INIT)

    def split_heads(y):
      return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

    query = split_heads(dense(use_bias=self.qkv_bias, name="query")(x))
    key = split_heads(dense(use_bias=self.qkv_bias, name="key")(x))
    value = split_heads(dense(use_bias=self.qkv_bias, name="value")(x))

    logits = jnp.einsum("...qhd,...khd->...hqk", query, key, preferred_element_type=jnp.float32)
    logits = logits * (head_dim ** -0.5)
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)

    out = jnp.einsum("...hqk,...khd->...qhd", probs.astype(self.dtype), value)
    out = out.reshape(*out.shape[:-2], width)
    return dense(name="out")(out)


class Mlp(nn.Module):
  """fc1 -> activation -> fc2, back to the input width."""

  hidden_dim: int
  act: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=DEFAULT_KERNEL_INIT)
    x = dense(self.hidden_dim, name="fc1")(x)
    x = activation(self.act)(x)
    return dense(width, name="fc2")(x)


class DropPath(nn.Module):
  """Stochastic depth: drops a whole residual branch per example with probability `rate` (training only)."""

  rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


class PreLNBlock(nn.Module):
  """Pre-LN transformer block (ViT, ECG transformer, Swin): x + attend(LN(x)), then x + MLP(LN(x)).

  LayerNorm and the MLP act per token, so x may carry any layout [..., C]; only `attend`, the token mixer,
  needs to know it. Subclasses override `attend` (Swin: windowed attention over a [B, H, W, C] map).
  """

  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.norm1 = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype)
    self.attn = Attention(self.num_heads, qkv_bias=self.qkv_bias, dropout_rate=self.attention_dropout_rate,
                          dtype=self.dtype, param_dtype=self.param_dtype)
    self.norm2 = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype)
    self.mlp = Mlp(self.mlp_dim, act=self.act, dtype=self.dtype, param_dtype=self.param_dtype)
    self.dropout = nn.Dropout(self.dropout_rate)
    self.drop_path = DropPath(self.drop_path_rate)

  def attend(self, x, deterministic: bool):
    """Token mixer: global self-attention over the token axis of x [B, T, C]."""
    return self.attn(x, deterministic=deterministic)

  def __call__(self, x, deterministic: bool = True):
    y = self.attend(self.norm1(x), deterministic)
    x = x + self.drop_path(self.dropout(y, deterministic=deterministic), deterministic)
    y = self.mlp(self.norm2(x))
    return x + self.drop_path(self.dropout(y, deterministic=deterministic), deterministic)


class PostLNBlock(nn.Module):
  """Post-LN transformer block (BERT): LN(x + attention(x)), then LN(x + MLP(x)). mask: bool [B, 1, 1, T]."""

  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  layer_norm_eps: float = 1e-12
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic: bool = True):
    dropout = nn.Dropout(self.dropout_rate)
    y = Attention(self.num_heads, qkv_bias=self.qkv_bias, dropout_rate=self.attention_dropout_rate,
                  dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
                      x, mask=mask, deterministic=deterministic)
    x = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name="attn_norm")(
        x + dropout(y, deterministic=deterministic))
    y = Mlp(self.mlp_dim, act=self.act, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(x)
    return layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name="mlp_norm")(
        x + dropout(y, deterministic=deterministic))


# --- Images ----------------------------------------------------------------------------------------------------

def as_pair(size: int | tuple[int, int]) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def adapt_channels(images, num_channels: int):
  """Repeats a 1-channel image [B, H, W, 1] to `num_channels` (grayscale CXR into an RGB checkpoint)."""
  if images.shape[-1] == num_channels:
    return images
  if images.shape[-1] == 1:
    return jnp.repeat(images, num_channels, axis=-1)
  raise ValueError(f"images have {images.shape[-1]} channels, the encoder expects {num_channels} (or 1)")


# --- Position-embedding resizing -------------------------------------------------------------------------------

def _torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] matrix of torch's `interpolate(mode='bicubic', align_corners=False)` along one axis.

  torch samples source coordinate (i + 0.5) * in/out - 0.5, takes the 4 neighbours around it with Keys' cubic
  convolution (A = -0.75) and clamps neighbour indices to the border; no antialiasing when downsampling.
  Hugging Face's `interpolate_pos_encoding` is exactly this, applied separably over rows then columns.
  """
  a = -0.75
  weights = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5
    left = int(np.floor(src))
    t = src - left
    taps = (
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    )
    for offset, w in zip(range(-1, 3), taps):
      weights[i, min(max(left + offset, 0), in_size - 1)] += w
  return weights


def resize_grid_embedding(embedding, new_grid: tuple[int, int]):
  """Bicubically resizes a position-embedding grid [h, w, C] to [new_h, new_w, C] (torch-compatible)."""
  h, w, _ = embedding.shape
  if (h, w) == tuple(new_grid):
    return embedding
  rows = jnp.asarray(_torch_bicubic_matrix(h, new_grid[0]), embedding.dtype)
  cols = jnp.asarray(_torch_bicubic_matrix(w, new_grid[1]), embedding.dtype)
  return jnp.einsum("ih,jw,hwc->ijc", rows, cols, embedding, precision=jax.lax.Precision.HIGHEST)
