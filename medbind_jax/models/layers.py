"""Building blocks shared by the encoder towers: attention, MLP, stochastic depth, pre-/post-LN blocks.

Shapes use `...` for any leading batch dimensions: ViT/ECG tokens are [B, T, C], Swin windows are
[B, windows, T, C]. Every matmul runs in the module's `dtype` (compute dtype) with parameters stored in
`param_dtype`; attention logits and softmax are always float32.

Submodule names (`query`, `key`, `value`, `out`, `fc1`, `fc2`, `norm1`, ...) are the names the Hugging Face
loader (`hf_loading.py`) maps checkpoint keys onto, so renaming one here means renaming it there.

Several pieces compute the function of their Flax/`jax.nn` counterpart in a form XLA runs faster on CPU, with the
same parameters (names, shapes, initialisation) and results equal up to float rounding: LayerNorm's statistics
and gradient as matrix-vector products (`layer_norm_fn`), the tanh GELU through a sigmoid (`gelu_tanh`), a
convolution whose kernel gradient is a matmul (`conv2d`), a patch embedding as a matmul (`PatchEmbed`), and
attention through `jax.nn.dot_product_attention` with the logit scale folded into the query projection.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any

# Random init as Hugging Face does for these families: weights drawn with std 0.02 (truncated at 2 std).
DEFAULT_KERNEL_INIT = nn.initializers.truncated_normal(0.02)


def gelu_tanh(x):
  """GELU, tanh approximation (`jax.nn.gelu(approximate=True)`, Flax's `nn.gelu`): 0.5 x (1 + tanh(z)) with
  z = sqrt(2 / pi) (x + 0.044715 x^3), computed as the identical x * sigmoid(2 z), which XLA's CPU backend
  evaluates (forward and backward) about 1.6x faster than its tanh."""
  z = math.sqrt(8 / math.pi) * (x + 0.044715 * (x * x * x))
  return x * jax.nn.sigmoid(z)


def gelu_erf(x):
  """GELU, exact: x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2))), torch's formula. `jax.nn.gelu(approximate=False)`
  evaluates the same function as 0.5 x erfc(-x / sqrt(2)), whose erfc XLA's CPU backend runs (forward and
  backward) about 2x slower than erf. They differ by float rounding: < 1.1e-6 absolute over all inputs (the
  rounding of 1 + erf where GELU is below 1e-4 in magnitude, as in torch; about an ulp elsewhere)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


ACTIVATIONS = {
    "gelu": gelu_erf,  # as torch's default GELU
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.Module:
  # Two-pass variance (mean of squared deviations) like torch, not E[x^2] - E[x]^2, which loses digits.
  return LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


def _row_dot(x, v):
  """x [..., C] . v [C] -> [..., 1] at full float32 precision (XLA's CPU backend runs these reductions over a
  short last axis several times faster as matrix-vector products than as reduce ops)."""
  return jnp.dot(x, v, precision=jax.lax.Precision.HIGHEST)[..., None]


def _layer_norm_stats(x, eps: float):
  """(mean, 1 / sqrt(var + eps)) over the last axis in float32 (at least), the variance two-pass."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  average = jnp.full((x.shape[-1],), 1.0 / x.shape[-1], x.dtype)
  mean = _row_dot(x, average)
  return mean, jax.lax.rsqrt(_row_dot(jnp.square(x - mean), average) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_fn(x, scale, bias, eps: float):
  """LayerNorm over the last axis of x: (x - mean) * (rsqrt(var + eps) * scale) + bias with float32 statistics
  and output (the caller casts), the function of `nn.LayerNorm(use_fast_variance=False)`.

  The gradient is the closed form dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * scale and
  xhat = (x - mean) * rstd, its row means (and the statistics) as matrix-vector products: equal to the autodiff
  gradient up to float rounding, in fewer and cheaper passes over the activations."""
  mean, rstd = _layer_norm_stats(x, eps)
  return (x - mean) * (rstd * scale) + bias


def _layer_norm_fwd(x, scale, bias, eps):
  mean, rstd = _layer_norm_stats(x, eps)
  return (x - mean) * (rstd * scale) + bias, (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, residuals, dy):
  del eps
  x, mean, rstd, scale, bias = residuals
  dy = dy.astype(mean.dtype)
  xhat = (x - mean) * rstd
  scale_over_width = scale / x.shape[-1]
  dx = rstd * (dy * scale - _row_dot(dy, scale_over_width) - xhat * _row_dot(dy * xhat, scale_over_width))
  rows = tuple(range(dy.ndim - 1))
  return (dx.astype(x.dtype), jnp.sum(dy * xhat, axis=rows).astype(scale.dtype),
          jnp.sum(dy, axis=rows).astype(bias.dtype))


layer_norm_fn.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with `nn.LayerNorm`'s parameters (`scale` ones, `bias` zeros) and function
  (float32 statistics, two-pass variance, output in `dtype`), computed by `layer_norm_fn`."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    stats_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
    return layer_norm_fn(x, scale.astype(stats_dtype), bias.astype(stats_dtype), self.epsilon).astype(self.dtype)


def maybe_remat(block_cls: type[nn.Module], enabled: bool, static_argnums: tuple[int, ...] = (2,)):
  """`nn.remat(block_cls)` when enabled. `static_argnums` counts `self` as 0: (2,) is `deterministic` in
  `__call__(self, x, deterministic)`; Python booleans must be static to choose dropout on/off."""
  return nn.remat(block_cls, static_argnums=static_argnums) if enabled else block_cls


class DenseParams(nn.Module):
  """The parameters of an `nn.Dense(features)` over `in_features` inputs (`kernel` [in, features], `bias`
  [features] or None) under the same names and initialisers, returned instead of applied (so that a caller can
  transform them first)."""

  features: int
  use_bias: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param("kernel", DEFAULT_KERNEL_INIT, (in_features, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
    return kernel, bias


def _attention_operand(t, lead: tuple[int, ...]):
  """A bias or mask broadcastable to [*lead, heads, T, S] as a 4-D array broadcastable to [prod(lead), heads, T, S]
  (the layout `jax.nn.dot_product_attention` takes); leading dimensions are only broadcast where they must be
  merged (Swin's per-window shift mask over [batch, windows])."""
  t = jnp.asarray(t)
  t = t.reshape((1,) * (len(lead) + 3 - t.ndim) + t.shape)
  t_lead = t.shape[:len(lead)]
  if len(lead) == 1 or all(d == 1 for d in t_lead):
    return t.reshape((-1 if len(lead) == 1 else 1,) + t.shape[len(lead):])
  return jnp.broadcast_to(t, lead + t.shape[len(lead):]).reshape((-1,) + t.shape[len(lead):])


class Attention(nn.Module):
  """Multi-head self-attention over the second-to-last axis of x [..., T, C].

  `bias` is added to the float32 logits (broadcastable to [..., heads, T, T]; Swin's relative position bias and
  shift mask); `mask` is boolean (broadcastable to [..., heads, T, T]; False = do not attend).

  The 1/sqrt(head_dim) logit scale is folded into the query projection's parameters (no pass over the [T, T]
  logits), and the attention runs in `jax.nn.dot_product_attention` (float32 logits and softmax). With
  attention-probability dropout active (`dropout_rate` > 0 in training), which that function does not do, the same
  logits go through an explicit softmax and dropout.
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
    lead, length = x.shape[:-2], x.shape[-2]

    def project(name, factor=1.0):
      """[..., T, C] -> [B', T, heads, head_dim] (B': the leading dimensions flattened)."""
      kernel, proj_bias = DenseParams(width, use_bias=self.qkv_bias, param_dtype=self.param_dtype, name=name)(width)
      if factor != 1.0:  # applied to the (small) parameters, not to activations
        kernel = kernel * factor
        proj_bias = None if proj_bias is None else proj_bias * factor
      y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ())))
      if proj_bias is not None:
        y = y + proj_bias.astype(self.dtype)
      return y.reshape(-1, length, self.num_heads, head_dim)

    query, key, value = project("query", head_dim ** -0.5), project("key"), project("value")
    bias = None if bias is None else _attention_operand(bias, lead).astype(jnp.float32)
    mask = None if mask is None else _attention_operand(mask, lead)

    if self.dropout_rate > 0.0 and not deterministic:
      logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
      if bias is not None:
        logits = logits + bias
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      probs = nn.Dropout(self.dropout_rate)(jax.nn.softmax(logits, axis=-1), deterministic=False)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), value)
    else:
      out = jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask, scale=1.0)
    out = out.reshape(*lead, length, width)
    return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=DEFAULT_KERNEL_INIT,
                    name="out")(out)


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


def conv_patches(x, kernel_size: tuple[int, int], strides: tuple[int, int], padding):
  """im2col of x [B, H, W, C] for a VALID convolution after `padding` ((top, bottom), (left, right)):
  [B, H', W', kh * kw * C], features ordered (kh, kw, C) like an HWIO kernel reshaped to [kh * kw * C, O]."""
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  (kh, kw), (sh, sw) = kernel_size, strides
  out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  return jnp.concatenate([x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
                          for i in range(kh) for j in range(kw)], axis=-1)


def _conv_nhwc(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides: tuple[int, int], padding: tuple[tuple[int, int], tuple[int, int]]):
  """`lax.conv_general_dilated` (NHWC x HWIO -> NHWC) whose kernel gradient is one matmul over the im2col patches
  (`conv_patches`) rather than XLA's transposed convolution of the activations with the output gradient: the
  same function and gradients up to float rounding; on the CPU backend the ViT stem's kernel gradients run 1.7-5x
  faster (its second convolution's about as fast). The forward pass and the input gradient are the convolution's
  own."""
  return _conv_nhwc(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return _conv_nhwc(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _conv_nhwc(x_, kernel, strides, padding), x)
  patches = conv_patches(x, kernel.shape[:2], strides, padding)
  kernel_grad = jax.lax.dot_general(patches.reshape(-1, patches.shape[-1]), grad.reshape(-1, grad.shape[-1]),
                                    (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return input_vjp(grad)[0], kernel_grad.reshape(kernel.shape).astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
  """2-D convolution of x [B, H, W, C] with `nn.Conv`'s parameters (`kernel` [kh, kw, C, features], `bias`
  [features]; the same names, shapes and initialisation) computed by `conv2d`. `padding`: ((top, bottom),
  (left, right)) pixels."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = DEFAULT_KERNEL_INIT

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), tuple(self.strides),
               tuple(tuple(p) for p in self.padding))
    return y + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  """Non-overlapping `patch_size` x `patch_size` patches of x [B, H, W, C] linearly embedded: [B, H / p, W / p,
  features] (pixels beyond the last whole patch dropped). The parameters are those of the stride-p `nn.Conv` it
  equals (`kernel` [p, p, C, features], `bias`); computed as a reshape and one matmul, whose gradient is
  another matmul rather than XLA's slower convolution kernel gradient."""

  features: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = DEFAULT_KERNEL_INIT

  @nn.compact
  def __call__(self, x):
    p, channels = self.patch_size, x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (p, p, channels, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    batch, grid_h, grid_w = x.shape[0], x.shape[1] // p, x.shape[2] // p
    x = x[:, :grid_h * p, :grid_w * p].astype(self.dtype)
    if p > 1:  # [B, h, p, w, p, C] -> [B, h, w, p, p, C]: rows of the kernel's (p, p, C) order
      x = x.reshape(batch, grid_h, p, grid_w, p, channels).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, grid_h, grid_w, p * p * channels)
    y = jax.lax.dot_general(x, kernel.reshape(-1, self.features).astype(self.dtype),
                            (((3,), (0,)), ((), ())))
    return y + bias.astype(self.dtype)


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
