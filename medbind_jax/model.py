"""The MEDBind model: one encoder tower per modality, projection heads into a shared L2-normalised space,
and learnable logit scales.

Parameter tree: {'cxr_encoder', 'ecg_encoder', 'text_encoder', 'cxr_head', 'ecg_head', 'text_head',
'logit_scale'}. Every method is pure (`model.apply(variables, ..., method=...)`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import flax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from medbind_jax import losses
from medbind_jax.data import text
from medbind_jax.models import build_encoder, hf_loading

MODALITIES = ("cxr", "ecg", "text")


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class ProjectionHead(nn.Module):
  """Linear map (or a one-hidden-layer GELU MLP when `hidden_dim`) to the shared space; float32 output."""

  embed_dim: int
  hidden_dim: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.hidden_dim:
      x = nn.gelu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="hidden")(x))
    return nn.Dense(self.embed_dim, dtype=self.dtype, name="out")(x).astype(jnp.float32)


class MedBind(nn.Module):
  """Tri-modal embedding model.

  Attributes:
    cxr_encoder, ecg_encoder, text_encoder: towers following the `medbind_jax.models` contract.
    embed_dim: d, the shared space's dimension.
    head_hidden_dim: 0 for linear heads, else the MLP heads' hidden width.
    per_edge_logit_scale: one learnable temperature per edge in `losses.EDGES`, else one shared.
    logit_scale_init, max_logit_scale: s = exp(t), t initialised to `logit_scale_init`, s clipped at the max.
    dtype: compute dtype of the projection heads.
  """

  cxr_encoder: nn.Module
  ecg_encoder: nn.Module
  text_encoder: nn.Module
  embed_dim: int = 256
  head_hidden_dim: int = 0
  per_edge_logit_scale: bool = False
  logit_scale_init: float = math.log(1 / 0.07)
  max_logit_scale: float = 100.0
  dtype: Any = jnp.float32  # the heads' compute dtype; their output is float32

  def setup(self):
    self.cxr_head = ProjectionHead(self.embed_dim, self.head_hidden_dim, self.dtype)
    self.ecg_head = ProjectionHead(self.embed_dim, self.head_hidden_dim, self.dtype)
    self.text_head = ProjectionHead(self.embed_dim, self.head_hidden_dim, self.dtype)
    num_scales = len(losses.EDGES) if self.per_edge_logit_scale else 1
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(self.logit_scale_init), (num_scales,))

  def encoder(self, modality: str) -> nn.Module:
    return {"cxr": self.cxr_encoder, "ecg": self.ecg_encoder, "text": self.text_encoder}[modality]

  def features(self, modality: str, inputs, train: bool = False) -> jax.Array:
    """Tower output before the head: [B, width]."""
    return self.encoder(modality)(inputs, train=train)["pooled"]

  def project(self, modality: str, features: jax.Array) -> jax.Array:
    """Head + L2 normalisation: [B, width] -> [B, d] float32."""
    head = {"cxr": self.cxr_head, "ecg": self.ecg_head, "text": self.text_head}[modality]
    return l2_normalize(head(features))

  def embed(self, modality: str, inputs, train: bool = False) -> jax.Array:
    """Inputs of one modality -> [B, d] unit vectors in the shared space."""
    return self.project(modality, self.features(modality, inputs, train))

  def logit_scales(self) -> dict[str, jax.Array]:
    """Edge -> s = exp(t) clipped at `max_logit_scale` (no gradient past the clip)."""
    scales = jnp.exp(jnp.minimum(self.logit_scale, math.log(self.max_logit_scale)))
    return {edge: scales[i if self.per_edge_logit_scale else 0] for i, edge in enumerate(losses.EDGES)}

  def init_heads(self):
    """Touches only the heads and logit scales, so `init(..., method=MedBind.init_heads)` creates just those."""
    for modality in MODALITIES:
      self.project(modality, jnp.zeros((1, self.encoder(modality).width), jnp.float32))
    return self.logit_scales()

  def __call__(self, cxr, ecg, text, train: bool = False):
    """Embeds one batch of each modality."""
    return {"cxr": self.embed("cxr", cxr, train), "ecg": self.embed("ecg", ecg, train),
            "text": self.embed("text", text, train)}


def tower_kwargs(tower_config: ml_collections.ConfigDict) -> dict:
  """Module fields of a tower from its config; dtype names ('bfloat16') become dtypes, lists (as a config
  reloaded from JSON holds them) tuples."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (tower_config.get("kwargs", {}) or {}).items()}
  for key in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return kwargs


def build_tower(tower_config: ml_collections.ConfigDict, **defaults) -> tuple[nn.Module, Any]:
  """(module, pretrained params or None) for one `config.model.<modality>` entry.

  With `init` set (a local Hugging Face directory; 'minilm' for the packaged MiniLM), the module is shaped by
  the checkpoint's config.json with `kwargs` as overrides, and the weights are loaded strictly. `defaults`
  (e.g. the model-wide dtype and remat switches) apply where the tower's own `kwargs` do not set them.
  """
  kwargs = tower_kwargs(tower_config)
  for key, value in defaults.items():
    kwargs.setdefault(key, value)
  if tower_config.get("init"):
    directory = text.resolve_pretrained(tower_config.init)
    return hf_loading.load_pretrained(tower_config.name, directory, skip_keys=tuple(tower_config.skip_keys),
                                      **kwargs)
  return build_encoder(tower_config.name, **kwargs), None


def build_model(model_config: ml_collections.ConfigDict) -> tuple[MedBind, dict[str, Any]]:
  """Builds MedBind from `config.model`; returns it with {modality: pretrained tower params} for the towers
  that have an `init` checkpoint."""
  towers, pretrained = {}, {}
  # Model-wide switches: compute dtype (e.g. 'bfloat16'; parameters stay float32) and rematerialisation.
  defaults = {}
  if model_config.get("dtype"):
    defaults["dtype"] = jnp.dtype(model_config.dtype)
  if model_config.get("remat"):
    defaults["remat"] = True
  for modality in MODALITIES:
    towers[modality], params = build_tower(model_config[modality], **defaults)
    if params is not None:
      pretrained[modality] = params
  model = MedBind(
      cxr_encoder=towers["cxr"],
      ecg_encoder=towers["ecg"],
      text_encoder=towers["text"],
      embed_dim=model_config.embed_dim,
      head_hidden_dim=model_config.head_hidden_dim,
      per_edge_logit_scale=model_config.per_edge_logit_scale,
      logit_scale_init=model_config.logit_scale_init,
      max_logit_scale=model_config.max_logit_scale,
      dtype=defaults.get("dtype", jnp.float32),
  )
  return model, pretrained


def init_params(model: MedBind, rng: jax.Array, pretrained: Mapping[str, Any]) -> dict[str, Any]:
  """Parameters: the `pretrained` towers as loaded, the other towers, heads and logit scales at random.

  Towers are initialised one by one, so a pretrained tower is never also initialised at random (for a BERT
  that would cost a large init program for nothing).
  """
  tower_rngs = jax.random.split(rng, len(MODALITIES) + 1)
  params = {}
  for modality, tower_rng in zip(MODALITIES, tower_rngs):
    if modality in pretrained:
      params[f"{modality}_encoder"] = pretrained[modality]
    else:
      tower = model.encoder(modality)
      params[f"{modality}_encoder"] = jax.jit(tower.init)(tower_rng, tower.example_inputs(1))["params"]
  params.update(jax.jit(lambda r: model.init(r, method=MedBind.init_heads))(tower_rngs[-1])["params"])
  return flax.core.unfreeze(params)
