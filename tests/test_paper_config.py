"""The paper-scale config (`configs/medbind.py:paper`) trains from shards converted from real-layout sources.

A miniature MIMIC-CXR-JPG + MIMIC-IV-ECG tree (real images, reports and ECGs, see tests/real_layouts.py) is
converted by `data_prep.mimic` with CXR-ECG linking, and the paper config runs two steps on it with tiny random
Hugging Face checkpoints standing in for Swin and the clinical BERT. Only what a user sets on the command line is
changed: the config argument (data_dir, cxr_init, text_init, batch_size, steps) and input / tower sizes
(`--config.x=y`), so the shapes stay CPU-sized.
"""

import json
import math
import os
import re

import numpy as np
import pytest

import real_layouts as L
from configs import medbind
from data_prep import cli, mimic, report_text
from medbind_jax import train

TORCH = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Subjects 1-4 are official MIMIC-CXR train subjects, 5-6 test; each has a CXR study with an ECG 40 min later
# (linked), subjects 3 and 6 one more ECG three days later (ECG-only records), subject 4 no ECG.
_DICOM = "{0:08x}-{0:08x}-{0:08x}-{0:08x}-{0:08x}"
CXR_STUDIES = tuple(
    L.MimicCxrStudy(f"1100000{k}", f"5100000{k}", ((_DICOM.format(k), "PA", L.CXR_IMAGES[k % 4]),),
                    f"2181010{k}", "090000", "test" if k >= 5 else "train", str(k + 1),
                    {"Cardiomegaly": "1.0" if k % 2 else "0.0", "No Finding": "" if k % 2 else "1.0"})
    for k in range(1, 7))
_ECG_SOURCES = ("E07500", "E07502", "E07506", "E07509", "HR06000", "HR06002", "JS20003", "HR06001")
_STATEMENTS = (("Sinus rhythm", "Normal ECG"), ("Sinus bradycardia",), ("Sinus tachycardia", "Abnormal ECG"))
ECG_STUDIES = tuple(
    L.MimicEcgStudy(f"1100000{k}", f"4100000{k}", _ECG_SOURCES[k - 1], f"2181-01-0{k} 09:40:00",
                    _STATEMENTS[k % 3]) for k in (1, 2, 3, 5, 6)) + tuple(
    L.MimicEcgStudy(f"1100000{k}", f"4200000{k}", _ECG_SOURCES[k + 1], f"2181-01-0{k + 3} 12:00:00",
                    _STATEMENTS[(k + 1) % 3]) for k in (3, 6))


def _tiny_swin(directory) -> None:
  config = transformers.SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
                                   num_heads=[2, 2], window_size=4, drop_path_rate=0.0)
  TORCH.manual_seed(0)
  transformers.SwinModel(config).save_pretrained(directory)


def _tiny_bert_with_tokenizer(directory, texts) -> None:
  """A random 1-layer BERT and a WordPiece tokenizer whose vocabulary holds the words of `texts`."""
  words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
  vocab_file = _write_vocab(directory, words)
  tokenizer = transformers.BertTokenizer(vocab_file=vocab_file)
  config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
  TORCH.manual_seed(0)
  transformers.BertModel(config).save_pretrained(directory)
  tokenizer.save_pretrained(directory)


def _write_vocab(directory, words) -> str:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "vocab.txt")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
  return path


def test_paper_config_trains_from_converted_real_layout_shards(tmp_path):
  cxr_src, ecg_src, data_dir = tmp_path / "mimic-cxr-jpg", tmp_path / "mimic-iv-ecg", tmp_path / "shards"
  L.build_mimic_cxr(cxr_src, CXR_STUDIES)
  L.build_mimic_ecg(ecg_src, ECG_STUDIES)
  summary = mimic.convert(str(cxr_src), str(ecg_src), str(data_dir),
                          cli.Options(shard_size=4, workers=1, progress=False, num_samples=1000))
  assert summary.exit_code == 0 and not summary.errors
  splits = summary.info["splits"]
  assert (splits["train"]["num_linked"], splits["test"]["num_linked"]) == (3, 2)
  assert summary.info["linking"]["linked_pairs"] == 5

  texts = [L.expected_cxr_text(r["findings"], r["impression"]) for r in L.iu_reports().values()]
  texts += [report_text.join_statements(s) for s in _STATEMENTS]
  _tiny_swin(tmp_path / "swin")
  _tiny_bert_with_tokenizer(tmp_path / "bert", texts)

  config = medbind.get_config(f"paper,data_dir={data_dir},cxr_init={tmp_path / 'swin'},"
                              f"text_init={tmp_path / 'bert'},batch_size=8,steps=2")
  # CPU-sized inputs and ECG tower, as `--config.data.cxr.image_size=32 ...` would set them.
  config.data.cxr.image_size = 32
  config.data.ecg.num_samples = 500
  config.model.towers.ecg.kwargs.update(num_samples=500, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
  config.data.text_max_length = 16
  config.eval.batch_size = 8
  assert config.model.towers.cxr.name == "swin" and config.model.towers.text.trunk == "train"
  assert config.data.linked_per_batch == 2 and config.model.embed_dim == 256

  workdir = str(tmp_path / "workdir")
  results = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert [row["step"] for row in logged] == [2]
  assert math.isfinite(logged[0]["loss"]) and logged[0]["loss"] > 0
  # Both linked rows of each batch come from converted linked records, so EMCL is active.
  assert logged[0]["num_pairs/cxr_ecg"] == 2 and logged[0]["loss/cxr_ecg"] > 0
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  # Evaluated on the converted test split: 2 CXRs, 2 + 1 ECGs, 2 linked pairs.
  assert results["retrieval/cxr_to_text/num_queries"] == 2 and results["retrieval/ecg_to_text/num_queries"] == 3
  assert results["retrieval/cxr_to_ecg/num_queries"] == 2
  assert all(np.isfinite(v) for v in results.values())
