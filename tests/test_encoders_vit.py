"""ViT tower: parity with transformers' ViTModel (incl. position-embedding interpolation), the encoder contract
(grayscale input, bf16, remat, dropout), the tiny config the CPU demo uses.

The helpers in the first section are shared by the other `test_encoders_*` files (imported by module name).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbind_jax.models import build_encoder

TINY = dict(image_size=64, patch_size=8, hidden_size=128, num_layers=3, num_heads=4, mlp_dim=256)

# --- Shared encoder-test helpers ---------------------------------------------------------------------------------

# Test graphs run once or twice, so XLA compile time dominates. LLVM optimisation off and the classic (non-MLIR)
# CPU fusion emitters compile the encoders about 4x faster on the 2-core machines, with the same results.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True,
                                                   "xla_cpu_use_fusion_emitters": False})


def perturb_(torch_model, seed=0):
  """Adds noise to every weight (LayerNorm scales and biases too) so that a wrongly mapped tensor shows."""
  import torch
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for parameter in torch_model.parameters():
      parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def random_params(encoder, inputs, seed=0):
  """Parameters of the right shapes drawn in numpy: skips compiling `init`, which costs seconds per tower."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(encoder.init, jax.random.key(0), inputs)["params"]
  return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def check_encoder_contract(encoder, inputs):
  """pooled [B, width] float32 and tokens [B, T, width]; bf16 compute close to fp32 but not equal; remat gives
  the same loss and gradients; dropout (rng 'dropout') acts only with train=True. Returns fp32 outputs+params.
  Checks run in numpy: every eager jnp op would compile a kernel of its own."""
  params = random_params(encoder, inputs)
  out = jit(encoder.apply)({"params": params}, inputs)
  pooled = np.asarray(out["pooled"])
  batch = jax.tree.leaves(inputs)[0].shape[0]
  assert pooled.shape == (batch, encoder.width) and pooled.dtype == np.float32
  assert out["tokens"].ndim == 3 and out["tokens"].shape[-1] == encoder.width

  pooled_bf16 = np.asarray(jit(encoder.clone(dtype=jnp.bfloat16).apply)({"params": params}, inputs)["pooled"])
  assert pooled_bf16.dtype == np.float32
  assert 0 < np.max(np.abs(pooled_bf16 - pooled)) < 0.1

  direction = np.random.default_rng(2).standard_normal(pooled.shape).astype(np.float32)

  def train_loss_and_grads(module):
    def loss(p):
      train_pooled = module.apply({"params": p}, inputs, train=True, rngs={"dropout": jax.random.key(1)})["pooled"]
      return jnp.sum(train_pooled * direction)
    return jax.device_get(jit(jax.value_and_grad(loss))(params))

  loss, grads = train_loss_and_grads(encoder)
  loss_remat, grads_remat = train_loss_and_grads(encoder.clone(remat=True))
  assert not np.isclose(loss, np.sum(pooled * direction))  # dropout was active
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  # Same values up to float32 rounding (XLA fuses the recomputed forward pass differently).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_remat, grads)
  return out, params


# --- ViT -------------------------------------------------------------------------------------------------------


def test_matches_transformers_vit_model(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from medbind_jax.models.hf_loading import load_pretrained

  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                  image_size=32, patch_size=8, num_channels=3)
  torch.manual_seed(0)
  reference = transformers.ViTModel(config).eval()
  perturb_(reference)
  reference.save_pretrained(tmp_path)
  encoder, params = load_pretrained("vit", str(tmp_path), use_pooler=True)
  apply = jit(encoder.apply)

  rng = np.random.default_rng(0)
  for height, width in ((32, 32), (44, 36)):  # the config's size, then a non-square grid with leftover pixels
    images = rng.normal(size=(2, height, width, 3)).astype(np.float32)
    with torch.no_grad():
      expected = reference(torch.from_numpy(images.transpose(0, 3, 1, 2)), interpolate_pos_encoding=True)
    out = apply({"params": params}, images)
    np.testing.assert_allclose(out["tokens"], expected.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["pooled"], expected.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_tiny_config_shapes():
  encoder = build_encoder("vit", **TINY)
  assert encoder.width == 128
  images = jax.ShapeDtypeStruct((2, 64, 64, 1), jnp.float32)
  params = jax.eval_shape(encoder.init, jax.random.key(0), images)
  out = jax.eval_shape(encoder.apply, params, images)
  assert out["pooled"].shape == (2, 128) and out["tokens"].shape == (2, 1 + 64, 128)


def test_contract_and_grayscale_input():
  encoder = build_encoder("vit", image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                          dropout_rate=0.1)
  gray = np.random.default_rng(1).normal(size=(2, 32, 32, 1)).astype(np.float32)
  out, params = check_encoder_contract(encoder, gray)
  # A 1-channel image into the 3-channel tower is the same as the image repeated over channels.
  rgb_out = jit(encoder.apply)({"params": params}, np.repeat(gray, 3, axis=-1))
  np.testing.assert_array_equal(rgb_out["pooled"], out["pooled"])


def test_convolutional_stem_keeps_the_token_grid():
  encoder = build_encoder("vit", image_size=32, patch_size=8, num_channels=1, hidden_size=32, num_layers=1,
                          num_heads=2, mlp_dim=64, stem_channels=(8, 16), pooling="mean", dropout_rate=0.1)
  images = np.random.default_rng(2).normal(size=(2, 32, 32, 1)).astype(np.float32)
  out, params = check_encoder_contract(encoder, images)
  assert out["tokens"].shape == (2, 1 + 4 * 4, 32)
  # Two stride-2 convs, then a 2x2 patch conv: 8 pixels per token as without the stem.
  assert params["stem_0"]["kernel"].shape == (3, 3, 1, 8) and params["stem_1"]["kernel"].shape == (3, 3, 8, 16)
  assert params["patch_embed"]["kernel"].shape == (2, 2, 16, 32)
  with pytest.raises(ValueError, match="not divisible"):
    bad = build_encoder("vit", image_size=24, patch_size=6, num_channels=1, hidden_size=32, num_layers=1,
                        num_heads=2, mlp_dim=64, stem_channels=(8, 16, 32))
    jit(bad.init)(jax.random.key(0), np.zeros((1, 24, 24, 1), np.float32))
