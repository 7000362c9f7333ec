"""A run without some edges: `configs/medbind.py:data_dir=DIR,edges=ecg_text` trains the ECG-text edge alone on a
converted PTB-XL tree (ECG and reports, no CXR, no linked records), with no CXR tower and no linked pool, and
evaluates what that data has (ECG<->text retrieval, zero-shot on the PTB-XL labels under protocol ptbxl_v1).

The PTB-XL tree is the one tests/test_real_protocols.py converts (records for every PTB-XL class in the test split;
two records in train), over the 8 fake CPU devices of conftest.py.
"""

import json
import math
import os

import jax
import orbax.checkpoint as ocp
import pytest

from configs import medbind
from medbind_jax import config_check, train
from test_real_protocols import convert_dataset
from tiny_config import tiny_config

PTBXL_LABELS = ("NORM", "MI", "STTC", "CD", "HYP")


@pytest.fixture(scope="module")
def ptbxl_dir(tmp_path_factory):
  return convert_dataset("ptbxl", tmp_path_factory)


def ecg_text_config(data_dir, **overrides):
  """tests/tiny_config.py's tiny towers, with the data and edges that `data_dir=DIR,edges=ecg_text` selects."""
  chosen = medbind.get_config(f"data_dir={data_dir},edges=ecg_text,batch_size=8")
  config = tiny_config(data_dir, **overrides)
  config.data.dir, config.data.synthetic = chosen.data.dir, chosen.data.synthetic
  config.loss.edges, config.data.linked_per_batch = chosen.loss.edges, chosen.data.linked_per_batch
  return config


def test_edges_argument_keeps_the_named_edges_and_linked_rows_follow_the_pair_edge():
  config = medbind.get_config("edges=ecg_text")
  assert list(config.loss.edges) == ["ecg_text"] and config.data.linked_per_batch == 0
  both = medbind.get_config("edges=cxr_text+cxr_ecg,batch_size=64")
  assert sorted(both.loss.edges) == ["cxr_ecg", "cxr_text"] and both.data.linked_per_batch == 16
  assert sorted(medbind.get_config().loss.edges) == ["cxr_ecg", "cxr_text", "ecg_text"]
  with pytest.raises(ValueError, match=r"unknown edge\(s\) \['ecg_txt'\]; known: cxr_text\+ecg_text\+cxr_ecg"):
    medbind.get_config("edges=ecg_txt")
  # data_dir=DIR trains on DIR; only the default (no data_dir, no paper) generates the synthetic world.
  assert medbind.get_config("data_dir=/data/ptbxl").data.synthetic is None
  assert medbind.get_config().data.synthetic is not None


def test_linked_rows_without_a_pair_edge_are_refused():
  config = medbind.get_config("edges=ecg_text,linked_per_batch=8")
  with pytest.raises(config_check.ConfigError, match=r"linked_per_batch=8, but no pair edge is active.*"
                     r"Set linked_per_batch=0"):
    config_check.check(config)


def test_all_edges_on_ecg_only_data_stop_and_name_the_edges_it_can_train(ptbxl_dir, tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(config_check.ConfigError, match=r"needs cxr records.*dataset 'ptbxl'.*has ecg \(2\).*"
                     r"configs/medbind.py:edges=ecg_text"):
    train.train_and_evaluate(tiny_config(ptbxl_dir), str(workdir))
  assert not workdir.exists()


def test_ecg_text_alone_trains_on_ptbxl_and_evaluates_what_it_has(ptbxl_dir, tmp_path):
  config = ecg_text_config(ptbxl_dir, total_steps=3, **{
      "eval.protocol": "ptbxl_v1", "eval.few_shot.shots": (1, 2), "eval.few_shot.seeds": 2, "eval.plots": False})
  assert config.data.linked_per_batch == 0 and config.data.synthetic is None and config.data.dir == ptbxl_dir
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)

  # No CXR anywhere in the trained parameters; one temperature, the edge's.
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "3", "state"))
  params = state["params"]
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert not [p for p in paths if "cxr" in p]
  assert set(params["towers"]) == {"ecg"} and set(params["heads"]) == {"ecg", "text"}  # frozen text trunk: cached
  assert set(params["logit_scales"]) == {"ecg_text"}

  # Every step's loss is the ECG-text edge's alone.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [row for row in map(json.loads, f) if "loss" in row]
  assert [row["step"] for row in rows] == [1, 2, 3]
  for row in rows:
    assert {k for k in row if k.startswith(("loss/", "num_pairs/"))} == {"loss/ecg_text"}
    assert math.isfinite(row["loss"]) and row["loss"] == pytest.approx(row["loss/ecg_text"], rel=1e-6)

  # Evaluation covers what the data and the model have: ECG<->text retrieval and zero-shot on the PTB-XL labels.
  assert all(math.isfinite(v) for v in results.values()), {k: v for k, v in results.items() if not math.isfinite(v)}
  assert not [k for k in results if "cxr" in k]
  for direction in ("ecg_to_text", "text_to_ecg"):
    assert 0 <= results[f"retrieval/{direction}/R@1"] <= 1
  assert results["retrieval/ecg_to_text/num_queries"] == 17  # the converted test split's ECGs
  for label in PTBXL_LABELS:
    assert math.isfinite(results[f"zero_shot/ecg/{label}/auroc"])
  assert math.isfinite(results["zero_shot/ecg/macro_auroc"])
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f) == {k: v for k, v in results.items() if k != "step"}

  # --mode=eval on the run: the same checkpoint, the same retrieval numbers.
  again = train.evaluate_checkpoint(ecg_text_config(ptbxl_dir, **{
      "eval.protocol": "ptbxl_v1", "eval.evaluators": ("retrieval",), "eval.plots": False}), workdir)
  assert {k: v for k, v in again.items() if k.startswith("retrieval/")} == {
      k: v for k, v in results.items() if k.startswith("retrieval/")}
