"""Encoder towers, selected by name from the config.

  encoder = build_encoder("swin", embed_dim=96, depths=(2, 2, 6, 2), ...)   # random init
  encoder, params = hf_loading.load_pretrained("swin", "/ckpt/swin-tiny")  # from a Hugging Face directory
  out = encoder.apply({"params": params}, images, train=False)            # {"pooled": [B, width], "tokens": ...}

Every tower is a Flax Linen module whose `__call__(inputs, *, train=False)` returns a dict with `pooled`
[B, width] float32 and `tokens` [B, T, width] (last hidden state, compute dtype); `encoder.width` is known
before init, and `encoder.example_inputs(batch_size)` gives inputs of the right structure for `init`.
"""

from __future__ import annotations

from flax import linen as nn

ENCODERS: dict[str, type[nn.Module]] = {}


def register_encoder(name: str):
  """Class decorator: makes the tower buildable as `build_encoder(name, ...)`."""

  def register(cls):
    if name in ENCODERS:
      raise ValueError(f"encoder name {name!r} is already registered to {ENCODERS[name].__name__}")
    ENCODERS[name] = cls
    return cls

  return register


def build_encoder(name: str, **kwargs) -> nn.Module:
  """Instantiates the tower registered as `name` with module fields `kwargs`."""
  if name not in ENCODERS:
    raise ValueError(f"unknown encoder {name!r}; known encoders: {sorted(ENCODERS)}")
  return ENCODERS[name](**kwargs)


# Importing the tower modules fills the registry.
from medbind_jax.models import bert, ecg, swin, vit  # noqa: E402,F401
