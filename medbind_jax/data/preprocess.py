"""Per-example decoding, normalisation and augmentation for each modality, and text identity keys.

All functions are pure numpy/PIL and deterministic given their `rng`, so a batch is a function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from fractions import Fraction

import numpy as np
from PIL import Image
from scipy import signal

from medbind_jax.data import leads as lead_names
from medbind_jax.data import schema


class InputError(ValueError):
  """An input (image, ECG record or text) that cannot be used; the message names the input."""


# ----------------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
  """Case- and whitespace-insensitive form under which two reports count as the same text."""
  return " ".join(text.lower().split())


def text_key(text: str) -> np.ndarray:
  """[2] int32: the halves of a 64-bit hash of the normalised text (JAX runs in 32-bit by default).

  Equal keys mark duplicate reports, which TMCL treats as extra positives. A 64-bit hash makes a collision
  within a batch (~1e-15 for 256 texts) negligible.
  """
  digest = hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=8).digest()
  return np.frombuffer(digest, dtype="<i4").astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------
# CXR
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CxrSpec:
  image_size: int = 64
  channels: int = 1
  mean: float = 0.5
  std: float = 0.25
  crop_scale: tuple[float, float] = (0.8, 1.0)  # area fraction kept by the training crop
  jitter: float = 0.1  # brightness / contrast jitter amplitude in training


def load_image(data: bytes | np.ndarray | Image.Image, name: str = "image") -> Image.Image:
  """Decodes encoded bytes, or wraps an array ([H, W] or [H, W, C], uint8 or float in [0, 1]), as a PIL image."""
  if isinstance(data, Image.Image):
    return data
  if isinstance(data, np.ndarray):
    arr = data
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    if arr.ndim not in (2, 3):
      raise InputError(f"{name}: expected an image array [H, W] or [H, W, C], got shape {arr.shape}")
    if arr.dtype != np.uint8:
      arr = np.clip(np.asarray(arr, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as err:  # PIL raises several types for bad data
    raise InputError(f"{name}: cannot decode image ({err})") from err
  return image


def preprocess_cxr(data, spec: CxrSpec, rng: np.random.Generator | None = None,
                   name: str = "image") -> np.ndarray:
  """Image -> float32 [S, S, channels], normalised. With `rng`, a random crop and intensity jitter."""
  image = load_image(data, name).convert("L" if spec.channels == 1 else "RGB")
  if rng is not None:
    w, h = image.size
    scale = rng.uniform(*spec.crop_scale)
    aspect = np.exp(rng.uniform(-0.1, 0.1))
    cw = min(w, int(round(w * np.sqrt(scale * aspect))))
    ch = min(h, int(round(h * np.sqrt(scale / aspect))))
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    image = image.crop((x0, y0, x0 + cw, y0 + ch))
  image = image.resize((spec.image_size, spec.image_size), Image.BILINEAR)
  x = np.asarray(image, np.float32) / 255.0
  if x.ndim == 2:
    x = x[..., None]
  if rng is not None:
    contrast, brightness = 1.0 + rng.uniform(-spec.jitter, spec.jitter), rng.uniform(-spec.jitter, spec.jitter)
    mean = x.mean()
    x = (x - mean) * contrast + mean + brightness
  return (x - spec.mean) / spec.std


# ----------------------------------------------------------------------------------------------------------------
# ECG
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EcgSpec:
  sampling_rate: float = 100.0
  num_samples: int = 1000
  leads: tuple[str, ...] = schema.LEADS_12
  scale_mv: float = 1.0  # model input = millivolts / scale_mv
  amplitude_jitter: float = 0.1  # training: random gain in [1 - a, 1 + a]
  noise_mv: float = 0.02  # training: additive Gaussian noise


def canonical_leads(signal_mv: np.ndarray, leads, spec: EcgSpec, name: str = "ecg") -> np.ndarray:
  """The leads `spec.leads` of a signal whose columns are named `leads` (matched by `lead_names.match_leads`, the
  package's one lead-name rule: an inverted lead such as '-aVR' is negated back to the lead; other leads such as
  Frank's vx/vy/vz are left out); `leads` None: the columns are `spec.leads` in order. InputError naming the input
  and, for names, the missing, duplicate and unrecognised ones."""
  signal_mv = np.asarray(signal_mv)
  if signal_mv.ndim != 2:
    raise InputError(f"{name}: expected an ECG array [num_samples, num_leads], got shape {signal_mv.shape}")
  if leads is None:
    if signal_mv.shape[1] != len(spec.leads):
      raise InputError(f"{name}: {signal_mv.shape[1]} leads without names; expected {len(spec.leads)} in the "
                       f"order {', '.join(spec.leads)}")
    return signal_mv
  if len(leads) != signal_mv.shape[1]:
    raise InputError(f"{name}: {signal_mv.shape[1]} signal columns but {len(leads)} lead names")
  try:
    columns, signs = lead_names.match_leads(leads, spec.leads)
  except lead_names.LeadError as err:
    raise InputError(f"{name}: {err}") from err
  x = signal_mv[:, columns]
  return x * np.asarray(signs, np.int8) if min(signs) < 0 else x


def gaussian_noise(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
  """float32 N(0, std^2) samples of `shape`, by the Box-Muller transform of float32 uniforms.

  Written here rather than `rng.standard_normal(shape, dtype=np.float32)`: numpy's float32 ziggurat took 0.2 ms per
  1000 x 12 ECG on the 2-core machines, a fifth of the input pipeline's time per example; uniforms and four
  vectorised float32 transcendentals take a third of that. Exact normals, except the tail beyond 5.8 std (1 - u
  >= 2^-24 bounds the radius), which has probability 8e-9.
  """
  size = int(np.prod(shape))
  half = (size + 1) // 2
  u = rng.random((2, half), dtype=np.float32)
  radius = np.sqrt(np.log1p(-u[0]) * np.float32(-2.0 * std * std))  # 1 - u in (0, 1]: the log is finite
  angle = u[1] * np.float32(2.0 * np.pi)
  out = np.empty(2 * half, np.float32)
  np.multiply(radius, np.cos(angle), out=out[:half])
  np.multiply(radius, np.sin(angle), out=out[half:])
  return out[:size].reshape(shape)


def preprocess_ecg(signal_mv: np.ndarray, sampling_rate: float, spec: EcgSpec, leads=None,
                   rng: np.random.Generator | None = None, name: str = "ecg") -> np.ndarray:
  """ECG in millivolts [T, L] at `sampling_rate` -> float32 [num_samples, len(spec.leads)].

  Resamples with a polyphase filter, crops (randomly with `rng`, else from the start) or zero-pads to
  `spec.num_samples`, scales by `1 / scale_mv`. With `rng`, random gain and noise.
  """
  x = canonical_leads(signal_mv, leads, spec, name).astype(np.float32)
  bad = lead_names.non_finite(x, spec.leads)
  if bad:
    raise InputError(f"{name}: ECG contains non-finite samples: {bad}")
  if not sampling_rate > 0:
    raise InputError(f"{name}: sampling rate must be positive, got {sampling_rate}")
  if sampling_rate != spec.sampling_rate:
    ratio = Fraction(spec.sampling_rate / sampling_rate).limit_denominator(1000)
    x = signal.resample_poly(x, ratio.numerator, ratio.denominator, axis=0).astype(np.float32)
  length = x.shape[0]
  if length >= spec.num_samples:
    start = int(rng.integers(0, length - spec.num_samples + 1)) if rng is not None else 0
    x = x[start:start + spec.num_samples]
  else:
    x = np.pad(x, ((0, spec.num_samples - length), (0, 0)))
  if rng is None:
    return (x / spec.scale_mv).astype(np.float32)
  gain = rng.uniform(1 - spec.amplitude_jitter, 1 + spec.amplitude_jitter)
  noise = gaussian_noise(rng, x.shape, spec.noise_mv / spec.scale_mv)
  noise += x * np.float32(gain / spec.scale_mv)
  return noise
