"""Vision Transformer (Hugging Face `google/vit-base-patch16-224` layout): patch conv, CLS token, learned
position embeddings, pre-LN blocks, final LayerNorm.

Input: images float32 [B, H, W, C] with C = `num_channels`. A 1-channel image (grayscale CXR) fed to a 3-channel
tower is repeated over the channels, so RGB checkpoints take X-rays unchanged. Any H, W works: the position
grid stored for `image_size` is resized bicubically to the input's patch grid exactly as Hugging Face's
`ViTModel(..., interpolate_pos_encoding=True)` does; pixels beyond the last whole patch are dropped.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import linen as nn

from medbind_jax.models import layers, register_encoder

POOLINGS = ("cls", "mean")


@register_encoder("vit")
class ViTEncoder(nn.Module):
  """ViT tower. pooled = CLS token after the final LayerNorm ('cls') or the mean of the patch tokens ('mean'),
  optionally followed by Hugging Face's pooler (dense + tanh) when `use_pooler`. tokens = [B, 1 + patches, C].

  `stem_channels` (random init only; no Hugging Face counterpart) replaces the single patch convolution by a
  convolutional stem: one 3x3 stride-2 conv + LayerNorm + GELU per entry, then a patch conv over the remaining
  `patch_size / 2**len(stem_channels)` pixels. Same token grid and cost class, but far more data-efficient on
  small training sets than a linear patch embedding.
  """

  image_size: int | tuple[int, int] = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  pooling: str = "cls"
  use_pooler: bool = False
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  remat: bool = False
  stem_channels: tuple[int, ...] = ()

  @property
  def width(self) -> int:
    return self.hidden_size

  @property
  def position_grid(self) -> tuple[int, int]:
    """Patch grid the stored position embeddings describe."""
    height, width = layers.as_pair(self.image_size)
    return height // self.patch_size, width // self.patch_size

  def example_inputs(self, batch_size: int = 1):
    return jnp.zeros((batch_size, *layers.as_pair(self.image_size), self.num_channels), jnp.float32)

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
    images = layers.adapt_channels(inputs, self.num_channels).astype(self.dtype)
    batch = images.shape[0]

    patch = self.patch_size
    for i, channels in enumerate(self.stem_channels):
      if patch % 2:
        raise ValueError(f"patch_size={self.patch_size} is not divisible by 2**{len(self.stem_channels)} "
                         "(one stride-2 conv per stem_channels entry)")
      patch //= 2
      images = layers.Conv(channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                           param_dtype=self.param_dtype, name=f"stem_{i}")(images)
      norm = layers.layer_norm(1e-6, self.dtype, self.param_dtype, name=f"stem_norm_{i}")
      images = layers.gelu_tanh(norm(images))  # nn.gelu's function
    patches = layers.PatchEmbed(self.hidden_size, patch, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="patch_embed")(images)
    grid = patches.shape[1:3]
    tokens = patches.reshape(batch, grid[0] * grid[1], self.hidden_size)

    init = layers.DEFAULT_KERNEL_INIT
    cls_token = self.param("cls_token", init, (1, 1, self.hidden_size), self.param_dtype)
    stored_grid = self.position_grid
    pos_embedding = self.param("pos_embedding", init, (1, 1 + stored_grid[0] * stored_grid[1], self.hidden_size),
                               self.param_dtype)
    patch_pos = layers.resize_grid_embedding(pos_embedding[0, 1:].reshape(*stored_grid, self.hidden_size), grid)
    pos_embedding = jnp.concatenate([pos_embedding[0, :1], patch_pos.reshape(-1, self.hidden_size)])

    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, self.hidden_size)), tokens], 1)
    x = x + pos_embedding.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    block = functools.partial(
        layers.maybe_remat(layers.PreLNBlock, self.remat), num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        act=self.hidden_act, layer_norm_eps=self.layer_norm_eps, qkv_bias=self.qkv_bias,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      rate = self.drop_path_rate * i / max(self.num_layers - 1, 1)
      x = block(drop_path_rate=rate, name=f"block_{i}")(x, not train)
    x = layers.layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name="final_norm")(x)

    pooled = x[:, 0] if self.pooling == "cls" else jnp.mean(x[:, 1:].astype(jnp.float32), axis=1)
    if self.use_pooler:
      pooled = nn.tanh(nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                kernel_init=layers.DEFAULT_KERNEL_INIT, name="pooler")(pooled))
    return {"pooled": pooled.astype(jnp.float32), "tokens": x}
