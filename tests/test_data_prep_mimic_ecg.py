"""data_prep/mimic_ecg.py on a miniature MIMIC-IV-ECG tree (real CinC-2021 Georgia ECGs written as MIMIC studies:
200 units/mV, MIMIC's lead order I II III aVR aVF aVL V1-V6, record_list.csv, machine_measurements.csv)."""

import json

import numpy as np
import pytest

import real_layouts as L
from data_prep import cli, mimic_ecg, tables


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  src, out = tmp_path_factory.mktemp("mimic_ecg_src"), tmp_path_factory.mktemp("mimic_ecg_out")
  L.build_mimic_ecg(src)
  summary = mimic_ecg.convert(str(src), str(out), cli.Options(shard_size=3, workers=1, progress=False))
  return src, out, summary, L.read_converted(out)


def test_the_source_tree_is_laid_out_like_the_release(converted):
  src, _, _, _ = converted
  header = (src / "files/p1000/p10000032/s40689238/40689238.hea").read_text().splitlines()
  assert header[0] == "40689238 12 500 5000 08:44:00 23/07/2180"
  assert [line.split()[-1] for line in header[1:13]] == list(L.MIMIC_ECG_LEADS)
  assert "200.0(0)/mV" in header[1]


def test_waveforms_match_wfdb_with_leads_reordered_by_name(converted):
  src, _, summary, records = converted
  assert summary.exit_code == 0 and not summary.errors
  for study in L.DEFAULT_ECG_STUDIES:
    enc = records[f"s{study.study_id}"]
    L.assert_ecg_matches(enc, L.expected_ecg_mv(src / study.path))
    assert enc.patient_id == study.subject_id and enc.part("ecg").study_id == f"s{study.study_id}"
    # schema times are float32 (tf.train.Example float_list): MIMIC's year-2180 times keep ~512 s resolution.
    assert enc.part("ecg").time == float(np.float32(tables.epoch_seconds(study.time)))
    assert not enc.has("cxr") and not enc.linked


def test_statements_are_joined_in_order_into_the_report(converted):
  _, _, _, records = converted
  assert records["s40689238"].part("ecg").report == "Sinus bradycardia. Left atrial enlargement."
  assert records["s42222222"].part("ecg").report == "Sinus bradycardia. Right bundle branch block."
  assert records["s44458630"].part("ecg").report == "Sinus tachycardia."


def test_splits_are_by_subject_hash(converted):
  _, out, _, records = converted
  for study in L.DEFAULT_ECG_STUDIES:
    assert records[f"s{study.study_id}"].split == tables.hash_split(study.subject_id, (0.8, 0.1, 0.1), "mimic")
  info = json.loads((out / "dataset_info.json").read_text())
  assert sum(v["num_examples"] for v in info["splits"].values()) == len(L.DEFAULT_ECG_STUDIES)
  assert info["conversion_options"]["split_salt"] == "mimic"


def test_gzipped_tables_are_read_too(converted, tmp_path):
  import gzip  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  src, out, _, _ = converted
  gz_src = tmp_path / "src"
  shutil.copytree(src, gz_src)
  for name in ("record_list.csv", "machine_measurements.csv"):
    with open(gz_src / name, "rb") as f, gzip.open(gz_src / (name + ".gz"), "wb") as g:
      g.write(f.read())
    (gz_src / name).unlink()
  mimic_ecg.convert(str(gz_src), str(tmp_path / "out"), cli.Options(shard_size=3, workers=1, progress=False))
  shards = sorted(p.name for p in out.iterdir() if ".tfrecord-" in p.name)
  assert shards == sorted(p.name for p in (tmp_path / "out").iterdir() if ".tfrecord-" in p.name)
  for name in shards:
    assert (out / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
  assert (out / "dataset_info.json").read_text() == (tmp_path / "out" / "dataset_info.json").read_text()
