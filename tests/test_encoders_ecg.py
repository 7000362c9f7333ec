"""ECG towers (patch transformer, 1-D ResNet): shapes at the 10 s / 500 Hz / 12-lead size, input validation, and
the encoder contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbind_jax.models import build_encoder
from test_encoders_vit import check_encoder_contract


def _shapes(encoder, inputs_shape):
  inputs = jax.ShapeDtypeStruct(inputs_shape, jnp.float32)
  return jax.eval_shape(encoder.apply, jax.eval_shape(encoder.init, jax.random.key(0), inputs), inputs)


def test_full_length_shapes():
  transformer = build_encoder("ecg_transformer")  # defaults: 5000 samples, 12 leads, 50-sample patches
  out = _shapes(transformer, (2, 5000, 12))
  assert out["pooled"].shape == (2, 256) and out["tokens"].shape == (2, 1 + 100, 256)
  resnet = build_encoder("ecg_resnet")
  out = _shapes(resnet, (2, 5000, 12))
  assert out["pooled"].shape == (2, resnet.width) and out["tokens"].shape[::2] == (2, 512)


def test_transformer_rejects_bad_lengths_and_leads():
  encoder = build_encoder("ecg_transformer", num_samples=500, patch_size=50)
  with pytest.raises(ValueError, match="multiple of patch_size"):
    _shapes(encoder, (1, 480, 12))
  with pytest.raises(ValueError, match="at most num_samples"):
    _shapes(encoder, (1, 550, 12))
  with pytest.raises(ValueError, match=r"\[B, T, 12\]"):
    _shapes(encoder, (1, 500, 8))
  assert _shapes(encoder, (1, 250, 12))["tokens"].shape == (1, 6, 256)  # shorter records use fewer positions


def test_transformer_contract():
  encoder = build_encoder("ecg_transformer", num_samples=200, num_leads=12, patch_size=20, hidden_size=32,
                          num_layers=1, num_heads=2, mlp_dim=64, pooling="mean", dropout_rate=0.1)
  waveforms = np.random.default_rng(0).normal(size=(2, 200, 12)).astype(np.float32)
  out, _ = check_encoder_contract(encoder, waveforms)
  assert out["tokens"].shape == (2, 11, 32)


def test_resnet_contract():
  encoder = build_encoder("ecg_resnet", num_samples=256, stem_channels=8, stage_channels=(8, 16),
                          blocks_per_stage=(1, 1), num_groups=4, dropout_rate=0.2)
  waveforms = np.random.default_rng(0).normal(size=(2, 256, 12)).astype(np.float32)
  out, _ = check_encoder_contract(encoder, waveforms)
  assert out["tokens"].shape == (2, 32, 16)  # 256 / 2 (stem) / 2 (pool) / 2 (second stage)
