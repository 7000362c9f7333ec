"""ECG towers (random init): a 1-D patch transformer and a 1-D ResNet.

Input: waveforms float32 [B, T, leads] (e.g. 10 s at 500 Hz: [B, 5000, 12]). The sampling rate is fixed by
the data pipeline; here it only enters through `num_samples` and `patch_size` (50 samples = 100 ms at 500 Hz).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import linen as nn

from medbind_jax.models import layers, register_encoder

POOLINGS = ("cls", "mean")


def _check_leads(waveforms, num_leads: int):
  if waveforms.ndim != 3 or waveforms.shape[-1] != num_leads:
    raise ValueError(f"ECG input must be [B, T, {num_leads}], got {waveforms.shape}")


@register_encoder("ecg_transformer")
class ECGTransformer(nn.Module):
  """Patch transformer over time: each run of `patch_size` samples x all leads is one token (linear embedding),
  plus a CLS token and learned position embeddings, pre-LN blocks, final LayerNorm.

  Inputs may be shorter than `num_samples` (the first position embeddings are used) but T must be a multiple
  of `patch_size`. pooled = CLS token ('cls') or mean of the patch tokens ('mean'); tokens = [B, 1 + T/patch, C].
  """

  num_samples: int = 5000
  num_leads: int = 12
  patch_size: int = 50
  hidden_size: int = 256
  num_layers: int = 6
  num_heads: int = 8
  mlp_dim: int = 1024
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  pooling: str = "cls"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  remat: bool = False

  @property
  def width(self) -> int:
    return self.hidden_size

  def example_inputs(self, batch_size: int = 1):
    return jnp.zeros((batch_size, self.num_samples, self.num_leads), jnp.float32)

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
    _check_leads(inputs, self.num_leads)
    batch, length, _ = inputs.shape
    if length % self.patch_size or length > self.num_samples:
      raise ValueError(f"ECG length {length} must be a multiple of patch_size {self.patch_size} and at most "
                       f"num_samples {self.num_samples}")
    num_patches = length // self.patch_size
    patches = inputs.astype(self.dtype).reshape(batch, num_patches, self.patch_size * self.num_leads)
    x = nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=layers.DEFAULT_KERNEL_INIT, name="patch_embed")(patches)

    init = layers.DEFAULT_KERNEL_INIT
    cls_token = self.param("cls_token", init, (1, 1, self.hidden_size), self.param_dtype)
    pos_embedding = self.param("pos_embedding", init, (1, 1 + self.num_samples // self.patch_size,
                                                       self.hidden_size), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, self.hidden_size)), x], 1)
    x = x + pos_embedding[:, :1 + num_patches].astype(self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    block = functools.partial(
        layers.maybe_remat(layers.PreLNBlock, self.remat), num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        act=self.hidden_act, layer_norm_eps=self.layer_norm_eps, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate, dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_layers):
      rate = self.drop_path_rate * i / max(self.num_layers - 1, 1)
      x = block(drop_path_rate=rate, name=f"block_{i}")(x, not train)
    x = layers.layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name="final_norm")(x)

    pooled = x[:, 0] if self.pooling == "cls" else jnp.mean(x[:, 1:].astype(jnp.float32), axis=1)
    return {"pooled": pooled.astype(jnp.float32), "tokens": x}


def _group_norm(channels: int, num_groups: int, dtype, param_dtype, name: str) -> nn.GroupNorm:
  groups = min(num_groups, channels)
  if channels % groups:
    raise ValueError(f"{channels} channels cannot be split into {groups} GroupNorm groups")
  return nn.GroupNorm(num_groups=groups, dtype=dtype, param_dtype=param_dtype, name=name)


class ResidualBlock1D(nn.Module):
  """Basic ResNet block over time: conv-GN-ReLU-conv-GN plus a (projected) shortcut, then ReLU."""

  channels: int
  kernel_size: int = 7
  stride: int = 1
  num_groups: int = 32
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, self.channels, padding="SAME", use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(_group_norm, self.channels, self.num_groups, self.dtype, self.param_dtype)
    y = nn.relu(norm("norm1")(conv((self.kernel_size,), strides=self.stride, name="conv1")(x)))
    y = norm("norm2")(conv((self.kernel_size,), name="conv2")(y))
    if self.stride != 1 or x.shape[-1] != self.channels:
      x = norm("shortcut_norm")(conv((1,), strides=self.stride, name="shortcut_conv")(x))
    return nn.relu(x + y)


@register_encoder("ecg_resnet")
class ECGResNet(nn.Module):
  """1-D ResNet: strided stem conv + max-pool, stages of residual blocks (stride 2 between stages), global
  average pooling over time. pooled = [B, stage_channels[-1]]; tokens = last feature map [B, T', C]."""

  num_samples: int = 5000  # only sizes `example_inputs`; any length works
  num_leads: int = 12
  stem_channels: int = 64
  stem_kernel_size: int = 15
  stage_channels: tuple[int, ...] = (64, 128, 256, 512)
  blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2)
  kernel_size: int = 7
  num_groups: int = 32
  dropout_rate: float = 0.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  remat: bool = False

  @property
  def width(self) -> int:
    return self.stage_channels[-1]

  def example_inputs(self, batch_size: int = 1):
    return jnp.zeros((batch_size, self.num_samples, self.num_leads), jnp.float32)

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    _check_leads(inputs, self.num_leads)
    # GroupNorm, not BatchNorm: no running statistics, so the tower stays a pure function of (params, inputs)
    # with the same behaviour in training and evaluation and nothing to synchronise across devices.
    x = nn.Conv(self.stem_channels, (self.stem_kernel_size,), strides=2, padding="SAME", use_bias=False,
                dtype=self.dtype, param_dtype=self.param_dtype, name="stem_conv")(inputs.astype(self.dtype))
    x = nn.relu(_group_norm(self.stem_channels, self.num_groups, self.dtype, self.param_dtype, "stem_norm")(x))
    x = nn.max_pool(x, (3,), strides=(2,), padding="SAME")

    block_cls = layers.maybe_remat(ResidualBlock1D, self.remat, static_argnums=())
    for stage, (channels, depth) in enumerate(zip(self.stage_channels, self.blocks_per_stage)):
      for i in range(depth):
        stride = 2 if stage > 0 and i == 0 else 1
        x = block_cls(channels, kernel_size=self.kernel_size, stride=stride, num_groups=self.num_groups,
                      dtype=self.dtype, param_dtype=self.param_dtype, name=f"stage_{stage}_block_{i}")(x)

    pooled = jnp.mean(x.astype(jnp.float32), axis=1)
    pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=not train)
    return {"pooled": pooled, "tokens": x}
