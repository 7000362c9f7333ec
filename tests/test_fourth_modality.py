"""A fourth modality, added the way a user would: a codec and an encoder registered here, config entries and
edges, and records written in the schema. No code of `medbind_jax/` or `data_prep/` knows about it.

The modality is a panel of four lab values (BNP, CRP, troponin, lactate) drawn from the synthetic world's latent
state of each encounter, with a short lab report and two labels. It is bound to text (tmcl) and to the ECG of the
same encounter (pair), trained for 3 steps on the 8 fake devices, evaluated and embedded.
"""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from data_prep import synthetic_world
from medbind_jax import inference, train
from medbind_jax.data import codecs, schema, tfrecord
from medbind_jax.models import register_encoder
from test_train import tiny_config

LAB_NAMES = ("bnp", "crp", "troponin", "lactate")
LABS_LABELS = ("high_bnp", "high_crp")


# ---- The codec: payload = float32 [4] lab values ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabsSpec:
  log_mean: float = 3.0  # model input = (log1p(value) - log_mean) / log_std
  log_std: float = 1.5
  noise: float = 0.05  # training: additive noise on the normalised values


class LabsCodec(codecs.Codec):
  name = "labs"
  inputs_help = "lab panels"

  def encode(self, data, name):
    values = np.asarray(data, np.float32)
    if values.shape != (len(LAB_NAMES),) or not np.all(np.isfinite(values)):
      raise ValueError(f"{name}: a lab panel is {len(LAB_NAMES)} finite values, got {values}")
    return {"values": schema.floats_feature(values.tolist())}

  def decode(self, feats, prefix):
    if prefix + "values" not in feats:
      return None
    return np.asarray(feats[prefix + "values"].float_list.value, np.float32)

  def make_spec(self, config):
    return LabsSpec(**(dict(config) if config else {}))

  def preprocess(self, data, spec, rng, name):
    x = (np.log1p(np.asarray(data, np.float32)) - spec.log_mean) / spec.log_std
    if rng is not None:
      x = x + rng.normal(0.0, spec.noise, x.shape)
    return x.astype(np.float32)

  def example_input(self, spec):
    return np.zeros(len(LAB_NAMES), np.float32)


codecs.register(LabsCodec())


# ---- The encoder: a two-layer MLP following the tower contract ---------------------------------------------------


@register_encoder("labs_mlp")
class LabsMLP(nn.Module):
  num_values: int = len(LAB_NAMES)
  hidden_size: int = 16
  dtype: jnp.dtype = jnp.float32
  remat: bool = False  # accepted like every tower's model-wide switch; nothing to rematerialise here

  @property
  def width(self) -> int:
    return self.hidden_size

  def example_inputs(self, batch_size: int = 1):
    return jnp.zeros((batch_size, self.num_values), jnp.float32)

  @nn.compact
  def __call__(self, inputs, *, train: bool = False):
    del train
    h = nn.gelu(nn.Dense(self.hidden_size, dtype=self.dtype)(inputs))
    h = nn.Dense(self.hidden_size, dtype=self.dtype)(h)
    return {"pooled": h.astype(jnp.float32), "tokens": h[:, None, :]}


# ---- Records: the synthetic world's encounters plus a lab panel of their latent state ---------------------------


def lab_panel(extras, rng) -> tuple[np.ndarray, str, list[float]]:
  """(values, report, labels) of one encounter from its latent state (`Encounter.extras`)."""
  hf, infection = extras["hf_severity"][0], extras["infection"][0]
  values = np.array([100 * math.exp(1.5 * hf), 5 + 60 * infection, 0.01 + 0.2 * extras["st_elevation"][0],
                     1.0 + 2.0 * infection], np.float32) * np.exp(rng.normal(0, 0.1, 4)).astype(np.float32)
  high = [float(values[0] > 250), float(values[1] > 30)]
  report = " ".join(f"{name.upper()} {'elevated' if flag else 'normal'}." for name, flag in zip(("BNP", "CRP"), high))
  return values, report, high


def write_world_with_labs(out_dir, num_patients=48):
  params = synthetic_world.WorldParams(num_patients=num_patients, image_size=32, ecg_sampling_rate=100,
                                       ecg_seconds=2.0, link_fraction=0.7)
  rng = np.random.default_rng(0)
  by_split = {"train": [], "test": []}
  for patient in range(num_patients):
    split = "test" if patient % 4 == 0 else "train"
    for enc in synthetic_world.patient_encounters(params, patient):
      enc = dataclasses.replace(enc, split=split)
      if enc.linked or rng.random() < 0.5:  # every linked encounter and some others have labs
        values, report, labels = lab_panel(enc.extras, rng)
        enc.parts["labs"] = schema.Part(values, report=report, labels=labels)
      by_split[split].append(enc)
  shards = {}
  for split, encs in by_split.items():
    stats = schema.ShardStats(schema.shard_name(split, 0, 1))
    with tfrecord.TFRecordWriter(os.path.join(out_dir, stats.file)) as writer:
      for enc in encs:
        writer.write(schema.encode_encounter(enc))
        stats.add(enc)
    shards[split] = [stats]
  schema.write_dataset_info(out_dir, name="world_with_labs", shards=shards, label_names={
      "cxr": synthetic_world.CXR_LABELS, "ecg": synthetic_world.ECG_LABELS, "labs": LABS_LABELS})
  return by_split


def labs_config(data_dir):
  config = tiny_config(data_dir, total_steps=3, **{"eval.few_shot.seeds": 2, "eval.plot_points": 30})
  config.model.towers.labs = dict(name="labs_mlp", init="", skip_keys=(), kwargs=dict(hidden_size=16))
  config.data.labs = dict(log_std=1.5)
  config.loss.edges.labs_text = dict(modalities=("labs", "text"), kind="tmcl", weight=0.5)
  config.loss.edges.labs_ecg = dict(modalities=("labs", "ecg"), kind="pair", weight=1.0)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("world_with_labs")
  by_split = write_world_with_labs(str(data_dir))
  workdir = str(tmp_path_factory.mktemp("run"))
  results = train.train_and_evaluate(labs_config(str(data_dir)), workdir)
  return by_split, workdir, results


def test_a_registered_fourth_modality_trains_with_its_edges_and_is_evaluated(trained):
  by_split, workdir, results = trained
  assert jax.device_count() == 8
  test_linked = [e for e in by_split["test"] if e.linked]
  assert test_linked and all(e.has("labs") for e in test_linked)

  params = train.ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "3", "state"))["params"]
  assert set(params["towers"]) == {"cxr", "ecg", "labs"}  # text: the frozen trunk, left out
  assert set(params["heads"]) == {"cxr", "ecg", "labs", "text"}
  assert set(params["logit_scales"]) == {"cxr_text", "ecg_text", "cxr_ecg", "labs_text", "labs_ecg"}

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3]
  for row in rows:
    assert row["num_pairs/labs_ecg"] == 4 and row["num_pairs/cxr_ecg"] == 4  # linked rows: 4 of 8
    assert all(np.isfinite(row[f"loss/{e}"]) and row[f"loss/{e}"] > 0 for e in ("labs_text", "labs_ecg"))
    edges = row["loss/cxr_text"] + row["loss/ecg_text"] + row["loss/cxr_ecg"]
    assert row["loss"] == pytest.approx(edges + 0.5 * row["loss/labs_text"] + row["loss/labs_ecg"], rel=1e-5)

  # Retrieval along the new edges, both ways, against the test split's reports and linked ECGs.
  num_labs = sum(e.has("labs") for e in by_split["test"])
  assert results["retrieval/labs_to_text/num_queries"] == num_labs
  assert results["retrieval/labs_to_ecg/num_queries"] == len(test_linked)
  for direction in ("labs_to_text", "text_to_labs", "labs_to_ecg", "ecg_to_labs"):
    assert 0 <= results[f"retrieval/{direction}/R@1"] <= 1, direction
  assert "few_shot/labs/high_crp/1-shot/auroc_mean" in results  # labels of the new modality are probed too
  markdown = open(os.path.join(workdir, "eval", "report.md")).read()
  for direction in ("labs_to_text", "text_to_labs", "labs_to_ecg", "ecg_to_labs"):
    assert f"| {direction} |" in markdown, direction


def test_the_new_modality_embeds_through_the_inference_api(trained):
  by_split, workdir, _ = trained
  embedder = inference.Embedder.load(workdir)
  assert embedder.modalities == ["cxr", "ecg", "labs", "text"]
  panels = [e.part("labs").data for e in by_split["test"] if e.has("labs")][:3]
  emb = embedder.embed("labs", panels)
  assert emb.embeddings.shape == (3, 16) and emb.errors == []
  np.testing.assert_allclose(np.linalg.norm(emb.embeddings, axis=1), 1.0, atol=1e-5)
  assert not np.allclose(emb.embeddings[0], emb.embeddings[1], atol=1e-4)
  with pytest.raises(inference.BadInputs, match=r"labs\[1\]: prepared input has shape \(3,\); the model takes \(4,\)"):
    embedder.embed("labs", [panels[0], np.zeros(3)])  # a wrong-length panel is named, not fed to the model
