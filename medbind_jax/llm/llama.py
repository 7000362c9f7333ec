"""A Llama-architecture causal decoder in Flax Linen (Llama 2/3, Mistral, SmolLM), with a KV cache for greedy
generation.

  model = Llama(LlamaConfig(...))                   # or loading.load_hf(dir) / loading.load_gguf(file)
  out = model.apply({"params": params}, input_ids, attention_mask=mask)     # out["logits"] [B, T, vocab] float32
  tokens = generate(model, params, prompt_ids, max_new_tokens=16)           # [B, 16] greedy continuation

Architecture (as Hugging Face's `LlamaForCausalLM` / `MistralForCausalLM`): token embedding; per layer
x + o_proj(attention(RMSNorm(x))) then x + down_proj(silu(gate_proj(h)) * up_proj(h)) with h = RMSNorm(x);
final RMSNorm; an output projection (`lm_head`) or the transposed embedding when tied. Attention is grouped-query
(`num_kv_heads` key/value heads, each shared by num_heads / num_kv_heads query heads) with rotary position
embeddings in Hugging Face's rotate-half layout (first half of each head's dimensions paired with the second),
plain theta or Llama-3's frequency-dependent scaling; Mistral's sliding window is honoured when set.

Parameter names mirror Hugging Face's (`layers_3/self_attn/q_proj/kernel` for `model.layers.3.self_attn.q_proj
.weight`), which is what `loading.py` maps checkpoints by, LoRA targets match (`q_proj|v_proj`), and
`param_rules` shards by. Parameters are stored in `param_dtype`; every matmul runs in the compute `dtype`; the
RMSNorm statistics, rotary angles, attention softmax and output logits are float32.

Inputs may be padded: `attention_mask` [B, T] (1 = token, 0 = padding) masks padded keys, and rotary positions
count only real tokens (cumsum(mask) - 1), as Hugging Face derives them, so left-padded batches generate what each
prompt would alone. `inputs_embeds` [B, T, hidden] replaces the token lookup (soft tokens); `embed` gives the
lookup alone.

The cache (`init_cache`) is a pytree: per layer the keys and values of `max_length` slots, which slots hold a
real token, the next slot to write and each row's next rotary position. A call with `cache=` writes its T tokens
at the next T slots and attends to every filled slot before (and at) each query; it returns the updated cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from medbind_jax.llm import lora as lora_lib
from medbind_jax.sharding import FSDP_AXIS

Dtype = Any

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of the decoder (Hugging Face `config.json` names in brackets where they differ).

  rope_type: 'default' (inv_freq = theta^(-2i/d)), 'linear' (inv_freq / rope_factor) or 'llama3' (Llama 3.1's
  wavelength-dependent scaling by rope_factor between rope_low_freq_factor and rope_high_freq_factor relative to
  rope_original_max_positions). rope_freq_factors: per-frequency divisors (llama.cpp's `rope_freqs` tensor in a
  GGUF), applied after the above. sliding_window: Mistral's window (a query sees keys fewer than this many slots
  back), None for full causal attention. dtype: compute dtype; param_dtype: storage dtype of new parameters.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int  # [num_hidden_layers]
  num_heads: int  # [num_attention_heads]
  num_kv_heads: int  # [num_key_value_heads]
  head_dim: int | None = None  # default hidden_size // num_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  rope_freq_factors: tuple[float, ...] | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()  # [eos_token_id], a tuple even for one id
  pad_token_id: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type {self.rope_type!r} is not implemented; known: {ROPE_TYPES}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}: "
                       "set head_dim")
    if self.rotary_dim % 2:
      raise ValueError(f"head_dim={self.rotary_dim} must be even for rotary embeddings")
    if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.rotary_dim // 2:
      raise ValueError(f"rope_freq_factors has {len(self.rope_freq_factors)} entries, head_dim / 2 = "
                       f"{self.rotary_dim // 2} expected")

  @property
  def rotary_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)


def param_rules(config: LlamaConfig) -> tuple[tuple[str, tuple[str | None, ...]], ...]:
  """`config.mesh.param_rules` for the decoder (see `medbind_jax/sharding.py`): every weight matrix split over
  `fsdp` along its model-width (hidden_size) dimension, norms replicated. Regexes match the decoder's parameters
  wherever it sits in a larger tree; LoRA adapters fall to the default rule (small ones replicated)."""
  rules = [
      (r"(^|/)embed_tokens/embedding$", (None, FSDP_AXIS)),
      (r"(^|/)layers_\d+/(self_attn/(q|k|v)_proj|mlp/(gate|up)_proj)/kernel$", (FSDP_AXIS, None)),
      (r"(^|/)layers_\d+/(self_attn/o_proj|mlp/down_proj)/kernel$", (None, FSDP_AXIS)),
      (r"(^|/)(layers_\d+/(input|post_attention)_layernorm|norm)/scale$", (None,)),
  ]
  if config.attention_bias or config.mlp_bias:
    rules.append((r"(^|/)layers_\d+/(self_attn|mlp)/\w+_proj/bias$", (None,)))
  if not config.tie_word_embeddings:
    rules.append((r"(^|/)lm_head/kernel$", (FSDP_AXIS, None)))
  return tuple(rules)


# --- Rotary position embeddings --------------------------------------------------------------------------------

def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [head_dim / 2] (float32, computed as Hugging Face does, in float32)."""
  dim = config.rotary_dim
  inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32)
                                                                      / np.float32(dim)))).astype(np.float32)
  if config.rope_type == "linear":
    inv_freq = inv_freq / np.float32(config.rope_factor)
  elif config.rope_type == "llama3":
    # Llama 3.1: frequencies whose wavelength exceeds the original context / low_freq_factor are divided by the
    # factor, those below original context / high_freq_factor kept, and those between interpolated smoothly.
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    old_context = config.rope_original_max_positions
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > old_context / low, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((old_context / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
  if config.rope_freq_factors is not None:
    inv_freq = inv_freq / np.asarray(config.rope_freq_factors, np.float32)
  return inv_freq.astype(np.float32)


def apply_rotary(x, positions, inv_freq):
  """Rotates x [B, T, heads, head_dim] by angle positions [B, T] * inv_freq (rotate-half layout): x * cos +
  rotate_half(x) * sin, with cos/sin in float32 cast to x's dtype (as Hugging Face)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, head_dim / 2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


# --- Layers ----------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back to the compute dtype, times `scale` (ones at init)."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * normed.astype(self.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with rotary embeddings, optionally over a KV cache (see the module docstring)."""

  config: LlamaConfig
  lora: lora_lib.LoraConfig | None = None

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache=None, write_index=None, deterministic: bool = True):
    cfg = self.config
    batch, length = x.shape[:2]
    head_dim = cfg.rotary_dim
    dense = functools.partial(lora_lib.Dense, use_bias=cfg.attention_bias, lora=self.lora, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype)
    query = dense(cfg.num_heads * head_dim, name="q_proj")(x, deterministic)
    key = dense(cfg.num_kv_heads * head_dim, name="k_proj")(x, deterministic)
    value = dense(cfg.num_kv_heads * head_dim, name="v_proj")(x, deterministic)
    inv_freq = rope_inv_freq(cfg)
    query = apply_rotary(query.reshape(batch, length, cfg.num_heads, head_dim), positions, inv_freq)
    key = apply_rotary(key.reshape(batch, length, cfg.num_kv_heads, head_dim), positions, inv_freq)
    value = value.reshape(batch, length, cfg.num_kv_heads, head_dim)

    new_cache = None
    if layer_cache is not None:  # write this call's keys/values into their slots, attend to all slots
      start = (0, write_index, 0, 0)
      key = jax.lax.dynamic_update_slice(layer_cache["key"], key.astype(layer_cache["key"].dtype), start)
      value = jax.lax.dynamic_update_slice(layer_cache["value"], value.astype(layer_cache["value"].dtype), start)
      new_cache = {"key": key, "value": value}
      key, value = key.astype(cfg.dtype), value.astype(cfg.dtype)

    # jax.nn.dot_product_attention shares each key/value head among num_heads / num_kv_heads query heads
    # (grouped-query attention) and takes the softmax in float32.
    out = jax.nn.dot_product_attention(query, key, value, mask=mask, scale=head_dim ** -0.5)
    out = out.reshape(batch, length, cfg.num_heads * head_dim)
    return dense(cfg.hidden_size, name="o_proj")(out, deterministic), new_cache


class Mlp(nn.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

  config: LlamaConfig
  lora: lora_lib.LoraConfig | None = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.config
    dense = functools.partial(lora_lib.Dense, use_bias=cfg.mlp_bias, lora=self.lora, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype)
    gate = dense(cfg.intermediate_size, name="gate_proj")(x, deterministic)
    up = dense(cfg.intermediate_size, name="up_proj")(x, deterministic)
    return dense(cfg.hidden_size, name="down_proj")(jax.nn.silu(gate) * up, deterministic)


class DecoderLayer(nn.Module):
  config: LlamaConfig
  lora: lora_lib.LoraConfig | None = None

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache=None, write_index=None, deterministic: bool = True):
    cfg = self.config
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
    y, new_cache = Attention(cfg, self.lora, name="self_attn")(
        norm(name="input_layernorm")(x), positions, mask, layer_cache, write_index, deterministic)
    x = x + y
    x = x + Mlp(cfg, self.lora, name="mlp")(norm(name="post_attention_layernorm")(x), deterministic)
    return x, new_cache


# --- The decoder -----------------------------------------------------------------------------------------------

def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype: Dtype | None = None):
  """An empty KV cache of `max_length` slots for `batch_size` rows (keys/values in `dtype`, default the compute
  dtype)."""
  dtype = config.dtype if dtype is None else dtype
  shape = (batch_size, max_length, config.num_kv_heads, config.rotary_dim)
  return {
      "layers": [{"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
                 for _ in range(config.num_layers)],
      "valid": jnp.zeros((batch_size, max_length), bool),  # slot holds a real (non-padding) token
      "index": jnp.zeros((), jnp.int32),  # next slot to write
      "next_position": jnp.zeros((batch_size,), jnp.int32),  # rotary position of each row's next real token
  }


class Llama(nn.Module):
  """The causal LM. `__call__` returns {"logits": [B, T, vocab] float32, "hidden": [B, T, hidden] (after the
  final norm, compute dtype), "cache": the updated cache or None}. `lora` adds adapters to the projections it
  targets (see `lora.py`); `train=True` turns on their dropout (rngs={"dropout": key})."""

  config: LlamaConfig
  lora: lora_lib.LoraConfig | None = None

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                 embedding_init=nn.initializers.normal(0.02))
    self.layers = [DecoderLayer(cfg, self.lora) for _ in range(cfg.num_layers)]  # named layers_0, layers_1, ...
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = lora_lib.Dense(cfg.vocab_size, lora=self.lora, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

  def embed(self, input_ids):
    """Token embeddings [B, T, hidden] in the compute dtype."""
    return self.embed_tokens(input_ids)

  def __call__(self, input_ids=None, *, attention_mask=None, inputs_embeds=None, cache=None, train: bool = False):
    cfg = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, hidden]")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
    batch, length = x.shape[:2]
    token = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)

    if cache is None:
      start, first_position, valid = 0, jnp.zeros((batch,), jnp.int32), token
      num_slots = length
    else:
      start, first_position = cache["index"], cache["next_position"]
      valid = jax.lax.dynamic_update_slice(cache["valid"], token, (0, start))
      num_slots = cache["valid"].shape[1]
    # Rotary positions count real tokens only (padding gets the position of the token before it, unused).
    positions = first_position[:, None] + jnp.maximum(jnp.cumsum(token, axis=1, dtype=jnp.int32) - 1, 0)
    query_slot = start + jnp.arange(length)[:, None]
    key_slot = jnp.arange(num_slots)[None, :]
    allowed = key_slot <= query_slot
    if cfg.sliding_window is not None:
      allowed &= key_slot > query_slot - cfg.sliding_window
    mask = allowed[None, None] & valid[:, None, None, :]  # [B, 1 (heads), T, slots]

    new_layer_caches = []
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache["layers"][i]
      x, new_layer_cache = layer(x, positions, mask, layer_cache, start, not train)
      new_layer_caches.append(new_layer_cache)
    hidden = self.norm(x)
    if cfg.tie_word_embeddings:
      logits = self.embed_tokens.attend(hidden)
    else:
      logits = self.lm_head(hidden, not train)

    new_cache = None
    if cache is not None:
      new_cache = {"layers": new_layer_caches, "valid": valid, "index": start + length,
                   "next_position": first_position + jnp.sum(token, axis=1, dtype=jnp.int32)}
    return {"logits": logits.astype(jnp.float32), "hidden": hidden, "cache": new_cache}


# --- Greedy generation -----------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_token_ids", "pad_token_id"))
def _generate(model: Llama, params, input_ids, attention_mask, max_new_tokens: int, eos_token_ids: tuple[int, ...],
              pad_token_id: int):
  batch, prompt_length = input_ids.shape
  cache = init_cache(model.config, batch, prompt_length + max_new_tokens)
  out = model.apply({"params": params}, input_ids, attention_mask=attention_mask, cache=cache)
  eos = jnp.asarray(eos_token_ids or (-1,), jnp.int32)

  def pick(logits, done):
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    token = jnp.where(done, pad_token_id, token)
    return token, done | jnp.isin(token, eos)

  token, done = pick(out["logits"], jnp.zeros((batch,), bool))

  def step(carry, _):
    cache, token, done = carry
    out = model.apply({"params": params}, token[:, None], cache=cache)
    next_token, next_done = pick(out["logits"], done)
    return (out["cache"], next_token, next_done), token

  _, tokens = jax.lax.scan(step, (out["cache"], token, done), None, length=max_new_tokens)
  return tokens.T  # [B, max_new_tokens]


def generate(model: Llama, params, input_ids, max_new_tokens: int, *, attention_mask=None,
             eos_token_ids: tuple[int, ...] | None = None, pad_token_id: int | None = None):
  """Greedy continuation [B, max_new_tokens] (int32) of input_ids [B, T] (left-pad a batch of unequal prompts
  and pass attention_mask). One jitted program per (model, shapes, max_new_tokens): the prompt fills a cache
  of T + max_new_tokens slots, then one token per step. A row that emitted an end-of-sequence id (default
  `config.eos_token_ids`) continues with `pad_token_id` (default config.pad_token_id, else the first eos id, else
  0), as Hugging Face's `generate` pads finished rows."""
  cfg = model.config
  eos_token_ids = tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
  if pad_token_id is None:
    pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_token_ids or (0,))[0]
  input_ids = jnp.asarray(input_ids, jnp.int32)
  attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  return _generate(model, params, input_ids, attention_mask, int(max_new_tokens), eos_token_ids, int(pad_token_id))
