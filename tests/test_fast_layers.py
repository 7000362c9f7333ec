"""The CPU-faster layers in `models/layers.py` against the computations they replace: the sigmoid-form tanh GELU
and the erf GELU against `jax.nn.gelu`, `LayerNorm`'s custom VJP against `nn.LayerNorm`, `conv2d`/`Conv`'s
im2col kernel gradient against `lax.conv_general_dilated`/`nn.Conv`, `PatchEmbed` against the stride-p `nn.Conv`,
and `Attention` (scale folded into the query, `jax.nn.dot_product_attention`) against a plain softmax attention.

Each comparison covers values and gradients (a random cotangent, so that a wrong gradient cannot hide in a sum).
All graphs are jitted: one compile per case rather than one per eager op.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from medbind_jax.models import layers

# float32 results that differ only by rounding order: a few ulps relative, plus an absolute floor for values that
# cancel to near zero (an ulp of the O(1) terms summed into them).
RTOL, ATOL = 1e-5, 1e-6

# These graphs run once, so XLA compile time dominates: the cheaper CPU compile settings of test_encoders_vit.py
# (LLVM optimisation off, classic fusion emitters) make the file ~3x faster. Only the GELU test keeps the default
# options: under these, XLA's CPU tanh in the `jax.nn.gelu` reference is less accurate (see there).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True,
                                                   "xla_cpu_use_fusion_emitters": False})


def assert_trees_close(actual, expected, rtol=RTOL, atol=ATOL):
  actual, expected = jax.device_get((actual, expected))
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                                       rtol=rtol, atol=atol), actual, expected)


def normal(seed, shape, scale=1.0, offset=0.0, dtype=np.float32):
  return jnp.asarray(offset + scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def random_params_like(params, seed, scale=0.3, offset=0.0):
  """Replaces every leaf by random values, so that ones/zeros initialisers cannot hide a wrong param use."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(offset + scale * rng.standard_normal(p.shape), p.dtype), params)


def value_and_grads(fn, *args):
  """fn(*args) and the gradients of sum(fn(*args) * w) w.r.t. every argument, w a fixed random cotangent."""
  w = normal(99, jax.eval_shape(fn, *args).shape)

  def forward_and_backward(*a):
    out, vjp = jax.vjp(fn, *a)
    return out, vjp(w.astype(out.dtype))

  return jit(forward_and_backward)(*args)


# --- GELU ------------------------------------------------------------------------------------------------------

GELU_INPUTS = jnp.concatenate([jnp.linspace(-12.0, 12.0, 4801, dtype=jnp.float32), normal(0, (4096,), 3.0)])


@pytest.mark.parametrize("fast, approximate", [(layers.gelu_tanh, True), (layers.gelu_erf, False)],
                         ids=["tanh", "erf"])
def test_gelu_matches_jax_nn_gelu(fast, approximate):
  """A wrong constant (sqrt(8/pi) vs sqrt(2/pi), 0.044715) or erf argument would change values well beyond 1e-5."""
  x = GELU_INPUTS
  reference = lambda v: jax.nn.gelu(v, approximate=approximate)
  grad = lambda f: jax.grad(lambda v: jnp.sum(f(v)))
  # Default compile options here: with LLVM optimisation off, XLA's CPU tanh (in the reference) is less accurate.
  got, got_grad, expected, expected_grad = jax.device_get(
      jax.jit(lambda v: (fast(v), grad(fast)(v), reference(v), grad(reference)(v)))(x))
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
  if approximate:
    # In the tails each form's derivative drops the term x z' (1 - tanh^2 z) (resp. x z' s (1 - s)) once it falls
    # below half an ulp of the O(1) rest: up to |x z'| ulp(1) / 2 ~ 3.5e-6 here (measured against float64), on
    # either side. Hence atol 4e-6 against jax, and the float64 derivative bounds gelu_tanh's own error.
    np.testing.assert_allclose(got_grad, expected_grad, rtol=RTOL, atol=4e-6)
    x64 = np.asarray(x, np.float64)
    dz = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x64 ** 2)
    tanh = np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3))
    np.testing.assert_allclose(got, 0.5 * x64 * (1 + tanh), rtol=0, atol=ATOL)
    np.testing.assert_allclose(got_grad, 0.5 * (1 + tanh) + 0.5 * x64 * (1 - tanh ** 2) * dz, rtol=0, atol=2.5e-6)
  else:
    assert np.max(np.abs(got - expected)) < 1.1e-6  # the bound the module docstring states
    np.testing.assert_allclose(got_grad, expected_grad, rtol=RTOL, atol=ATOL)
  # Not vacuous: over this range GELU is far from both the identity and zero.
  assert np.max(np.abs(expected - np.asarray(x))) > 1.0


def test_gelu_activations_registry():
  """"gelu" must stay the exact (erf) form, as torch's default; the tanh names map to the tanh form."""
  assert layers.activation("gelu") is layers.gelu_erf
  assert layers.activation("gelu_new") is layers.gelu_tanh
  assert layers.activation("gelu_pytorch_tanh") is layers.gelu_tanh


# --- LayerNorm -------------------------------------------------------------------------------------------------


def module_pair(ours, reference, x, seed, offset=0.0):
  """Checks that `ours` has the parameter tree of the flax module `reference` (names, shapes, dtypes); returns
  [(output, (input grad, param grads)) of ours, the same of reference] with one set of random params, and those."""
  shapes = jax.eval_shape(ours.init, jax.random.key(0), x)["params"]
  assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(
      lambda s: (s.shape, s.dtype), jax.eval_shape(reference.init, jax.random.key(0), x)["params"])
  params = random_params_like(shapes, seed, offset=offset)
  return [value_and_grads(lambda x_, p, m=module: m.apply({"params": p}, x_), x, params)
          for module in (ours, reference)], params


def layer_norm_pair(x, eps, dtype=jnp.float32, seed=1):
  """(ours, flax's) (output, (input grad, param grads)) for random non-trivial scale/bias, and those params."""
  return module_pair(layers.LayerNorm(epsilon=eps, dtype=dtype),
                     nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False), x, seed, offset=1.0)


@pytest.mark.parametrize("shape", [(2, 9, 16), (2, 5, 7, 24)], ids=["tokens", "map_BHWC"])
def test_layer_norm_matches_flax(shape):
  """Values and the closed-form gradients (input, scale, bias) equal flax's autodiff of the same function."""
  x = normal(2, shape, scale=2.0, offset=0.5)
  ((out, grads), (ref_out, ref_grads)), _ = layer_norm_pair(x, eps=1e-6)
  assert out.dtype == jnp.float32 and out.shape == shape
  np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
  assert_trees_close(grads, ref_grads)


def test_layer_norm_large_offset_keeps_digits():
  """Mean 100, std 0.1: a one-pass variance E[x^2] - E[x]^2 loses ~all digits in float32; two-pass must not.

  Both implementations are compared to a float64 reference on the same float32 input. The float32 error left is
  the mean's rounding, a few ulp(100) / 2 = 3.8e-6, amplified by rstd (<= 12) and |scale| (<= 1.6): atol 3e-4
  (measured: ours 1.1e-4, flax 2.4e-4). A one-pass variance would be off by > 5% (asserted at the end)."""
  eps = 1e-12
  x = normal(3, (2, 9, 32), scale=0.1, offset=100.0)
  ((out, grads), (ref_out, ref_grads)), params = layer_norm_pair(x, eps=eps, seed=4)
  x64 = np.asarray(x, np.float64)
  centred = x64 - x64.mean(-1, keepdims=True)
  exact_var = np.mean(centred ** 2, -1, keepdims=True)
  exact = centred / np.sqrt(exact_var + eps) * np.asarray(params["scale"]) + np.asarray(params["bias"])
  np.testing.assert_allclose(out, exact, rtol=0, atol=3e-4)
  np.testing.assert_allclose(ref_out, exact, rtol=0, atol=3e-4)
  # Both gradients inherit xhat's ~1e-4 error: the scale gradient sums 18 rows of it (|dy| ~ 1; up to 1.8e-3), the
  # input gradient carries it times rstd <= 12 (values up to ~40): atol 2e-3 (measured max difference 1.1e-3).
  assert_trees_close(grads, ref_grads, rtol=RTOL, atol=2e-3)
  # The check can fail: the one-pass variance in float32 is far off here.
  x32 = np.asarray(x)
  one_pass_var = np.mean(x32 * x32, -1, keepdims=True) - np.mean(x32, -1, keepdims=True) ** 2
  assert np.max(np.abs(one_pass_var - exact_var) / exact_var) > 0.05


def test_layer_norm_bf16_dtype():
  """dtype bf16: output bf16 from float32 statistics, as flax's. The two float32 results differ by rounding, which
  can straddle a bf16 rounding boundary: one bf16 ulp, up to 2^-7 relative. Parameter gradients (and the input
  gradient of a float32 input) are float32 sums with the same bf16 cotangent: float32 tolerances."""
  x = normal(5, (2, 9, 16), scale=2.0, offset=0.5)
  ((out, grads), (ref_out, ref_grads)), _ = layer_norm_pair(x, eps=1e-6, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16 == ref_out.dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), rtol=2 ** -7, atol=1e-3)
  assert_trees_close(grads, ref_grads)
  # bf16 input as well: x - mean is formed in float32 from the bf16 values; the input gradient is rounded to bf16
  # (one bf16 ulp apart at most, as the output), the parameter gradients stay float32.
  ((out, grads), (ref_out, ref_grads)), _ = layer_norm_pair(x.astype(jnp.bfloat16), eps=1e-6, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16 and grads[0].dtype == jnp.bfloat16 == ref_grads[0].dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), rtol=2 ** -7, atol=1e-3)
  assert_trees_close(grads[0], ref_grads[0], rtol=2 ** -7, atol=1e-3)
  assert_trees_close(grads[1], ref_grads[1])


def test_layer_norm_helper_builds_layer_norm():
  """`layer_norm(...)` (what the blocks use) is this LayerNorm with the given eps/dtype."""
  module = layers.layer_norm(1e-5, jnp.bfloat16, jnp.float32, name="n")
  assert isinstance(module, layers.LayerNorm)
  assert (module.epsilon, module.dtype, module.param_dtype) == (1e-5, jnp.bfloat16, jnp.float32)


# --- Convolution -----------------------------------------------------------------------------------------------

CONV_CASES = [  # (input shape, kernel size, strides, padding)
    ((2, 13, 13, 3), (3, 3), (2, 2), ((0, 1), (0, 1))),
    ((2, 13, 13, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((2, 13, 11, 3), (2, 2), (2, 2), ((0, 0), (0, 0))),  # odd sizes: the last row/column is never used
    ((2, 9, 12, 3), (3, 2), (1, 2), ((2, 0), (0, 1))),  # non-square kernel and strides: (kh, kw) order matters
]
CONV_IDS = ["3x3s2_pad01", "3x3s1_pad11", "2x2s2_odd", "3x2s12_asym"]


def lax_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape, kernel_size, strides, padding", CONV_CASES, ids=CONV_IDS)
def test_conv2d_matches_lax_conv(shape, kernel_size, strides, padding):
  """The im2col kernel gradient (and the VJP's input gradient) equal XLA's convolution gradients."""
  x = normal(6, shape)
  kernel = normal(7, (*kernel_size, shape[-1], 5), scale=0.3)
  out, grads = value_and_grads(lambda x_, k: layers.conv2d(x_, k, strides, padding), x, kernel)
  ref_out, ref_grads = value_and_grads(lambda x_, k: lax_conv(x_, k, strides, padding), x, kernel)
  assert out.shape == ref_out.shape
  np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
  # The kernel gradient sums up to ~300 products in another order than XLA's: a few ulps of the O(10) sums
  # (measured up to 7.3e-6 absolute), so atol 1e-5.
  assert_trees_close(grads, ref_grads, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("shape, kernel_size, strides, padding", CONV_CASES, ids=CONV_IDS)
def test_conv_module_matches_flax_conv(shape, kernel_size, strides, padding):
  """Same parameter tree as `nn.Conv` (names, shapes), and with those params the same values and gradients."""
  x = normal(8, shape)
  ((out, grads), (ref_out, ref_grads)), _ = module_pair(
      layers.Conv(5, kernel_size, strides, padding), nn.Conv(5, kernel_size, strides, padding=padding), x, 9)
  np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
  assert_trees_close(grads, ref_grads, rtol=RTOL, atol=1e-5)  # kernel/bias gradients: sums as above


# --- Patch embedding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, patch_size", [((2, 12, 12, 3), 4), ((2, 13, 10, 3), 4), ((2, 5, 6, 3), 1)],
                         ids=["whole_patches", "ragged_13x10", "p1"])
def test_patch_embed_matches_strided_conv(shape, patch_size):
  """The reshape + matmul equals the stride-p VALID `nn.Conv` (pixels beyond the last whole patch dropped, H and
  W not swapped), with the same parameter tree, in values and gradients (the dropped pixels get zero gradient)."""
  x = normal(10, shape)
  flax_conv = nn.Conv(8, (patch_size, patch_size), strides=(patch_size, patch_size), padding="VALID")
  ((out, grads), (ref_out, ref_grads)), _ = module_pair(layers.PatchEmbed(8, patch_size), flax_conv, x, 11)
  assert out.shape == (shape[0], shape[1] // patch_size, shape[2] // patch_size, 8) == ref_out.shape
  np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
  assert_trees_close(grads, ref_grads, rtol=RTOL, atol=1e-5)  # kernel gradient: sums over B * patches


# --- Attention -------------------------------------------------------------------------------------------------


def reference_attention(params, x, num_heads, bias=None, mask=None):
  """Plain multi-head attention with the module's params: float32 logits q k^T / sqrt(head_dim) (+ bias, masked
  to finfo.min), softmax, weighted sum of values, output projection."""
  width = x.shape[-1]
  head_dim = width // num_heads

  def dense(name, v):
    y = v @ params[name]["kernel"]
    return y + params[name]["bias"] if "bias" in params[name] else y

  def heads(v):  # [..., T, C] -> [..., heads, T, head_dim]
    return jnp.swapaxes(v.reshape(*v.shape[:-1], num_heads, head_dim), -2, -3)

  q, k, v = heads(dense("query", x)), heads(dense("key", x)), heads(dense("value", x))
  logits = jnp.einsum("...qd,...kd->...qk", q, k).astype(jnp.float32) / math.sqrt(head_dim)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  out = jnp.einsum("...qk,...kd->...qd", jax.nn.softmax(logits, axis=-1), v)
  out = jnp.swapaxes(out, -2, -3).reshape(x.shape)
  return dense("out", out)


def attention_params(module, x, seed):
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  return random_params_like(shapes, seed, scale=0.3)


def causal_ish_mask(shape, seed):
  """A random boolean mask that keeps the diagonal (no all-masked row, where masking conventions differ)."""
  t = shape[-1]
  mask = np.random.default_rng(seed).random(shape) < 0.6
  return jnp.asarray(mask | np.eye(t, dtype=bool))


ATTENTION_CASES = {
    # name: (x shape, num_heads, bias shape or None, mask shape or None)
    "plain": ((2, 9, 16), 4, None, None),
    "plain_head_dim_6": ((2, 9, 12), 2, None, None),  # 1/sqrt(6): the folded scale is not a power of two
    "bias_heads_T_T": ((2, 9, 16), 4, (4, 9, 9), None),
    "bias_and_mask_per_batch": ((2, 9, 16), 4, (4, 9, 9), (2, 1, 9, 9)),
    "swin_windows": ((2, 3, 9, 16), 4, (3, 1, 9, 9), (3, 1, 9, 9)),  # per-window shift mask, over batch
    "swin_windows_rel_bias": ((2, 3, 9, 16), 4, (4, 9, 9), (3, 1, 9, 9)),  # bias per head, mask per window
}


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["no_qkv_bias", "qkv_bias"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_reference(case, qkv_bias):
  """Values and gradients (input and every parameter) equal the plain attention, for [B, T, C] and Swin's
  [B, windows, T, C] with biases/masks broadcast over batch or heads."""
  shape, num_heads, bias_shape, mask_shape = ATTENTION_CASES[case]
  x = normal(12, shape)
  bias = None if bias_shape is None else normal(13, bias_shape)
  mask = None if mask_shape is None else causal_ish_mask(mask_shape, 14)
  module = layers.Attention(num_heads, qkv_bias=qkv_bias)
  params = attention_params(module, x, 15)
  out, grads = value_and_grads(lambda x_, p: module.apply({"params": p}, x_, bias=bias, mask=mask), x, params)
  ref_out, ref_grads = value_and_grads(
      lambda x_, p: reference_attention(p, x_, num_heads, bias=bias, mask=mask), x, params)
  assert out.shape == shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref_out, rtol=RTOL, atol=ATOL)
  # Gradients pass through the softmax and the folded scale (rounded once in the parameters, not the logits) and
  # sum over B * T tokens: near-zero entries keep up to ~1e-6 absolute of rounding (measured 9.8e-7), so atol 2e-6.
  assert_trees_close(grads, ref_grads, rtol=RTOL, atol=2e-6)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_attention_param_tree_unchanged(qkv_bias):
  """query/key/value/out: `kernel` [C, C], `bias` [C] (q/k/v only with qkv_bias; out always), as the HF loader
  maps them; initialised as before (truncated normal 0.02 kernels, zero biases)."""
  x = jnp.zeros((2, 9, 16))
  params = jit(layers.Attention(4, qkv_bias=qkv_bias).init)(jax.random.key(0), x)["params"]
  expected = {name: {"kernel": (16, 16), **({"bias": (16,)} if qkv_bias or name == "out" else {})}
              for name in ("query", "key", "value", "out")}
  assert jax.tree.map(lambda p: p.shape, params) == expected
  for name in expected:
    kernel = np.asarray(params[name]["kernel"])
    assert 0.01 < kernel.std() < 0.03 and np.abs(kernel).max() <= 0.04 + 1e-6
    if "bias" in params[name]:
      assert not np.any(np.asarray(params[name]["bias"]))


def test_attention_dropout_path():
  """With attention dropout active the explicit-softmax path is taken: two dropout rngs give different outputs;
  deterministic=True equals the reference; and a negligible rate (no element dropped) equals the reference, so the
  explicit path applies the same scale, bias and mask as the fused one."""
  shape, num_heads, bias_shape, mask_shape = ATTENTION_CASES["swin_windows_rel_bias"]
  x = normal(16, shape)
  bias, mask = normal(17, bias_shape), causal_ish_mask(mask_shape, 18)
  module = layers.Attention(num_heads, dropout_rate=0.3)
  params = attention_params(module, x, 19)
  reference = np.asarray(jit(lambda p, x_: reference_attention(p, x_, num_heads, bias=bias, mask=mask))(
      params, x))

  @jit
  def apply(p, x_, rng):
    return module.apply({"params": p}, x_, bias=bias, mask=mask, deterministic=False, rngs={"dropout": rng})

  first, second = np.asarray(apply(params, x, jax.random.key(1))), np.asarray(apply(params, x, jax.random.key(2)))
  assert np.max(np.abs(first - second)) > 1e-2
  assert np.max(np.abs(first - reference)) > 1e-2
  deterministic = jit(lambda p, x_: module.apply({"params": p}, x_, bias=bias, mask=mask, deterministic=True))
  np.testing.assert_allclose(deterministic(params, x), reference, rtol=RTOL, atol=ATOL)
  # Keep probability 1 - 1e-7 rounds to 1 - 2^-23 in float32: P(any of 2*3*4*81 probs dropped) ~ 2e-4, and the
  # outcome is fixed by the rng; 1 / keep_prob rescales by 1 + 1.2e-7, within RTOL.
  tiny = jit(lambda p, x_, rng: module.clone(dropout_rate=1e-7).apply(
      {"params": p}, x_, bias=bias, mask=mask, deterministic=False, rngs={"dropout": rng}))
  np.testing.assert_allclose(tiny(params, x, jax.random.key(3)), reference, rtol=RTOL, atol=ATOL)
