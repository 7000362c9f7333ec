"""The comparison benchmark's report (bench/prompt_tuning_comparison.py): the table it writes into
docs/prompt_tuning.md from finished runs, without training anything."""

import argparse
import json
import os

import numpy as np

from bench import prompt_tuning_comparison as comparison


def _metrics(mortality: float, readmission: float) -> dict:
  return {"in_hospital_mortality/auroc": mortality, "in_hospital_mortality/balanced_accuracy": mortality - 0.1,
          "readmission_30d/auroc": readmission, "readmission_30d/balanced_accuracy": readmission - 0.1}


def _section(tmp_path, results, timings):
  medbind = tmp_path / "medbind"
  (medbind / "checkpoints" / "500").mkdir(parents=True)
  (medbind / "metrics.json").write_text(json.dumps({"retrieval/cxr_to_ecg/R@10": 0.138}))
  args = argparse.Namespace(root=str(tmp_path), steps=100, batch_size=8, max_train_records=0, max_eval_records=0,
                            config_arg="tokens=4,lora_rank=8,lr=3e-3")
  config = comparison.run_config(args, "a", 0, str(medbind))
  sizes = {"a": dict(train_prompts=4522, train_tokens=64, eval_prompts=609, trainable_params=461_000)}
  return comparison.comparison_section(results, timings, args, command="python -m bench.prompt_tuning_comparison",
                                       medbind={"bound": str(medbind)}, sizes=sizes, config=config)


def test_the_section_gives_mean_and_population_std_per_arm_and_every_run(tmp_path):
  results = {"a": [(0, _metrics(0.70, 0.60)), (1, _metrics(0.74, 0.64)), (2, _metrics(0.78, 0.59))],
             "c": [(0, _metrics(0.80, 0.66))]}
  section = _section(tmp_path, results, {"a_seed0": 100.0, "a_seed1": 110.0, "a_seed2": 120.0, "c_seed0": 300.0})
  lines = section.splitlines()
  row_a = next(line for line in lines if line.startswith("| (a) facts only"))
  assert f"{np.mean([0.70, 0.74, 0.78]):.3f} ± {np.std([0.70, 0.74, 0.78]):.3f}" in row_a  # 0.740 ± 0.033
  assert "| 3 |" in row_a and row_a.endswith("| 110 |")  # seeds, mean run time
  row_c = next(line for line in lines if line.startswith("| (c) + MEDBind soft tokens"))
  assert "| 1 | 0.800 | 0.700 | 0.660 | 0.560 | 300 |" in row_c  # one seed: the value, no spread
  assert "| (a) | 2 | 0.780 | 0.680 | 0.590 | 0.490 | 120 |" in lines  # every run listed with its seed
  assert "learning rate 0.003" in section and "100 steps of 8 prompts" in section
  assert "| 500 | 13.8% | n/a |" in section  # the MEDBind run's steps and its retrieval (missing figures: n/a)


def test_write_out_replaces_only_the_marked_section(tmp_path):
  doc = tmp_path / "doc.md"
  doc.write_text(f"# Title\n\nbefore\n\n{comparison.START}\nold table\n{comparison.END}\n\nafter\n")
  section = f"{comparison.START}\nnew table\n{comparison.END}"
  comparison.write_out(str(doc), section)
  assert doc.read_text() == f"# Title\n\nbefore\n\n{section}\n\nafter\n"
  other = tmp_path / "new" / "table.md"  # a file without the markers gets the section alone
  comparison.write_out(str(other), section)
  assert other.read_text() == section + "\n" and os.path.exists(other)
