"""The ECG augmentation's Gaussian noise (preprocess.gaussian_noise, a Box-Muller transform): its distribution,
scale, shape and independence, and that preprocess_ecg adds it at the configured level."""

import numpy as np
import pytest
from scipy import stats

from medbind_jax.data import preprocess


def test_samples_are_standard_normal_and_independent():
  z = preprocess.gaussian_noise(np.random.default_rng(0), (1000, 201), 1.0).ravel()
  assert stats.kstest(z, "norm").pvalue > 1e-3
  assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
  assert abs(stats.kurtosis(z)) < 0.05  # a uniform or a sum of few uniforms is far from 0
  # The cosine and sine halves come from the same uniforms: they must still be uncorrelated, and so must neighbours.
  half = (z.size + 1) // 2
  assert abs(np.corrcoef(z[:half], z[half:])[0, 1]) < 0.01
  assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01


@pytest.mark.parametrize("shape", [(7,), (1000, 12), (3, 5, 3)])
def test_shape_dtype_and_seed(shape):
  a = preprocess.gaussian_noise(np.random.default_rng(1), shape, 0.02)
  assert a.shape == shape and a.dtype == np.float32 and np.all(np.isfinite(a))
  np.testing.assert_array_equal(a, preprocess.gaussian_noise(np.random.default_rng(1), shape, 0.02))
  assert not np.array_equal(a, preprocess.gaussian_noise(np.random.default_rng(2), shape, 0.02))


def test_std_scales_the_samples():
  big = preprocess.gaussian_noise(np.random.default_rng(3), (200_000,), 0.02)
  assert abs(big.std() - 0.02) < 0.0005


def test_preprocess_ecg_adds_noise_at_the_configured_level():
  spec = preprocess.EcgSpec(num_samples=1000, amplitude_jitter=0.0, noise_mv=0.05)
  flat = np.zeros((1000, 12), np.float32)
  out = preprocess.preprocess_ecg(flat, spec.sampling_rate, spec, rng=np.random.default_rng(0))
  assert out.dtype == np.float32 and out.shape == (1000, 12)
  assert abs(out.std() - 0.05) < 0.002 and abs(out.mean()) < 0.003
  assert stats.kstest(out.ravel() / 0.05, "norm").pvalue > 1e-3
