"""Strict Hugging Face checkpoint loading: round trip, renamed / missing / extra / misshapen keys, task prefixes,
sharded checkpoints, refusing pickles; and the encoder registry. No torch needed: checkpoints are written here in
the Hugging Face layout with `safetensors.numpy` (parity with transformers is in the test_encoders_* files)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from medbind_jax.models import ENCODERS, build_encoder
from medbind_jax.models.hf_loading import (CheckpointMismatchError, expected_checkpoint_key, load_pretrained,
                                           read_safetensors)
from test_encoders_vit import random_params

BERT_CONFIG = {"model_type": "bert", "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
               "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 12,
               "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12}


def _hf_tensors(family, params):
  """Flax params -> {checkpoint key: array} in the Hugging Face layout (kernels back to torch's [out, in, *k])."""
  tensors = {}
  for path, value in traverse_util.flatten_dict(jax.device_get(params)).items():
    value = np.asarray(value)
    if path[-1] == "kernel":
      value = np.transpose(value, (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))
    tensors[expected_checkpoint_key(family, path)] = np.ascontiguousarray(value)
  return tensors


@pytest.fixture
def bert_checkpoint(tmp_path):
  """A tiny BERT directory with a pooler; returns (directory, the Flax params written, its tensors)."""
  encoder = build_encoder("bert", vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                          max_position_embeddings=12, use_pooler=True)
  params = random_params(encoder, encoder.example_inputs())
  tensors = _hf_tensors("bert", params)
  tensors["embeddings.position_ids"] = np.arange(12)[None]  # a buffer Hugging Face stores: ignored
  (tmp_path / "config.json").write_text(json.dumps(BERT_CONFIG))
  save_file(tensors, str(tmp_path / "model.safetensors"))
  return tmp_path, params, tensors


def _save(directory, tensors):
  save_file(tensors, str(directory / "model.safetensors"))


def _assert_same_params(actual, expected):
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def test_round_trip_and_dtypes(bert_checkpoint):
  directory, params, _ = bert_checkpoint
  encoder, loaded = load_pretrained("bert", str(directory), use_pooler=True, dtype=jnp.bfloat16)
  assert encoder.dtype == jnp.bfloat16 and encoder.num_layers == 2 and encoder.pooling == "cls"
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(loaded))
  _assert_same_params(loaded, params)


def test_renamed_key_is_listed_as_unused_and_missing(bert_checkpoint):
  directory, _, tensors = bert_checkpoint
  tensors["encoder.layer.1.attention.self.qury.weight"] = tensors.pop("encoder.layer.1.attention.self.query.weight")
  _save(directory, tensors)
  with pytest.raises(CheckpointMismatchError) as error:
    load_pretrained("bert", str(directory), use_pooler=True)
  message = str(error.value)
  assert "1 checkpoint keys not used" in message and "encoder.layer.1.attention.self.qury.weight" in message
  assert "1 parameters missing" in message
  assert "encoder.layer.1.attention.self.query.weight  (for layer_1/attn/query/kernel)" in message


def test_every_missing_key_is_listed(bert_checkpoint):
  directory, _, tensors = bert_checkpoint
  del tensors["embeddings.LayerNorm.bias"], tensors["encoder.layer.0.output.dense.weight"]
  _save(directory, tensors)
  with pytest.raises(CheckpointMismatchError) as error:
    load_pretrained("bert", str(directory), use_pooler=True)
  message = str(error.value)
  assert "2 parameters missing" in message and "not used" not in message
  assert "embeddings.LayerNorm.bias" in message and "encoder.layer.0.output.dense.weight" in message


def test_unused_head_needs_skip_keys(bert_checkpoint):
  directory, params, tensors = bert_checkpoint
  tensors["cls.predictions.bias"] = np.zeros(40, np.float32)
  _save(directory, tensors)
  with pytest.raises(CheckpointMismatchError, match=r"cls\.predictions\.bias"):
    load_pretrained("bert", str(directory), use_pooler=True)
  # Without the pooler in the module its weights are unused too; skip_keys lets both through.
  _, loaded = load_pretrained("bert", str(directory), skip_keys=(r"^cls\.", r"^pooler\."))
  assert "pooler" not in loaded
  _assert_same_params(loaded, {k: v for k, v in params.items() if k != "pooler"})


def test_shape_mismatch_is_listed(bert_checkpoint):
  directory, _, tensors = bert_checkpoint
  tensors["encoder.layer.0.intermediate.dense.weight"] = np.zeros((33, 16), np.float32)
  _save(directory, tensors)
  with pytest.raises(CheckpointMismatchError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight: \(33, 16\)"):
    load_pretrained("bert", str(directory), use_pooler=True)


def test_task_prefix_and_tf_layer_norm_names(bert_checkpoint):
  directory, params, tensors = bert_checkpoint
  renamed = {f"bert.{key}": value for key, value in tensors.items()}
  renamed["bert.embeddings.LayerNorm.gamma"] = renamed.pop("bert.embeddings.LayerNorm.weight")
  _save(directory, renamed)
  _, loaded = load_pretrained("bert", str(directory), use_pooler=True)
  _assert_same_params(loaded, params)


def test_sharded_checkpoint(bert_checkpoint):
  directory, params, tensors = bert_checkpoint
  (directory / "model.safetensors").unlink()
  keys = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
  for name, shard_keys in shards.items():
    save_file({key: tensors[key] for key in shard_keys}, str(directory / name))
  weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
  index_path = directory / "model.safetensors.index.json"
  index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  _, loaded = load_pretrained("bert", str(directory), use_pooler=True)
  _assert_same_params(loaded, params)

  del weight_map[keys[0]]
  index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  with pytest.raises(CheckpointMismatchError, match="present but unlisted"):
    read_safetensors(str(directory))


def test_pickled_checkpoints_are_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(BERT_CONFIG))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(FileNotFoundError, match="only safetensors are read"):
    load_pretrained("bert", str(tmp_path))


def test_registry_names_and_errors():
  assert {"vit", "swin", "bert", "ecg_transformer", "ecg_resnet"} <= set(ENCODERS)
  with pytest.raises(ValueError, match="known encoders: .*swin"):
    build_encoder("resnet50")
  with pytest.raises(ValueError, match="loadable: .*vit"):
    load_pretrained("ecg_resnet", "/nonexistent")
