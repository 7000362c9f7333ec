"""The Flax Llama decoder against transformers' torch `LlamaForCausalLM` / `MistralForCausalLM`: tiny random
checkpoints written with `save_pretrained` load strictly, give the same logits (fp32, 1e-4) and the same greedy
16-token continuations with the KV cache (also for a left-padded batch); malformed checkpoints are refused with
the offending key named; bf16 and sharded checkpoints load; the parameters shard over `fsdp` by `param_rules`."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from medbind_jax import sharding
from medbind_jax.llm import llama, loading
from medbind_jax.models.hf_loading import CheckpointMismatchError

VOCAB = 101
LENGTH = 12

# name -> (transformers config class, kwargs, what the case exercises)
CASES = {
    "llama_gqa_llama3_rope": ("LlamaConfig", dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, rope_theta=500000.0, max_position_embeddings=128)),
    "llama_tied_bias_mha": ("LlamaConfig", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "mistral_gqa_window": ("MistralConfig", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, sliding_window=5)),
}


def save_tiny_hf(directory, case: str, seed: int = 0, **save_kwargs):
  """A random transformers model of CASES[case] saved as safetensors in `directory`; returns the torch model.
  Every parameter is perturbed (norm scales and biases are otherwise ones and zeros, which hide layout bugs)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  class_name, kwargs = CASES[case]
  torch.manual_seed(seed)
  config = getattr(transformers, class_name)(vocab_size=VOCAB, **kwargs)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """case -> (directory, torch model)."""
  out = {}
  for case in CASES:
    directory = str(tmp_path_factory.mktemp(case))
    out[case] = (directory, save_tiny_hf(directory, case))
  return out


def _token_ids(seed=0, batch=2, length=LENGTH):
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, length))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(checkpoints, case):
  torch = pytest.importorskip("torch")
  directory, reference = checkpoints[case]
  model, params, tokenizer = loading.load_hf(directory)
  assert tokenizer is None  # a tiny checkpoint without tokenizer files
  ids = _token_ids()
  with torch.no_grad():
    expected = reference(torch.tensor(ids)).logits.numpy()
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids))["logits"])
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)

  # The case's feature is exercised: without it the logits would differ.
  ablations = {"llama_gqa_llama3_rope": dict(rope_type="default"), "mistral_gqa_window": dict(sliding_window=None),
               "llama_tied_bias_mha": None}
  if ablations[case] is not None:
    ablated = model.clone(config=model.config.replace(**ablations[case]))
    assert np.abs(np.asarray(ablated.apply({"params": params}, jnp.asarray(ids))["logits"]) - expected).max() > 1e-3

  embeds = model.apply({"params": params}, jnp.asarray(ids), method=llama.Llama.embed)
  from_embeds = model.apply({"params": params}, inputs_embeds=embeds)["logits"]
  np.testing.assert_array_equal(np.asarray(from_embeds), logits)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_with_cache_matches_transformers(checkpoints, case):
  torch = pytest.importorskip("torch")
  directory, reference = checkpoints[case]
  model, params, _ = loading.load_hf(directory)
  ids = _token_ids(seed=1)
  with torch.no_grad():
    expected = reference.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                  do_sample=False, max_new_tokens=16, eos_token_id=None, pad_token_id=0)
  tokens = np.asarray(llama.generate(model, params, ids, 16, eos_token_ids=()))
  np.testing.assert_array_equal(tokens, expected.numpy()[:, LENGTH:])


def test_left_padded_generation_and_eos_padding_match_transformers(checkpoints):
  """Prompts of unequal length, left-padded, with an attention mask; rows that emit the end token are padded."""
  torch = pytest.importorskip("torch")
  directory, reference = checkpoints["llama_gqa_llama3_rope"]
  model, params, _ = loading.load_hf(directory)
  ids = _token_ids(seed=2, batch=3)
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  mask[2, :7] = 0
  ids = np.where(mask > 0, ids, 0)
  with torch.no_grad():
    free = reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                              max_new_tokens=16, eos_token_id=None, pad_token_id=0).numpy()[:, LENGTH:]
  np.testing.assert_array_equal(np.asarray(llama.generate(model, params, ids, 16, attention_mask=mask,
                                                          eos_token_ids=())), free)
  # The token row 0 emits 4th is made an end token: HF pads that row afterwards (with pad_token_id 0).
  eos = int(free[0, 3])
  with torch.no_grad():
    stopped = reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=16, eos_token_id=eos, pad_token_id=0).numpy()[:, LENGTH:]
  stopped = np.pad(stopped, ((0, 0), (0, 16 - stopped.shape[1])))  # HF stops early when every row has ended
  tokens = np.asarray(llama.generate(model, params, ids, 16, attention_mask=mask, eos_token_ids=(eos,),
                                     pad_token_id=0))
  np.testing.assert_array_equal(tokens, stopped)
  assert (tokens[0, 4:] == 0).all() and tokens[0, 3] == eos


def _rewrite(source, target, edit):
  """Copies checkpoint directory `source` to `target` with its tensors changed by edit(dict)."""
  from safetensors.numpy import load_file, save_file
  shutil.copytree(source, target)
  tensors = load_file(os.path.join(source, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(target, "model.safetensors"))
  return str(target)


def test_extra_missing_and_misshapen_tensors_are_refused_by_name(checkpoints, tmp_path):
  source = checkpoints["llama_tied_bias_mha"][0]

  extra = _rewrite(source, tmp_path / "extra", lambda t: t.update(
      {"model.layers.1.self_attn.rotary_proj.weight": np.zeros((4, 4), np.float32)}))
  with pytest.raises(CheckpointMismatchError, match=r"not used[\s\S]*model\.layers\.1\.self_attn\.rotary_proj"):
    loading.load_hf(extra)
  loading.load_hf(extra, skip_keys=(r"rotary_proj",))  # dropped on purpose: loads

  missing = _rewrite(source, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointMismatchError, match=r"missing[\s\S]*model\.layers\.1\.mlp\.up_proj\.weight"):
    loading.load_hf(missing)

  def transpose(t):
    t["model.layers.0.self_attn.o_proj.weight"] = np.ascontiguousarray(
        t["model.layers.0.self_attn.o_proj.weight"][:, :16])
  misshapen = _rewrite(source, tmp_path / "misshapen", transpose)
  with pytest.raises(CheckpointMismatchError, match=r"shape[\s\S]*model\.layers\.0\.self_attn\.o_proj\.weight"):
    loading.load_hf(misshapen)

  # A tied config with a separate output matrix: the unused lm_head is named, with the reason.
  untied = _rewrite(source, tmp_path / "untied", lambda t: t.update(
      {"lm_head.weight": np.zeros((VOCAB, 32), np.float32)}))
  with pytest.raises(CheckpointMismatchError, match=r"lm_head\.weight  \(the config ties"):
    loading.load_hf(untied)


def test_sharded_and_bfloat16_checkpoints_load(tmp_path):
  torch = pytest.importorskip("torch")
  reference = save_tiny_hf(str(tmp_path / "sharded"), "llama_gqa_llama3_rope", max_shard_size="20KB")
  assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
  _, params, _ = loading.load_hf(str(tmp_path / "sharded"))
  expected = {k: v.numpy() for k, v in reference.state_dict().items()}
  for path, value in traverse_util.flatten_dict(params).items():
    key = loading.hf_key(path)
    np.testing.assert_array_equal(np.asarray(value), expected[key].T if path[-1] == "kernel" else expected[key])

  reference.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"), safe_serialization=True)
  with open(tmp_path / "bf16" / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  model, params16, _ = loading.load_hf(str(tmp_path / "bf16"))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params16))
  embedding = reference.state_dict()["model.embed_tokens.weight"].float().numpy()
  np.testing.assert_array_equal(np.asarray(params16["embed_tokens"]["embedding"]), embedding)


def test_bfloat16_compute_stays_close_to_float32(checkpoints):
  directory, _ = checkpoints["llama_gqa_llama3_rope"]
  model, params, _ = loading.load_hf(directory)
  model16, _, _ = loading.load_hf(directory, dtype=jnp.bfloat16)
  ids = jnp.asarray(_token_ids())
  out32, out16 = model.apply({"params": params}, ids), model16.apply({"params": params}, ids)
  assert out16["hidden"].dtype == jnp.bfloat16 and out16["logits"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out16["logits"]), np.asarray(out32["logits"]), atol=0.05)


def test_parameters_shard_over_fsdp_and_give_the_same_logits(checkpoints):
  directory, _ = checkpoints["llama_gqa_llama3_rope"]  # hidden 48, intermediate 80: divisible by fsdp=8 where split
  model, params, _ = loading.load_hf(directory)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
  _, sharded, _ = loading.load_hf(directory, mesh=mesh)
  specs = {"/".join(p): s.spec for p, s in traverse_util.flatten_dict(
      jax.tree.map(lambda x: x.sharding, sharded)).items()}
  assert specs["layers_0/self_attn/q_proj/kernel"] == P("fsdp", None)
  assert specs["layers_1/mlp/down_proj/kernel"] == P(None, "fsdp")
  assert specs["embed_tokens/embedding"] == P(None, "fsdp") and specs["lm_head/kernel"] == P("fsdp", None)
  assert specs["norm/scale"] == P(None)
  ids = jax.device_put(jnp.asarray(_token_ids(batch=8)), sharding.batch_sharding(mesh))
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x)["logits"])
  np.testing.assert_allclose(np.asarray(apply(sharded, ids)), np.asarray(apply(params, ids)), atol=1e-5)


def test_param_rules_shard_a_7b_llama_over_fsdp():
  """Llama-2-7B's shapes (abstract: nothing allocated) on an 8-way fsdp mesh: every matrix split, none refused."""
  config = llama.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                             num_heads=32, num_kv_heads=32, rms_norm_eps=1e-5)
  abstract = loading.abstract_params(llama.Llama(config))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8})
  shardings = sharding.param_shardings(abstract, mesh, {"param_rules": llama.param_rules(config)})
  flat = traverse_util.flatten_dict(shardings)
  assert len(flat) == 3 + 9 * 32
  per_device = sum(int(np.prod(s.shard_shape(leaf.shape))) for s, leaf in zip(
      jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)), jax.tree.leaves(abstract)))
  total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract))
  assert 6.7e9 < total < 6.8e9 and per_device < total / 8 * 1.001


def test_config_round_trips_through_hf_config_json(checkpoints):
  for case, (directory, _) in checkpoints.items():
    with open(os.path.join(directory, "config.json")) as f:
      config = loading.config_from_hf(json.load(f))
    assert loading.config_from_hf(loading.config_to_hf(config)) == config, case
  plain = llama.LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1)
  assert loading.config_from_hf(loading.config_to_hf(plain)) == plain
  with pytest.raises(ValueError, match="rope type 'yarn' is not implemented"):
    loading.config_from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                            "num_hidden_layers": 1, "num_attention_heads": 2,
                            "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
