"""The EMCL ablation driver: which runs it trains, what it skips, and the comparison table (no real training)."""

import json
import os

import ml_collections
import pytest

from bench import ablation


def _write_eval(workdir, step, **metrics):
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", "metrics.json"), "w") as f:
    json.dump({"step": step, **metrics}, f)


def test_finished_runs_are_skipped_and_the_others_trained_with_their_seed_and_weight(tmp_path, monkeypatch):
  root = str(tmp_path)
  _write_eval(ablation.workdir_of(root, 1.0, 0), 10, **{"retrieval/rsum": 300.0})  # finished
  _write_eval(ablation.workdir_of(root, 0.0, 0), 4, **{"retrieval/rsum": 1.0})  # evaluated mid-run: not finished
  trained = []

  def fake_train(config, workdir):
    weight = config.loss.edges.cxr_ecg.weight  # the arm's EMCL weight (MEDBind's lambda)
    trained.append((config.seed, weight, config.cache_dir, workdir))
    _write_eval(workdir, config.total_steps, **{"retrieval/rsum": 100.0 * weight + config.seed})

  monkeypatch.setattr(ablation.train, "train_and_evaluate", fake_train)
  results = ablation.run_arms(root, [0, 1], [1.0, 0.0], lambda seed, weight: ablation.default_config(
      seed, weight, steps=10, overrides=["eval.plot_points=7", "data.dir=/elsewhere"]))
  cache = os.path.join(root, "cache")
  assert trained == [(1, 1.0, cache, ablation.workdir_of(root, 1.0, 1)),
                     (0, 0.0, cache, ablation.workdir_of(root, 0.0, 0)),
                     (1, 0.0, cache, ablation.workdir_of(root, 0.0, 1))]
  assert [[r["retrieval/rsum"] for r in results[w]] for w in (1.0, 0.0)] == [[300.0, 101.0], [0.0, 1.0]]
  config = ablation.default_config(2, 0.0, steps=10, overrides=["eval.plot_points=7", "data.dir=/elsewhere"])
  assert (config.seed, config.loss.edges.cxr_ecg.weight, config.total_steps) == (2, 0.0, 10)
  assert config.eval.plot_points == 7 and config.data.dir == "/elsewhere"


def test_comparison_table_reports_mean_std_and_difference_of_every_metric():
  results = {1.0: [{"step": 5, "cross_modal/t/balanced_accuracy": 0.8, "cross_modal/t/num_queries": 9.0,
                    "retrieval/cxr_to_ecg/R@1": 0.5, "retrieval/cxr_to_ecg/chance@1": 0.01},
                   {"step": 5, "cross_modal/t/balanced_accuracy": 0.6, "retrieval/cxr_to_ecg/R@1": 0.3}],
             0.0: [{"step": 5, "cross_modal/t/balanced_accuracy": 0.5, "retrieval/cxr_to_ecg/R@1": 0.1},
                   {"step": 5, "cross_modal/t/balanced_accuracy": 0.5, "retrieval/cxr_to_ecg/R@1": 0.1}]}
  table = ablation.comparison_table(results, command="python -m bench.ablation --root r", steps=5)
  assert "Command: `python -m bench.ablation --root r`" in table
  row = "| cross_modal/t/balanced_accuracy | 0.7000 ± 0.1000 | 0.5000 ± 0.0000 | +0.2000 |"
  assert table.count(row) == 2  # in the headline and in its section
  assert "| retrieval/cxr_to_ecg/R@1 | 0.4000 ± 0.1000 | 0.1000 ± 0.0000 | +0.3000 |" in table
  assert "num_queries" not in table and "chance@1" not in table and "| step |" not in table
  assert "emcl_weight=1 (n=2)" in table and "### retrieval" in table


def test_default_config_rejects_unknown_fields():
  with pytest.raises((KeyError, AttributeError)):
    ablation.default_config(0, 1.0, overrides=["eval.no_such_field=1"])
  assert isinstance(ablation.default_config(0, 1.0), ml_collections.ConfigDict)
  config = ablation.default_config(0, 1.0, overrides=["loss.edges.cxr_ecg.negatives=all"])  # a keyed edge's field
  assert config.loss.edges.cxr_ecg.negatives == "all" and config.loss.edges.cxr_ecg.weight == 1.0
