"""Config mistakes stop a run before any work (`medbind_jax.config_check`), with one paragraph that names the fix.

Each test makes one mistake in an otherwise good tiny config (tests/tiny_config.py) and checks the message and that
nothing was written: no workdir, no data directory, no synthetic world. The checks read only the config, the
device count (8 fake CPU devices) and dataset_info.json, so these tests train nothing. One test runs main.py as a
user would, to show the message comes alone (no traceback) with exit status 2.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import medbind
from medbind_jax import config_check, train
from medbind_jax.data import schema
from tiny_config import tiny_config
from tiny_data import write_tiny_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_data")
  write_tiny_dataset(d, num_records=8, num_shards=1, splits=("train", "test"))
  return str(d)


def refused(config, tmp_path, *patterns: str) -> str:
  """Trains `config` into tmp_path/run, expecting a ConfigError whose message matches every regex of `patterns`;
  checks that the workdir was not created. Returns the message."""
  workdir = tmp_path / "run"
  with pytest.raises(config_check.ConfigError) as caught:
    train.train_and_evaluate(config, str(workdir))
  message = str(caught.value)
  for pattern in patterns:
    assert re.search(pattern, message), (pattern, message)
  assert "\n" not in message  # one paragraph
  assert not workdir.exists()
  return message


def ptbxl_like(tmp_path) -> str:
  """A data dir whose dataset_info.json declares ECG records only (the checks read nothing else)."""
  d = tmp_path / "ecg_only"
  d.mkdir()
  counts = dict(num_examples=4, num_ecg=4, num_linked=0)
  info = {"schema_version": schema.SCHEMA_VERSION, "name": "ptbxl", "modalities": ["ecg"],
          "ecg_label_names": ["NORM"], "splits": {"train": {**counts, "shards": []},
                                                  "test": {**counts, "shards": []}}}
  (d / schema.DATASET_INFO).write_text(json.dumps(info))
  return str(d)


# ---- Data ----------------------------------------------------------------------------------------------------------


def test_empty_data_dir(tmp_path):
  refused(tiny_config(""), tmp_path, r"config\.data\.dir is empty", r"configs/medbind\.py:data_dir=DIR",
          r"--config\.data\.dir=DIR")


def test_data_dir_that_does_not_exist_is_neither_created_nor_generated(tmp_path):
  missing = tmp_path / "no_such_dir"
  refused(tiny_config(str(missing)), tmp_path, rf"data\.dir={missing} has no dataset_info\.json \(the directory does "
          r"not exist\)", r"python -m data_prep\.ptbxl --src PTBXL_DIR --out", r"data_dir=DIR")
  assert not missing.exists()


def test_data_dir_without_dataset_info(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  message = refused(tiny_config(str(empty)), tmp_path, r"has no dataset_info\.json, so it is not a MEDBind-JAX data "
                    r"directory", r"data_prep converter")
  assert "does not exist" not in message and os.listdir(empty) == []


def test_missing_dir_is_fine_when_the_synthetic_world_will_be_generated_there(tmp_path):
  config = medbind.get_config()
  config.data.dir = str(tmp_path / "world")
  config_check.check(config)  # no error: the world is generated there later
  assert not (tmp_path / "world").exists()


def test_synthetic_world_over_another_dataset_says_to_pass_data_dir(data_dir, tmp_path):
  config = medbind.get_config()  # synthetic world on, but data.dir set by flag to a converted dataset
  config.data.dir = data_dir
  before = sorted(os.listdir(data_dir))
  refused(config, tmp_path, rf"holds dataset 'tiny', but config\.data\.synthetic asks for the synthetic world",
          rf"configs/medbind\.py:data_dir={data_dir}")
  assert sorted(os.listdir(data_dir)) == before


def test_batch_size_the_devices_cannot_split_generates_no_world(tmp_path):
  config = medbind.get_config("batch_size=12")
  config.data.dir = str(tmp_path / "world")
  refused(config, tmp_path, r"data\.batch_size=12 does not split over the 8 devices",
          r"configs/medbind\.py:batch_size=16", r"--config\.data\.batch_size=16")
  assert not (tmp_path / "world").exists()


def test_eval_split_missing(data_dir, tmp_path):
  refused(tiny_config(data_dir, **{"data.eval_split": "val"}), tmp_path,
          r"has no records in split 'val' \(data\.eval_split\); its splits with records: train, test",
          r"--config\.data\.eval_split")


def test_support_split_missing(data_dir, tmp_path):
  refused(tiny_config(data_dir, **{"eval.support_split": "val"}), tmp_path,
          r"has no records in split 'val' \(eval\.support_split\)", r"--config\.eval\.support_split",
          r"few-shot and linear probes fit on it\), or to '' to draw few-shot support from the evaluated split")


def test_eval_dataset_without_data(data_dir, tmp_path):
  missing = tmp_path / "chexpert"
  refused(tiny_config(data_dir, **{"eval.datasets": (dict(name="chexpert", dir=str(missing), support_split=""),)}),
          tmp_path, rf"config\.eval\.datasets\[0\]\.dir={missing} has no dataset_info\.json", r"data_prep")


def test_edge_whose_modality_the_data_lacks(tmp_path):
  refused(tiny_config(ptbxl_like(tmp_path)), tmp_path, r"loss\.edges\.cxr_ecg needs cxr records",
          r"dataset 'ptbxl'\) has ecg \(4\)", r"configs/medbind\.py:edges=ecg_text")


def test_pair_edge_without_linked_records(data_dir, tmp_path):
  d = tmp_path / "unlinked"
  d.mkdir()
  info = json.loads(open(os.path.join(data_dir, schema.DATASET_INFO)).read())
  info["splits"]["train"]["num_linked"] = 0
  (d / schema.DATASET_INFO).write_text(json.dumps(info))
  refused(tiny_config(str(d)), tmp_path, r"pair edge cxr_ecg binds cxr and ecg of linked records",
          r"has no linked records", r"configs/medbind\.py:edges=cxr_text\+ecg_text", r"data_prep\.mimic")


# ---- Model ---------------------------------------------------------------------------------------------------------


def test_unknown_encoder(data_dir, tmp_path):
  refused(tiny_config(data_dir, **{"model.towers.ecg.name": "ecg_transfomer"}), tmp_path,
          r"model\.towers\.ecg\.name='ecg_transfomer' is not a known encoder", r"ecg_transformer",
          r"--config\.model\.towers\.ecg\.name")


def test_unknown_modality(data_dir, tmp_path):
  config = tiny_config(data_dir)
  config.loss.edges.eeg_text = dict(modalities=("eeg", "text"), kind="tmcl", weight=1.0)
  refused(config, tmp_path, r"loss\.edges\.eeg_text names modality 'eeg', which has no codec",
          r"registered: .*cxr.*ecg", r"docs/adding_a_modality\.md")


def test_modality_without_a_tower(data_dir, tmp_path):
  config = tiny_config(data_dir)
  del config.model.towers["cxr"]
  refused(config, tmp_path, r"uses modality 'cxr', but config\.model\.towers has no 'cxr' tower",
          r"add config\.model\.towers\.cxr", r"edges=")


# ---- Batch and devices ---------------------------------------------------------------------------------------------


def test_linked_per_batch_larger_than_the_batch(data_dir, tmp_path):
  refused(tiny_config(data_dir, **{"data.linked_per_batch": 9}), tmp_path,
          r"data\.linked_per_batch=9 must be between 0 and data\.batch_size=8", r"linked_per_batch=")


def test_linked_rows_without_a_pair_edge(data_dir, tmp_path):
  config = tiny_config(data_dir)
  del config.loss.edges["cxr_ecg"]
  refused(config, tmp_path, r"linked_per_batch=4, but no pair edge is active \(edges: cxr_text, ecg_text\)",
          r"Set linked_per_batch=0")


def test_pair_edge_without_linked_rows(data_dir, tmp_path):
  refused(tiny_config(data_dir, **{"data.linked_per_batch": 0}), tmp_path,
          r"pair edge\(s\) cxr_ecg would score no rows", r"linked_per_batch > 0", r"edges=")


def test_microbatches_that_do_not_divide_the_rows_per_device(data_dir, tmp_path):
  refused(tiny_config(data_dir, **{"data.batch_size": 16, "optim.microbatches": 3}), tmp_path,
          r"optim\.microbatches=3 must divide the 2 rows per device", r"one of \[1, 2\]")


def test_mesh_that_does_not_fit_the_devices(data_dir, tmp_path):
  refused(tiny_config(data_dir, **{"mesh.fsdp": 3}), tmp_path, r"mesh\.fsdp=3 must be a positive divisor of the 8",
          r"--config\.mesh\.fsdp")


# ---- evaluate_checkpoint and main.py -------------------------------------------------------------------------------


def test_mode_eval_checks_the_runs_config_before_anything(tmp_path):
  """A run whose data dir is gone: --mode=eval says so, writing nothing (not even eval/)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  config = tiny_config(str(tmp_path / "gone"))
  (workdir / "config.json").write_text(config.to_json_best_effort())
  with pytest.raises(config_check.ConfigError, match=r"gone has no dataset_info\.json"):
    train.evaluate_checkpoint(config, str(workdir))
  assert os.listdir(workdir) == ["config.json"] and not (tmp_path / "gone").exists()


def test_main_prints_the_message_alone_and_exits_with_status_2(tmp_path):
  workdir, missing = tmp_path / "run", tmp_path / "ptbxl"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  done = subprocess.run(
      [sys.executable, "main.py", f"--config=configs/medbind.py:data_dir={missing},edges=ecg_text",
       f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr
  assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
  assert f"data.dir={missing} has no dataset_info.json (the directory does not exist)" in done.stderr
  assert "python -m data_prep.ptbxl" in done.stderr
  assert not workdir.exists() and not missing.exists()


def test_main_reports_a_bad_config_argument_without_the_traceback_of_the_config_file(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  done = subprocess.run([sys.executable, "main.py", "--config=configs/medbind.py:edges=ecg_txt",
                         f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip() == ("--config: ValueError: edges=ecg_txt: unknown edge(s) ['ecg_txt']; known: "
                                 "cxr_text+ecg_text+cxr_ecg (join several with '+', e.g. edges=ecg_text+cxr_text)")
  assert not workdir.exists()
  # Other flag mistakes keep absl's report and status.
  done = subprocess.run([sys.executable, "main.py", "--config=configs/medbind.py", "--mode=bogus"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 1 and "FATAL Flags parsing error: flag --mode=bogus" in done.stderr
  assert "Traceback" not in done.stderr
