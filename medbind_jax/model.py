"""The MEDBind model: one encoder tower per modality, projection heads into a shared L2-normalised space, and
learnable logit scales, all keyed by name.

Parameter tree: {'towers': {modality: ...}, 'heads': {modality: ...}, 'logit_scales': {temperature: []}}, e.g.
`towers/cxr/...`, `heads/text/out/kernel`, `logit_scales/cxr_ecg`. Every method is pure
(`model.apply(variables, ..., method=...)`).
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


class Keyed(nn.Module):
  """Submodules by name, with parameters under `<this module>/<name>/...` (a Flax dict field would name them
  `<field>_<name>`)."""

  members: Mapping[str, nn.Module]

  def setup(self):
    for name, module in self.members.items():
      setattr(self, name, module.clone(name=name, parent=self))

  def __getitem__(self, name: str) -> nn.Module:
    return getattr(self, name)


class LogitScales(nn.Module):
  """One learnable temperature t per name; `__call__` gives s = exp(t) clipped at `max_scale` (no gradient past
  the clip)."""

  names: tuple[str, ...]
  init_value: float
  max_scale: float

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    return {name: jnp.exp(jnp.minimum(self.param(name, nn.initializers.constant(self.init_value), ()),
                                      math.log(self.max_scale))) for name in self.names}


class LogitBiases(nn.Module):
  """One learnable bias per name (sigmoid edges), initialised to `init_value`."""

  names: tuple[str, ...]
  init_value: float

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    return {name: self.param(name, nn.initializers.constant(self.init_value), ()) for name in self.names}


class MedBind(nn.Module):
  """Embedding model of any set of modalities.

  Attributes:
    towers: modality -> tower following the `medbind_jax.models` contract ('text' embeds reports).
    logit_scale_names: the learnable temperatures (edge names, or the names edges share).
    embed_dim: d, the shared space's dimension.
    head_hidden_dim: 0 for linear heads, else the MLP heads' hidden width.
    logit_scale_init, max_logit_scale: s = exp(t), t initialised to `logit_scale_init`, s clipped at the max.
    logit_bias_names, logit_bias_init: the learnable biases of sigmoid edges (parameters `logit_biases/<edge>`).
    dtype: compute dtype of the projection heads.
  """

  towers: Mapping[str, nn.Module]
  logit_scale_names: tuple[str, ...]
  embed_dim: int = 256
  head_hidden_dim: int = 0
  logit_scale_init: float = math.log(1 / 0.07)
  max_logit_scale: float = 100.0
  logit_bias_names: tuple[str, ...] = ()
  logit_bias_init: float = -10.0
  dtype: Any = jnp.float32  # the heads' compute dtype; their output is float32

  def setup(self):
    self.tower_modules = Keyed(dict(self.towers), name="towers")
    self.heads = Keyed({m: ProjectionHead(self.embed_dim, self.head_hidden_dim, self.dtype) for m in self.towers},
                       name="heads")
    self.logit_scales_module = LogitScales(tuple(self.logit_scale_names), self.logit_scale_init,
                                           self.max_logit_scale, name="logit_scales")
    if self.logit_bias_names:
      self.logit_biases_module = LogitBiases(tuple(self.logit_bias_names), self.logit_bias_init, name="logit_biases")

  @property
  def modalities(self) -> list[str]:
    return sorted(self.towers)

  def features(self, modality: str, inputs, train: bool = False) -> jax.Array:
    """Tower output before the head: [B, width]."""
    return self.tower_modules[modality](inputs, train=train)["pooled"]

  def project(self, modality: str, features: jax.Array) -> jax.Array:
    """Head + L2 normalisation: [B, width] -> [B, d] float32."""
    return l2_normalize(self.heads[modality](features))

  def embed(self, modality: str, inputs, train: bool = False) -> jax.Array:
    """Inputs of one modality -> [B, d] unit vectors in the shared space."""
    return self.project(modality, self.features(modality, inputs, train))

  def logit_scales(self) -> dict[str, jax.Array]:
    """Temperature name -> s = exp(t) clipped at `max_logit_scale`; and `bias/<edge>` -> b for sigmoid edges."""
    scales = self.logit_scales_module()
    if self.logit_bias_names:
      scales.update({f"bias/{name}": b for name, b in self.logit_biases_module().items()})
    return scales

  def init_heads(self):
    """Touches only the heads and logit scales, so `init(..., method=MedBind.init_heads)` creates just those."""
    for modality in self.modalities:
      self.project(modality, jnp.zeros((1, self.towers[modality].width), jnp.float32))
    return self.logit_scales()


def tower_kwargs(tower_config: ml_collections.ConfigDict) -> dict:
  """Module fields of a tower from its config; dtype names ('bfloat16') become dtypes, lists (as a config
  reloaded from JSON holds them) tuples."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (tower_config.get("kwargs", {}) or {}).items()}
  for key in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(key), str):
      kwargs[key] = jnp.dtype(kwargs[key])
  return kwargs


def build_tower(tower_config: ml_collections.ConfigDict, **defaults) -> tuple[nn.Module, Any]:
  """(module, pretrained params or None) for one `config.model.towers.<modality>` entry.

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


def build_model(config: ml_collections.ConfigDict) -> tuple[MedBind, dict[str, Any]]:
  """Builds MedBind from `config.model` and the edges of `config.loss`; returns it with {modality: pretrained
  tower params} for the towers that have an `init` checkpoint. Towers are built for the modalities the edges
  name; each must have an entry in `config.model.towers`."""
  model_config = config.model
  edges = losses.edges_from_config(config.loss.edges, per_edge_logit_scale=model_config.per_edge_logit_scale)
  needed = sorted({m for edge in edges for m in edge.modalities})
  missing = [m for m in needed if m not in model_config.towers]
  if missing:
    raise ValueError(f"the loss edges use modalities {missing} that config.model.towers does not configure "
                     f"(it has {sorted(model_config.towers)})")
  towers, pretrained = {}, {}
  # Model-wide switches: compute dtype (e.g. 'bfloat16'; parameters stay float32) and rematerialisation.
  defaults = {}
  if model_config.get("dtype"):
    defaults["dtype"] = jnp.dtype(model_config.dtype)
  if model_config.get("remat"):
    defaults["remat"] = True
  for modality in needed:
    towers[modality], params = build_tower(model_config.towers[modality], **defaults)
    if params is not None:
      pretrained[modality] = params
  model = MedBind(
      towers=towers,
      logit_scale_names=tuple(sorted({edge.logit_scale for edge in edges})),
      embed_dim=model_config.embed_dim,
      head_hidden_dim=model_config.head_hidden_dim,
      logit_scale_init=model_config.logit_scale_init,
      max_logit_scale=model_config.max_logit_scale,
      logit_bias_names=tuple(sorted(edge.name for edge in edges if edge.kind == "sigmoid")),
      logit_bias_init=model_config.get("logit_bias_init", -10.0),
      dtype=defaults.get("dtype", jnp.float32),
  )
  return model, pretrained


def init_params(model: MedBind, rng: jax.Array, pretrained: Mapping[str, Any]) -> dict[str, Any]:
  """Parameters: the `pretrained` towers as loaded, the other towers, heads and logit scales at random.

  Towers are initialised one by one (tower k, in sorted modality order, from the k-th of len(towers) + 1 keys;
  the last key draws heads and scales), so a pretrained tower is never also initialised at random (for a BERT
  that would cost a large init program for nothing).
  """
  modalities = model.modalities
  tower_rngs = jax.random.split(rng, len(modalities) + 1)
  towers = {}
  for modality, tower_rng in zip(modalities, tower_rngs):
    if modality in pretrained:
      towers[modality] = pretrained[modality]
    else:
      tower = model.towers[modality]
      towers[modality] = jax.jit(tower.init)(tower_rng, tower.example_inputs(1))["params"]
  params = {"towers": towers}
  params.update(jax.jit(lambda r: model.init(r, method=MedBind.init_heads))(tower_rngs[-1])["params"])
  return flax.core.unfreeze(params)
