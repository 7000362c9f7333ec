"""Swin Transformer (Hugging Face `microsoft/swin-tiny-patch4-window7-224` layout), the paper's CXR encoder.

Patch conv + LayerNorm, then stages of pre-LN blocks whose attention runs inside non-overlapping windows,
alternating with windows shifted by half a window (cyclic roll + a mask so that a window never mixes regions
that were not neighbours), each head adding a learned relative position bias; patch merging (2x2 -> linear)
halves the map between stages; final LayerNorm; pooled = mean over the last stage's tokens.

Input: images float32 [B, H, W, C]; a 1-channel image into a 3-channel tower is repeated over the channels.
Sizes follow Hugging Face's `SwinModel`: the image is zero-padded on the right/bottom to a multiple of the patch
size, each block zero-pads its (normalised) map to a multiple of the window, odd maps are padded before merging,
and where a map is no larger than the window the window shrinks to the map and the shift is dropped. Hugging
Face fails when that shrunken window is smaller than the bias table's window; here the table is indexed with the
smaller window's offsets instead, so small inputs also work.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from medbind_jax.models import layers, register_encoder

SHIFT_MASK_VALUE = -100.0  # what Hugging Face adds between tokens of different shift regions


def effective_window(height: int, width: int, window_size: int, shifted: bool) -> tuple[int, int]:
  """(window, shift) used on a height x width map: the window shrinks to the map and the shift is dropped
  when the map is no larger than the window."""
  if min(height, width) <= window_size:
    return min(height, width), 0
  return window_size, window_size // 2 if shifted else 0


def relative_position_index(window: int, table_window: int) -> np.ndarray:
  """[window^2, window^2] indices into a ((2 * table_window - 1)^2, heads) bias table."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  delta = coords[:, :, None] - coords[:, None, :] + (table_window - 1)  # offsets shifted to be >= 0
  return delta[0] * (2 * table_window - 1) + delta[1]


def shift_region_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """Additive mask [windows, window^2, window^2] for a map rolled by -shift: tokens that came from different
  regions of the unrolled map (wrapped around by the roll) must not attend to each other."""

  def regions(size):
    index = np.arange(size)
    return (index >= size - window).astype(np.int64) + (index >= size - shift)

  labels = regions(height)[:, None] * 3 + regions(width)[None, :]
  labels = to_windows(labels[None, :, :, None], window)[0, :, :, 0]  # [windows, window^2]
  different = labels[:, None, :] != labels[:, :, None]
  return np.where(different, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def to_windows(x, window: int):
  """[B, H, W, C] -> [B, (H / window) * (W / window), window^2, C], windows in row-major order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // window) * (w // window), window * window, c)


def from_windows(windows, window: int, height: int, width: int):
  """Inverse of `to_windows`."""
  b, _, _, c = windows.shape
  x = windows.reshape(b, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


class SwinBlock(layers.PreLNBlock):
  """Pre-LN block whose token mixer is (shifted-)window attention over a map [B, H, W, C].

  Stochastic depth drops both residual branches as in the Swin paper (Hugging Face drops only the attention
  branch); this only changes training, never inference.
  """

  window_size: int = 7
  shifted: bool = False

  def setup(self):
    super().setup()
    table_size = (2 * self.window_size - 1) ** 2
    self.rel_pos_table = self.param("rel_pos_table", layers.DEFAULT_KERNEL_INIT, (table_size, self.num_heads),
                                    self.param_dtype)

  def attend(self, x, deterministic: bool):
    _, height, width, _ = x.shape
    window, shift = effective_window(height, width, self.window_size, self.shifted)
    pad_h, pad_w = -height % window, -width % window
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))  # padded tokens are attended to, as in HF
    if shift:
      x = jnp.roll(x, (-shift, -shift), axis=(1, 2))

    index = relative_position_index(window, self.window_size)
    bias = jnp.transpose(self.rel_pos_table[index], (2, 0, 1))  # [heads, T, T]
    if shift:
      bias = bias + jnp.asarray(shift_region_mask(height + pad_h, width + pad_w, window, shift))[:, None]
    out = self.attn(to_windows(x, window), bias=bias, deterministic=deterministic)

    out = from_windows(out, window, height + pad_h, width + pad_w)
    if shift:
      out = jnp.roll(out, (shift, shift), axis=(1, 2))
    return out[:, :height, :width]


class PatchMerging(nn.Module):
  """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]: each 2x2 neighbourhood concatenated, normalised, projected."""

  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    _, height, width, channels = x.shape
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    # Hugging Face's order: (row 0, col 0), (row 1, col 0), (row 0, col 1), (row 1, col 1).
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = layers.layer_norm(1e-5, self.dtype, self.param_dtype, name="norm")(x)
    return nn.Dense(2 * channels, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=layers.DEFAULT_KERNEL_INIT, name="reduction")(x)


@register_encoder("swin")
class SwinEncoder(nn.Module):
  """Swin tower. pooled = mean of the last stage's tokens after the final LayerNorm; tokens = [B, h * w, width]
  with width = embed_dim * 2 ** (len(depths) - 1)."""

  image_size: int | tuple[int, int] = 224
  patch_size: int = 4
  num_channels: int = 3
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  qkv_bias: bool = True
  use_absolute_embeddings: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.1
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  remat: bool = False

  @property
  def width(self) -> int:
    return self.embed_dim * 2 ** (len(self.depths) - 1)

  def example_inputs(self, batch_size: int = 1):
    return jnp.zeros((batch_size, *layers.as_pair(self.image_size), self.num_channels), jnp.float32)

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
    images = layers.adapt_channels(inputs, self.num_channels).astype(self.dtype)
    _, height, width, _ = images.shape
    p = self.patch_size
    images = jnp.pad(images, ((0, 0), (0, -height % p), (0, -width % p), (0, 0)))
    x = layers.PatchEmbed(self.embed_dim, p, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="patch_embed")(images)
    x = layers.layer_norm(1e-5, self.dtype, self.param_dtype, name="patch_norm")(x)
    if self.use_absolute_embeddings:
      stored_grid = tuple(s // p for s in layers.as_pair(self.image_size))
      pos_embedding = self.param("pos_embedding", nn.initializers.zeros,
                                 (1, stored_grid[0] * stored_grid[1], self.embed_dim), self.param_dtype)
      pos_embedding = layers.resize_grid_embedding(pos_embedding[0].reshape(*stored_grid, self.embed_dim),
                                                   x.shape[1:3])
      x = x + pos_embedding.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    total_blocks = sum(self.depths)
    block_index = 0
    block_cls = layers.maybe_remat(SwinBlock, self.remat)
    for stage, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      dim = self.embed_dim * 2 ** stage
      block = functools.partial(
          block_cls, num_heads=heads, mlp_dim=int(self.mlp_ratio * dim), act=self.hidden_act,
          layer_norm_eps=self.layer_norm_eps, qkv_bias=self.qkv_bias, dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate, window_size=self.window_size,
          dtype=self.dtype, param_dtype=self.param_dtype)
      for i in range(depth):
        rate = self.drop_path_rate * block_index / max(total_blocks - 1, 1)
        x = block(shifted=i % 2 == 1, drop_path_rate=rate, name=f"stage_{stage}_block_{i}")(x, not train)
        block_index += 1
      if stage < len(self.depths) - 1:
        x = PatchMerging(dtype=self.dtype, param_dtype=self.param_dtype, name=f"stage_{stage}_merge")(x)

    x = layers.layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name="final_norm")(x)
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    pooled = jnp.mean(tokens.astype(jnp.float32), axis=1)
    return {"pooled": pooled, "tokens": tokens}
