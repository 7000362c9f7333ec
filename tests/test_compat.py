"""What was written before modalities were keyed by name still works (tests/fixtures/v1, written by that code):
its runs embed and evaluate through a parameter and config migration, and a run refuses, with a message saying
what to do, to resume training from such a checkpoint. (Reading its schema-v1 shards: tests/test_pipeline.py.)"""

import json
import os
import shutil

import numpy as np
import pytest

from medbind_jax import inference, runs, train

V1 = os.path.join(os.path.dirname(__file__), "fixtures", "v1")


@pytest.fixture()
def old_run(tmp_path):
  """A copy of the old run whose config points at a copy of the fixture's v1 dataset (its own data dir was a temp
  dir; a copy, since indexing a dataset without shard indexes writes them beside its shards)."""
  workdir = tmp_path / "run_v1"
  shutil.copytree(os.path.join(V1, "run_v1"), workdir)
  shutil.copytree(os.path.join(V1, "dataset_v1"), tmp_path / "dataset_v1")
  config = json.loads((workdir / "config.json").read_text())
  config["data"]["dir"] = str(tmp_path / "dataset_v1")
  config["cache_dir"] = str(tmp_path / "cache")
  (workdir / "config.json").write_text(json.dumps(config))
  return str(workdir)


def test_old_parameter_layout_is_migrated_on_load():
  params, step = runs.restore_params(os.path.join(V1, "run_v1"))
  assert step == 2
  assert set(params) == {"towers", "heads", "logit_scales"}
  assert set(params["towers"]) == {"cxr", "ecg"} and set(params["heads"]) == {"cxr", "ecg", "text"}
  assert set(params["logit_scales"]) == {"cxr_text", "ecg_text", "cxr_ecg"}
  assert all(np.shape(v) == () for v in params["logit_scales"].values())
  config = runs.load_run_config(os.path.join(V1, "run_v1"))
  assert set(config.model.towers) == {"cxr", "ecg", "text"} and "cxr" not in config.model
  assert dict(config.loss.edges.cxr_ecg) == {"modalities": ["cxr", "ecg"], "kind": "pair", "weight": 1.0,
                                             "negatives": "linked"}


def test_an_old_run_embeds_exactly_as_the_code_that_trained_it():
  want = np.load(os.path.join(V1, "expected_embeddings.npz"))
  embedder = inference.Embedder.load(os.path.join(V1, "run_v1"))
  assert embedder.step == 2
  np.testing.assert_allclose(embedder.embed_cxr(list(want["images"])), want["cxr"], atol=1e-6)
  np.testing.assert_allclose(embedder.embed_ecg(list(want["ecgs"]), sampling_rate=125.0), want["ecg"], atol=1e-6)
  np.testing.assert_allclose(embedder.embed_text([str(t) for t in want["texts"]]), want["text"], atol=1e-6)


def test_an_old_run_evaluates_with_mode_eval(old_run):
  config = runs.load_run_config(old_run)
  results = train.evaluate_checkpoint(config, old_run)
  assert results["step"] == 2.0
  assert results["retrieval/cxr_to_ecg/num_queries"] == 8  # the v1 test split: 8 linked encounters
  assert os.path.exists(os.path.join(old_run, "eval", "report.md"))


def test_training_does_not_resume_from_an_old_checkpoint_and_says_what_to_do(old_run):
  config = runs.load_run_config(old_run)
  config.total_steps = 4
  before = sorted(os.listdir(old_run)), sorted(os.listdir(os.path.join(old_run, "checkpoints")))
  old_config = open(os.path.join(old_run, "config.json")).read()
  with pytest.raises(ValueError, match=r"before modalities were keyed.*evaluates \(--mode=eval\).*new workdir"):
    train.train_and_evaluate(config, old_run)
  # Refused before anything was written: the old run is as it was.
  assert (sorted(os.listdir(old_run)), sorted(os.listdir(os.path.join(old_run, "checkpoints")))) == before
  assert open(os.path.join(old_run, "config.json")).read() == old_config
