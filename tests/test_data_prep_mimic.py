"""data_prep/mimic.py: MIMIC-CXR-JPG + MIMIC-IV-ECG miniature trees (real images, reports and ECGs) converted into
one dataset with linked CXR-ECG records.

The trees (tests/real_layouts.py): subject 10000032 has CXR studies on 2180-07-23 08:30 and 2180-08-01, and ECGs on
2180-07-23 08:44 (14 min after the first CXR) and 2180-07-24 09:54 (25.4 h after it); subject 10000980 has a CXR
only; subjects 10000764 and 10001234 have ECGs only.
"""

import gzip
import json

import numpy as np
import pytest

import real_layouts as L
from data_prep import cli, mimic, mimic_ecg, tables

OPTIONS = cli.Options(shard_size=2, workers=1, progress=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  cxr_src, ecg_src = tmp_path_factory.mktemp("cxr_src"), tmp_path_factory.mktemp("ecg_src")
  L.build_mimic_cxr(cxr_src)
  L.build_mimic_ecg(ecg_src)
  return cxr_src, ecg_src


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
  out = tmp_path_factory.mktemp("mimic_out")
  summary = mimic.convert(str(sources[0]), str(sources[1]), str(out), OPTIONS)
  return out, summary, L.read_converted(out)


def test_the_pair_within_24_hours_becomes_one_linked_record(converted, sources):
  out, summary, records = converted
  assert summary.exit_code == 0 and not summary.errors
  assert sorted(records) == ["cxr-s50414267+ecg-s40689238", "cxr-s53189527", "cxr-s54321000", "ecg-s41111111",
                             "ecg-s42222222", "ecg-s44458630"]
  enc = records["cxr-s50414267+ecg-s40689238"]
  assert enc.linked and enc.has("cxr") and enc.has("ecg") and enc.dataset == "mimic"
  assert enc.part("cxr").study_id == "s50414267" and enc.part("ecg").study_id == "s40689238"
  # Both halves carry the same values as the single-dataset converters produce.
  iu = L.iu_reports()["2"]
  assert enc.part("cxr").report == L.expected_cxr_text(iu["findings"], iu["impression"])
  assert enc.part("ecg").report == "Sinus bradycardia. Left atrial enlargement."
  L.assert_ecg_matches(enc, L.expected_ecg_mv(sources[1] / L.DEFAULT_ECG_STUDIES[0].path))
  assert enc.part("cxr").labels[list(mimic.SPEC.label_names["cxr"]).index("Cardiomegaly")] == 1.0
  assert not any(r.linked for k, r in records.items() if "+" not in k)
  info = json.loads((out / "dataset_info.json").read_text())
  assert info["linking"]["linked_pairs"] == 1 and info["linking"]["candidate_pairs"] == 1
  assert sum(v["num_linked"] for v in info["splits"].values()) == 1


def test_splits_are_by_subject_official_for_cxr_subjects(converted):
  _, _, records = converted
  assert records["cxr-s50414267+ecg-s40689238"].split == "train"
  assert records["ecg-s44458630"].split == "train"  # subject 10000032's official CXR split
  assert records["cxr-s54321000"].split == "val"  # 'validate'
  for key, subject in (("ecg-s41111111", "10000764"), ("ecg-s42222222", "10001234")):
    assert records[key].split == tables.hash_split(subject, mimic_ecg.DEFAULT_FRACTIONS, "mimic")
  by_subject = {}
  for enc in records.values():
    by_subject.setdefault(enc.patient_id, set()).add(enc.split)
  assert all(len(splits) == 1 for splits in by_subject.values())


def test_a_wider_window_links_the_next_day_ecg_to_the_other_study(sources, tmp_path):
  summary = mimic.convert(str(sources[0]), str(sources[1]), str(tmp_path), OPTIONS, window_hours=30.0)
  linking = summary.info["linking"]
  # The 2180-07-24 ECG is 25.4 h from the first study: a candidate, but that study keeps its 14-minute ECG.
  assert linking["candidate_pairs"] == 2 and linking["linked_pairs"] == 1
  assert linking["cxr_with_several_candidates"] == 1 and linking["ecg_candidates_lost"] == 1


def test_different_admissions_prevent_a_link(sources, tmp_path):
  admissions = tmp_path / "admissions.csv.gz"
  with gzip.open(admissions, "wt") as f:
    f.write("subject_id,hadm_id,admittime,dischtime,deathtime,admission_type\n"
            "10000032,22595853,2180-07-20 10:00:00,2180-07-23 08:35:00,,URGENT\n"
            "10000032,22841357,2180-07-23 08:40:00,2180-07-25 18:00:00,,EW EMER.\n")
  summary = mimic.convert(str(sources[0]), str(sources[1]), str(tmp_path / "out"), OPTIONS,
                          admissions=str(admissions))
  assert summary.info["linking"]["linked_pairs"] == 0
  records = L.read_converted(tmp_path / "out")
  assert "cxr-s50414267" in records and "ecg-s40689238" in records
  assert np.all([not r.linked for r in records.values()])
