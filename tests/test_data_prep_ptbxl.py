"""data_prep/ptbxl.py on a miniature PTB-XL tree written from real PTB-XL records (ecg_id 6000-6002)."""

import ast
import csv
import json

import numpy as np
import pytest
import wfdb

import real_layouts as L
from data_prep import cli, ptbxl
from medbind_jax.data import pipeline, preprocess, schema

OPTIONS = cli.Options(shard_size=2, workers=1, progress=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  src, out = tmp_path_factory.mktemp("ptbxl_src"), tmp_path_factory.mktemp("ptbxl_out")
  rows = L.build_ptbxl(src)
  summary = ptbxl.convert(str(src), str(out), OPTIONS)
  return src, out, rows, summary, L.read_converted(out)


def _superclasses(src, scp_codes: str) -> set[str]:
  """Independent reading of scp_statements.csv: diagnostic codes -> diagnostic_class."""
  with open(src / "scp_statements.csv", newline="") as f:
    table = {row[""]: row for row in csv.DictReader(f)}
  return {table[code]["diagnostic_class"] for code in ast.literal_eval(scp_codes)
          if code in table and table[code]["diagnostic"] == "1.0"}


def test_every_record_is_converted_into_its_strat_fold_split(converted):
  _, out, _, summary, records = converted
  assert summary.exit_code == 0 and not summary.errors
  assert {k: v.split for k, v in records.items()} == {"06000": "test", "06001": "train", "06002": "train"}
  info = json.loads((out / "dataset_info.json").read_text())
  assert {s: v["num_examples"] for s, v in info["splits"].items()} == {"train": 2, "val": 0, "test": 1}
  assert info["ecg_label_names"] == ["NORM", "MI", "STTC", "CD", "HYP"]
  assert info["licence"] == "CC BY 4.0" and "Wagner" in info["citation"] and "PTB-XL" in info["source"]
  assert info["schema_version"] == schema.SCHEMA_VERSION and info["name"] == "ptbxl"
  assert "<= 0.5 / gain mV" in info["ecg_storage"]  # the stated precision the waveform tests check
  assert info["errors"]["num_errors"] == 0


def test_waveforms_match_wfdb_and_keep_the_source_adc_values(converted):
  src, _, rows, _, records = converted
  for ecg_id, row in rows.items():
    enc = records[f"{ecg_id:05d}"]
    expected = L.expected_ecg_mv(src / row["filename_hr"])
    L.assert_ecg_matches(enc, expected)
    assert enc.part("ecg").data.sampling_rate == 500.0 and enc.part("ecg").data.samples.shape == (5000, 12)
    # Lossless: rounding back at the source gain (1000/mV) gives wfdb's digital samples exactly.
    digital = wfdb.rdrecord(str(src / row["filename_hr"]), physical=False).d_signal
    position = {n.lower(): i for i, n in enumerate(L.PTBXL_LEADS)}
    digital = digital[:, [position[n.lower()] for n in L.CANONICAL_LEADS]]
    stored = enc.part("ecg").data.samples.astype(np.float64) / np.asarray(enc.part("ecg").data.gain, np.float64)
    np.testing.assert_array_equal(np.rint(stored * 1000.0), digital)


def test_reports_are_verbatim_and_labels_follow_scp_statements(converted):
  src, _, rows, _, records = converted
  for ecg_id, row in rows.items():
    enc = records[f"{ecg_id:05d}"]
    assert enc.part("ecg").report == row["report"]
    expected = _superclasses(src, row["scp_codes"])
    assert [name for name, v in zip(ptbxl.SPEC.label_names["ecg"], enc.part("ecg").labels) if v == 1.0] == \
        [name for name in ptbxl.SPEC.label_names["ecg"] if name in expected]
    assert enc.patient_id == str(int(float(row["patient_id"])))
  # The fixture covers a German report, an STTC-only and a NORM+CD record.
  assert records["06001"].part("ecg").report.startswith("sinusrhythmus")
  assert list(records["06001"].part("ecg").labels) == [0, 0, 1, 0, 0]
  assert list(records["06002"].part("ecg").labels) == [1, 0, 0, 1, 0]
  assert records["06000"].part("ecg").time == pytest.approx(671636820.0)  # 1991-04-14 13:47 UTC


def test_resampling_and_cropping_match_scipy_on_wfdb_signal(converted, tmp_path):
  src, _, rows, _, _ = converted
  options = cli.Options(shard_size=10, workers=1, progress=False, sampling_rate=100.0, num_samples=800)
  assert ptbxl.convert(str(src), str(tmp_path), options).exit_code == 0
  records = L.read_converted(tmp_path)
  for ecg_id, row in rows.items():
    enc = records[f"{ecg_id:05d}"]
    assert enc.part("ecg").data.sampling_rate == 100.0
    L.assert_ecg_matches(enc, L.expected_ecg_mv(src / row["filename_hr"], 100.0, 800))


def test_eval_batches_give_the_labels_and_model_inputs_of_the_source(converted):
  src, out, rows, _, _ = converted
  index = pipeline.index_split(str(out), "train", progress=False)
  ecg_spec = preprocess.EcgSpec(sampling_rate=500.0, num_samples=5000)
  batches = list(pipeline.eval_batches(index, "ecg", 4, ecg_spec))
  assert len(batches) == 1 and batches[0]["valid"].tolist() == [True, True, False, False]
  for row, i in enumerate(batches[0]["index"][:2]):
    source = rows[int(index.records[i].encounter_id)]
    expected = _superclasses(src, source["scp_codes"])
    np.testing.assert_array_equal(batches[0]["labels"][row],
                                  [float(name in expected) for name in ptbxl.SPEC.label_names["ecg"]])
    # The model input is wfdb's reading (x scale_mv = 1), up to the stored precision.
    np.testing.assert_allclose(batches[0]["inputs"][row], L.expected_ecg_mv(src / source["filename_hr"]), atol=1e-3)
