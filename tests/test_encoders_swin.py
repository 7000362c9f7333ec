"""Swin tower: parity with transformers' SwinModel at the config's size and at a size that needs every kind of
padding (pixels to the patch, maps to the window, odd maps before merging), windowed-attention helpers, and the
encoder contract."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbind_jax.models import build_encoder
from medbind_jax.models import swin
from test_encoders_vit import check_encoder_contract, jit, perturb_

SMALL = dict(image_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)


def test_matches_transformers_swin_model(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from medbind_jax.models.hf_loading import load_pretrained

  config = transformers.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[2, 2],
                                   num_heads=[2, 4], window_size=4, drop_path_rate=0.0)
  torch.manual_seed(0)
  reference = transformers.SwinModel(config).eval()
  perturb_(reference)
  reference.save_pretrained(tmp_path)
  encoder, params = load_pretrained("swin", str(tmp_path))

  rng = np.random.default_rng(0)
  # 32x32: maps 8x8 then 4x4 (window == map: no shift). 36x45: pixels padded to 36x48, map 9x12 padded to
  # 12x12 for the windows, padded to 10x12 before merging, then 5x6 padded to 8x8, shifted windows in both stages.
  for height, width in ((32, 32), (36, 45)):
    images = rng.normal(size=(2, height, width, 3)).astype(np.float32)
    # SwinModel turns off the shift for good once it has seen a map no larger than the window: a fresh copy
    # per input size keeps the reference stateless.
    with torch.no_grad():
      expected = copy.deepcopy(reference)(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    out = jit(encoder.apply)({"params": params}, images)
    np.testing.assert_allclose(out["tokens"], expected.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["pooled"], expected.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_window_partition_round_trip_and_shift_mask():
  x = np.arange(2 * 8 * 12 * 3, dtype=np.float32).reshape(2, 8, 12, 3)
  windows = swin.to_windows(x, 4)
  assert windows.shape == (2, 6, 16, 3)
  np.testing.assert_array_equal(windows[0, 1].reshape(4, 4, 3), x[0, :4, 4:8])  # row-major window order
  np.testing.assert_array_equal(swin.from_windows(windows, 4, 8, 12), x)

  mask = swin.shift_region_mask(8, 8, window=4, shift=2)
  assert mask.shape == (4, 16, 16)
  assert not mask[0].any()  # the top-left window holds one region only
  assert (mask[3] != 0).any() and (mask[3] == mask[3].T).all()


def test_window_shrinks_to_small_maps():
  assert swin.effective_window(8, 8, 4, shifted=True) == (4, 2)
  assert swin.effective_window(4, 6, 4, shifted=True) == (4, 0)  # map no larger than the window: no shift
  assert swin.effective_window(3, 5, 4, shifted=True) == (3, 0)
  # A 3x3 window indexes the middle of the 4x4 window's (7 x 7) bias table.
  index = swin.relative_position_index(3, table_window=4)
  assert index.shape == (9, 9) and index.min() == 8 and index.max() == 40 and index[0, 0] == 24


def test_small_inputs_below_the_window():
  encoder = build_encoder("swin", **SMALL)
  assert encoder.width == 32
  # 24x24 -> maps 6x6 (shifted windows) then 3x3, smaller than the window (Hugging Face cannot run this).
  images = jax.ShapeDtypeStruct((2, 24, 24, 1), jnp.float32)
  out = jax.eval_shape(encoder.apply, jax.eval_shape(encoder.init, jax.random.key(0), images), images)
  assert out["pooled"].shape == (2, 32) and out["tokens"].shape == (2, 9, 32)


def test_contract():
  # One stage of a plain and a shifted block: enough for bf16 / remat / dropout / drop-path, cheap to compile.
  encoder = build_encoder("swin", image_size=16, patch_size=4, embed_dim=16, depths=(2,), num_heads=(2,),
                          window_size=2, dropout_rate=0.1, drop_path_rate=0.1)
  images = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
  out, _ = check_encoder_contract(encoder, images)
  assert out["tokens"].shape == (2, 16, 16)
