"""Loads Hugging Face checkpoint directories into the Flax towers (transformers 5 has no Flax models).

A directory holds `config.json` and either `model.safetensors` or `model.safetensors.index.json` + shards.
Only safetensors are read; pickled checkpoints (`pytorch_model.bin`) are refused, never unpickled. The directory
is local (not through `medbind_jax.paths`): safetensors' `safe_open` memory-maps local files, and the matching
tokenizer is read by Hugging Face tokenizers, also from local files only.

  encoder, params = load_pretrained("bert", path, skip_keys=(r"^pooler\\.",))
  out = encoder.apply({"params": params}, batch, train=False)

Loading is strict. The expected checkpoint key of every Flax parameter is derived from the parameter's path
(`_RULES`); then every checkpoint key must be consumed and every parameter filled with the right shape, or
one `CheckpointMismatchError` lists all unused keys, missing keys and shape mismatches. `skip_keys` (regexes,
`re.search` on the key as stored) names checkpoint keys to ignore, e.g. a pooler or classification head;
non-parameter buffers Hugging Face stores (`position_ids`, `relative_position_index`) are always ignored.

Layouts: torch Linear weight [out, in] -> Dense kernel [in, out] (transpose); Conv weight [out, in, *k] ->
Conv kernel [*k, in, out]; LayerNorm weight/bias (or TF-era gamma/beta) -> scale/bias; Embedding weight ->
embedding. Keys may carry the task-model prefix (`vit.`, `swin.`, `bert.`) or not.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from medbind_jax.models import build_encoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the module: lists every unused key, missing key and shape mismatch."""


# --- Reading a directory ---------------------------------------------------------------------------------------

def read_hf_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {directory}")
  with open(path) as f:
    return json.load(f)


def _read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  with safe_open(path, framework="np") as f:
    return {key: f.get_tensor(key) for key in f.keys()}


def read_safetensors(directory: str, read_file=None) -> dict[str, np.ndarray]:
  """All tensors of a directory's single-file or sharded safetensors checkpoint, as numpy arrays; `read_file`
  (path -> {key: array}) reads one file (default: safetensors' numpy reader)."""
  read_file = read_file or _read_safetensors_file
  index_path = os.path.join(directory, INDEX_FILE)
  single_path = os.path.join(directory, SINGLE_FILE)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      weight_map: dict[str, str] = json.load(f)["weight_map"]
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      shard_tensors = read_file(os.path.join(directory, shard))
      listed = {key for key, file in weight_map.items() if file == shard}
      if listed != set(shard_tensors):
        raise CheckpointMismatchError(
            f"{INDEX_FILE} and shard {shard} disagree: listed but absent {sorted(listed - set(shard_tensors))}, "
            f"present but unlisted {sorted(set(shard_tensors) - listed)}")
      tensors.update(shard_tensors)
    return tensors
  if os.path.isfile(single_path):
    return read_file(single_path)
  pickled = [n for n in ("pytorch_model.bin", "model.ckpt", "flax_model.msgpack") if os.path.exists(
      os.path.join(directory, n))]
  hint = f" (found {pickled}: only safetensors are read; convert with safetensors first)" if pickled else ""
  raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}")


# --- Hugging Face config -> module fields ----------------------------------------------------------------------

def _hidden_act(config: dict) -> str:
  act = config.get("hidden_act", "gelu")
  if not isinstance(act, str):
    raise ValueError(f"unsupported hidden_act {act!r}")
  return act


def vit_kwargs_from_hf_config(config: dict) -> dict[str, Any]:
  if config.get("pooler_output_size") not in (None, config["hidden_size"]) or config.get("pooler_act",
                                                                                        "tanh") != "tanh":
    raise ValueError("only a tanh pooler of width hidden_size is supported")
  return dict(
      image_size=config.get("image_size", 224), patch_size=config.get("patch_size", 16),
      num_channels=config.get("num_channels", 3), hidden_size=config["hidden_size"],
      num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
      mlp_dim=config["intermediate_size"], hidden_act=_hidden_act(config),
      layer_norm_eps=config.get("layer_norm_eps", 1e-12), qkv_bias=config.get("qkv_bias", True),
      dropout_rate=config.get("hidden_dropout_prob", 0.0),
      attention_dropout_rate=config.get("attention_probs_dropout_prob", 0.0))


def swin_kwargs_from_hf_config(config: dict) -> dict[str, Any]:
  return dict(
      image_size=config.get("image_size", 224), patch_size=config.get("patch_size", 4),
      num_channels=config.get("num_channels", 3), embed_dim=config["embed_dim"],
      depths=tuple(config["depths"]), num_heads=tuple(config["num_heads"]), window_size=config["window_size"],
      mlp_ratio=config.get("mlp_ratio", 4.0), hidden_act=_hidden_act(config),
      layer_norm_eps=config.get("layer_norm_eps", 1e-5), qkv_bias=config.get("qkv_bias", True),
      use_absolute_embeddings=config.get("use_absolute_embeddings", False),
      dropout_rate=config.get("hidden_dropout_prob", 0.0),
      attention_dropout_rate=config.get("attention_probs_dropout_prob", 0.0),
      drop_path_rate=config.get("drop_path_rate", 0.1))


def bert_kwargs_from_hf_config(config: dict) -> dict[str, Any]:
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"only absolute position embeddings are supported, got {config['position_embedding_type']!r}")
  return dict(
      vocab_size=config["vocab_size"], hidden_size=config["hidden_size"], num_layers=config["num_hidden_layers"],
      num_heads=config["num_attention_heads"], intermediate_size=config["intermediate_size"],
      max_position_embeddings=config.get("max_position_embeddings", 512),
      type_vocab_size=config.get("type_vocab_size", 2), hidden_act=_hidden_act(config),
      layer_norm_eps=config.get("layer_norm_eps", 1e-12), dropout_rate=config.get("hidden_dropout_prob", 0.1),
      attention_dropout_rate=config.get("attention_probs_dropout_prob", 0.1))


HF_CONFIG_TO_KWARGS: dict[str, Callable[[dict], dict[str, Any]]] = {
    "vit": vit_kwargs_from_hf_config,
    "swin": swin_kwargs_from_hf_config,
    "bert": bert_kwargs_from_hf_config,
}


def _check_family(family: str):
  if family not in HF_CONFIG_TO_KWARGS:
    raise ValueError(f"no Hugging Face loader for encoder {family!r}; loadable: {sorted(HF_CONFIG_TO_KWARGS)}")


def module_kwargs_from_hf_config(family: str, config: dict) -> dict[str, Any]:
  """Module fields of `family`'s tower that reproduce the Hugging Face `config.json` dict `config`."""
  _check_family(family)
  return HF_CONFIG_TO_KWARGS[family](config)


def sentence_transformers_pooling(directory: str) -> str | None:
  """'mean' / 'cls' / 'eos' when `directory` is a sentence-transformers model with a Pooling module."""
  modules_path = os.path.join(directory, "modules.json")
  if not os.path.isfile(modules_path):
    return None
  with open(modules_path) as f:
    modules = json.load(f)
  for module in modules:
    if module.get("type", "").endswith("models.Pooling"):
      with open(os.path.join(directory, module["path"], "config.json")) as f:
        pooling = json.load(f)
      for flag, mode in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "cls"),
                         ("pooling_mode_lasttoken", "eos")):
        if pooling.get(flag):
          return mode
      raise ValueError(f"unsupported sentence-transformers pooling in {directory}: {pooling}")
  return None


# --- Flax parameter path -> checkpoint key ---------------------------------------------------------------------
# Each rule maps a Flax module path (joined by '/', full match) to a checkpoint module prefix; the leaf name then
# picks the tensor suffix and layout. Rules whose Flax side ends in a parameter name map one tensor directly.

_LEAF_SUFFIX = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}

_VISION_BLOCK_RULES = [  # Flax block internals -> HF ViT/Swin layer internals (attention prefix given per family)
    (r"attn/(?P<proj>query|key|value)", r"{attn}.\g<proj>"),
    (r"attn/out", r"attention.output.dense"),
    (r"norm1", r"layernorm_before"),
    (r"norm2", r"layernorm_after"),
    (r"mlp/fc1", r"intermediate.dense"),
    (r"mlp/fc2", r"output.dense"),
]


def _block_rules(flax_block: str, hf_block: str, attn: str):
  return [(f"{flax_block}/{f}", f"{hf_block}.{h.format(attn=attn)}") for f, h in _VISION_BLOCK_RULES]


_RULES = {
    "vit": [
        (r"cls_token", "embeddings.cls_token"),
        (r"pos_embedding", "embeddings.position_embeddings"),
        (r"patch_embed", "embeddings.patch_embeddings.projection"),
        *_block_rules(r"block_(\d+)", r"encoder.layer.\1", attn="attention.attention"),
        (r"final_norm", "layernorm"),
        (r"pooler", "pooler.dense"),
    ],
    "swin": [
        (r"patch_embed", "embeddings.patch_embeddings.projection"),
        (r"patch_norm", "embeddings.norm"),
        (r"pos_embedding", "embeddings.position_embeddings"),
        (r"stage_(\d+)_block_(\d+)/rel_pos_table",
         r"encoder.layers.\1.blocks.\2.attention.self.relative_position_bias_table"),
        *_block_rules(r"stage_(\d+)_block_(\d+)", r"encoder.layers.\1.blocks.\2", attn="attention.self"),
        (r"stage_(\d+)_merge/reduction", r"encoder.layers.\1.downsample.reduction"),
        (r"stage_(\d+)_merge/norm", r"encoder.layers.\1.downsample.norm"),
        (r"final_norm", "layernorm"),
    ],
    "bert": [
        (r"embeddings/(word|position|token_type)_embeddings", r"embeddings.\1_embeddings"),
        (r"embeddings/norm", "embeddings.LayerNorm"),
        (r"layer_(\d+)/attn/(query|key|value)", r"encoder.layer.\1.attention.self.\2"),
        (r"layer_(\d+)/attn/out", r"encoder.layer.\1.attention.output.dense"),
        (r"layer_(\d+)/attn_norm", r"encoder.layer.\1.attention.output.LayerNorm"),
        (r"layer_(\d+)/mlp/fc1", r"encoder.layer.\1.intermediate.dense"),
        (r"layer_(\d+)/mlp/fc2", r"encoder.layer.\1.output.dense"),
        (r"layer_(\d+)/mlp_norm", r"encoder.layer.\1.output.LayerNorm"),
        (r"pooler", "pooler.dense"),
    ],
}
_PREFIX = {"vit": "vit.", "swin": "swin.", "bert": "bert."}
_IGNORED_BUFFERS = re.compile(r"(^|\.)(position_ids|token_type_ids|relative_position_index)$")


def expected_checkpoint_key(family: str, flax_path: tuple[str, ...]) -> str:
  """Checkpoint key (without task prefix) that holds the Flax parameter at `flax_path`."""
  joined = "/".join(flax_path)
  module_path, leaf = "/".join(flax_path[:-1]), flax_path[-1]
  for flax_pattern, hf_template in _RULES[family]:
    match = re.fullmatch(flax_pattern, joined)
    if match:  # a rule naming the parameter itself
      return match.expand(hf_template)
    match = re.fullmatch(flax_pattern, module_path)
    if match and leaf in _LEAF_SUFFIX:
      return f"{match.expand(hf_template)}.{_LEAF_SUFFIX[leaf]}"
  raise KeyError(f"no checkpoint key rule for {family} parameter {joined}")


def _to_flax_layout(leaf: str, tensor: np.ndarray) -> np.ndarray:
  if leaf == "kernel":  # torch Linear [out, in] / Conv [out, in, *k]  ->  Flax [in, out] / [*k, in, out]
    return np.transpose(tensor, (*range(2, tensor.ndim), 1, 0))
  return tensor


def _canonical_key(family: str, key: str) -> str:
  """Drops the task-model prefix and renames TF-era LayerNorm gamma/beta."""
  prefix = _PREFIX[family]
  key = key[len(prefix):] if key.startswith(prefix) else key
  return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def convert_checkpoint(family: str, tensors: dict[str, np.ndarray], abstract_params, *,
                       skip_keys=(), source: str = "checkpoint"):
  """Maps `tensors` (checkpoint key -> array) onto the param tree shaped like `abstract_params` (arrays or
  `jax.ShapeDtypeStruct`s), strictly; raises `CheckpointMismatchError` listing every problem at once."""
  skip = [re.compile(pattern) for pattern in skip_keys]
  flat_params = traverse_util.flatten_dict(abstract_params)
  expected = {expected_checkpoint_key(family, path): path for path in flat_params}

  by_canonical: dict[str, str] = {}
  duplicates = []
  for key in sorted(tensors):
    if any(pattern.search(key) for pattern in skip) or _IGNORED_BUFFERS.search(key):
      continue
    canonical = _canonical_key(family, key)
    if canonical in by_canonical:
      duplicates.append(f"{by_canonical[canonical]} and {key}")
    by_canonical[canonical] = key

  unused = sorted(by_canonical[c] for c in by_canonical if c not in expected)
  missing, mismatched, loaded = [], [], {}
  for canonical, path in sorted(expected.items()):
    flax_name = "/".join(path)
    if canonical not in by_canonical:
      missing.append(f"{canonical}  (for {flax_name})")
      continue
    key = by_canonical[canonical]
    value = _to_flax_layout(path[-1], tensors[key])
    target = flat_params[path]
    if value.shape != tuple(target.shape):
      mismatched.append(f"{key}: {tuple(tensors[key].shape)} -> {value.shape} in Flax layout, but {flax_name} "
                        f"is {tuple(target.shape)}")
      continue
    loaded[path] = jnp.asarray(value, dtype=target.dtype)

  if unused or missing or mismatched or duplicates:
    sections = [f"{source} does not match the {family!r} encoder:"]
    for title, items in ((f"checkpoint keys not used (ignore them with skip_keys=(regex, ...))", unused),
                         ("parameters missing from the checkpoint", missing),
                         ("shape mismatches", mismatched),
                         ("keys that name the same parameter", duplicates)):
      if items:
        sections.append(f"  {len(items)} {title}:")
        sections.extend(f"    {item}" for item in items)
    raise CheckpointMismatchError("\n".join(sections))
  return traverse_util.unflatten_dict(loaded)


def load_pretrained(family: str, directory: str, *, skip_keys=(), dtype=jnp.float32, param_dtype=jnp.float32,
                    **module_overrides):
  """Builds `family`'s tower from `directory`'s config.json and loads its safetensors weights strictly.

  `dtype` is the compute dtype, `param_dtype` the dtype parameters are stored in; `module_overrides` set any
  other module field (e.g. `pooling="mean"`, `use_pooler=True`, `remat=True`, `dropout_rate=0.0`). A
  sentence-transformers directory sets the BERT pooling from its Pooling module unless `pooling` is given.
  Returns (module, params); call `module.apply({"params": params}, inputs, train=False)`.
  """
  _check_family(family)
  kwargs = module_kwargs_from_hf_config(family, read_hf_config(directory))
  if family == "bert" and "pooling" not in module_overrides:
    kwargs["pooling"] = sentence_transformers_pooling(directory) or "cls"
  kwargs.update(module_overrides, dtype=dtype, param_dtype=param_dtype)
  module = build_encoder(family, **kwargs)
  abstract = jax.eval_shape(module.init, jax.random.key(0), module.example_inputs())["params"]
  params = convert_checkpoint(family, read_safetensors(directory), abstract, skip_keys=skip_keys,
                              source=directory)
  return module, params
