"""CXR images of the converters: `prepare_image` checks that an image decodes and gives the bytes to store (the
original, or an 8-bit grayscale PNG when it must be converted or downscaled)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from data_prep.errors import RecordError

MIN_IMAGE_SIDE = 32


def _to_gray8(image: Image.Image) -> Image.Image:
  """8-bit grayscale; 16/32-bit images are min-max scaled to 0..255 (chest X-rays are grayscale)."""
  if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
    arr = np.asarray(image, np.float64)
    low, high = float(arr.min()), float(arr.max())
    arr = (arr - low) / (high - low) * 255.0 if high > low else np.zeros_like(arr)
    return Image.fromarray(np.rint(arr).astype(np.uint8))
  return image.convert("L")


def prepare_image(data: bytes, image_size: int, name: str = "image") -> bytes:
  """Checks that `data` decodes and returns the bytes to store.

  Kept as they are (no re-compression) when they are an 8-bit grayscale/RGB PNG or JPEG and either
  `image_size` is 0 or the longest side is at most `image_size`. Otherwise converted to 8-bit grayscale, resized
  (Lanczos, aspect kept) so the longest side is `image_size` when it was larger, and stored as PNG (lossless
  from there on). RecordError when the image cannot be decoded or is smaller than 32 px.
  """
  if not data:
    raise RecordError("unreadable image", f"{name} is empty")
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as err:  # PIL raises several types on bad data
    raise RecordError("unreadable image", f"{name}: {err}") from err
  width, height = image.size
  if min(width, height) < MIN_IMAGE_SIDE:
    raise RecordError("image too small", f"{name} is {width}x{height}, under {MIN_IMAGE_SIDE} px")
  fits = image_size == 0 or max(width, height) <= image_size
  if fits and image.format in ("PNG", "JPEG") and image.mode in ("L", "RGB"):
    return data
  image = _to_gray8(image)
  if not fits:
    scale = image_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
  out = io.BytesIO()
  image.save(out, format="PNG")
  return out.getvalue()
