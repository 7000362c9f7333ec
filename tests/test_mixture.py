"""Training mixtures (`config.data.sources`, medbind_jax/data/mixture.py): three converted real-layout trees in one
run over the 8 fake CPU devices of conftest.py.

  mimic   linked MIMIC-CXR + MIMIC-IV-ECG encounters (CXR, ECG, reports): every edge, the pair edge's linked rows
  ptbxl   PTB-XL (ECG + reports): the ECG-text edge only
  openi   Open-i (CXR + reports): the CXR-text edge only

Every tree is converted by tests/test_real_protocols.py's `convert_dataset`; each source reads its `test` split
(where those trees put their records).
"""

import json
import os

import jax
import numpy as np
import pytest

from medbind_jax import config_check, runs, train
from medbind_jax.data import mixture, pipeline, preprocess
from test_real_protocols import convert_dataset
from test_train import _final_params, _losses
from tiny_config import tiny_config

SOURCES = ("mimic", "ptbxl", "openi")
ALLOWED = {"cxr": {"mimic", "openi"}, "ecg": {"mimic", "ptbxl"}}  # which sources may fill each modality's rows


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  return {name: convert_dataset(name, tmp_path_factory) for name in SOURCES}


def mixture_config(dirs, **overrides):
  sources = tuple(dict(name=name, dir=dirs[name], split="test") for name in SOURCES)
  return tiny_config(dirs["mimic"], **{"data.sources": sources, "eval.support_split": "",
                                       "eval.evaluators": ("retrieval",), "eval.plots": False,
                                       "total_steps": 3, **overrides})


def test_each_edge_draws_its_rows_from_the_sources_that_have_its_modalities(dirs):
  config = mixture_config(dirs)
  edges = runs.edges(config)
  layout = pipeline.Layout.from_edges(edges)
  index, pools, placed = train.load_sources(config, edges, layout, seed=config.seed, progress=False)
  starts = [offset for _, offset in placed] + [len(index.records)]
  source_of = np.repeat([s.label for s, _ in placed], np.diff(starts))
  spec = pipeline.BatchSpec(8, 4, shards=jax.local_device_count())
  dataset = pipeline.train_dataset(index, runs.make_tokenize(config), spec, layout, specs=runs.data_specs(config),
                                   seed=config.seed, augment=False, pools=pools)
  seen = {m: set() for m in ALLOWED}
  for step in range(12):
    batch = dataset[step]
    ids = {m: batch["index"][m] for m in ALLOWED}
    linked = batch["pair_mask"]["cxr_ecg"]
    assert linked.sum() == 4
    for m, allowed in ALLOWED.items():
      sources = set(source_of[ids[m]])
      assert sources <= allowed, (step, m, sources)
      seen[m] |= sources
      for i, row in enumerate(ids[m]):  # each row's report is its own record's
        assert batch["text_key"][m][i].tolist() == preprocess.text_key(index.records[row].reports[m]).tolist()
    # A pair edge's rows: one linked MIMIC encounter gives both modalities.
    np.testing.assert_array_equal(ids["cxr"][linked], ids["ecg"][linked])
    assert set(source_of[ids["cxr"][linked]]) == {"mimic"}
    assert all(index.records[r].linked for r in ids["cxr"][linked])
  assert seen == ALLOWED  # with equal weights every allowed source shows up within a few steps

  # The same seed gives the same batches (a fresh dataset: nothing cached), another seed others.
  again = pipeline.train_dataset(index, runs.make_tokenize(config), spec, layout, specs=runs.data_specs(config),
                                 seed=config.seed, augment=False,
                                 pools=train.load_sources(config, edges, layout, seed=config.seed, progress=False)[1])
  np.testing.assert_array_equal(again[5]["index"]["ecg"], dataset[5]["index"]["ecg"])


def test_weights_set_each_pools_shares_and_a_zero_weight_leaves_a_source_out(dirs):
  config = mixture_config(dirs)
  config.data.sources = (dict(name="mimic", dir=dirs["mimic"], split="test", weights={"ecg_text": 3.0}),
                         dict(name="ptbxl", dir=dirs["ptbxl"], split="test"),
                         dict(name="openi", dir=dirs["openi"], split="test", weight=0.0))
  edges = runs.edges(config)
  layout = pipeline.Layout.from_edges(edges)
  index, pools, placed = train.load_sources(config, edges, layout, seed=0, progress=False)
  starts = [offset for _, offset in placed] + [len(index.records)]
  source_of = np.repeat([s.label for s, _ in placed], np.diff(starts))
  ecg = source_of[[pools["ecg"][k] for k in range(400)]]
  assert abs((ecg == "mimic").mean() - 0.75) < 0.02  # 3 : 1
  cxr = source_of[[pools["cxr"][k] for k in range(100)]]
  assert set(cxr) == {"mimic"}  # Open-i's weight is 0


def test_a_mixture_trains_stops_and_resumes_exactly(dirs, tmp_path):
  config = mixture_config(dirs)
  full, parted = str(tmp_path / "full"), str(tmp_path / "parted")
  results = train.train_and_evaluate(config, full)
  assert train.train_and_evaluate(config, parted, stop_after_step=3) is None  # last checkpoint: step 2
  resumed = train.train_and_evaluate(config, parted)
  want, got = _final_params(full, 3), _final_params(parted, 3)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert _losses(full) == _losses(parted) and sorted(_losses(parted)) == [1, 2, 3]
  assert results == resumed
  with open(os.path.join(full, "metrics.jsonl")) as f:
    parts = json.loads(f.readline())
  assert all(np.isfinite(parts[f"loss/{e}"]) for e in ("cxr_text", "ecg_text", "cxr_ecg"))


def test_mixture_mistakes_name_the_source_and_the_edge(dirs, tmp_path):
  # A source that serves none of the edges: Open-i (CXR) in an ECG-text run.
  config = mixture_config(dirs)
  config.loss.edges = {"ecg_text": config.loss.edges.ecg_text.to_dict()}
  config.data.linked_per_batch = 0
  with pytest.raises(config_check.ConfigError, match=r"sources\[2\] \(openi: .*serves none of the run's edges "
                                                       r"\(ecg_text: ecg\+text\)"):
    config_check.check(config)
  # An edge no source serves: the pair edge without the linked MIMIC set.
  config = mixture_config(dirs)
  config.data.sources = config.data.sources[1:]
  with pytest.raises(config_check.ConfigError, match=r"loss.edges.cxr_ecg has no source: none of the training "
                                                       r"sources \(ptbxl, openi\) has linked records"):
    config_check.check(config)
  # A weight for an edge the run does not have, and an unknown key.
  config = mixture_config(dirs)
  config.data.sources = (dict(dir=dirs["mimic"], split="test", weights={"ecg_txt": 1.0}),)
  with pytest.raises(config_check.ConfigError, match=r"weights edges \['ecg_txt'\] that the run does not have"):
    config_check.check(config)
  config.data.sources = (dict(dir=dirs["mimic"], splt="test"),)
  with pytest.raises(config_check.ConfigError, match=r"unknown keys \['splt'\]"):
    config_check.check(config)
  assert not os.listdir(tmp_path)
  # The index-level check says the same where config_check cannot see it (e.g. records without the modality).
  edges = runs.edges(mixture_config(dirs))
  layout = pipeline.Layout.from_edges(edges)
  indexes = [pipeline.index_split(dirs[n], "test", progress=False) for n in ("ptbxl", "openi")]
  with pytest.raises(ValueError, match=r"edge cxr_ecg has no source: none of \['ptbxl', 'openi'\]"):
    mixture.check_sources([mixture.Source(dirs[n], "test", name=n) for n in ("ptbxl", "openi")],
                          [mixture.source_pools(i, layout) for i in indexes], edges, layout, 4)
