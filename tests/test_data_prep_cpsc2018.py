"""data_prep/cpsc2018.py on miniature CPSC2018 trees: REFERENCE.csv + WFDB .hea/.mat records (real CinC-2021
Georgia / Chapman ECGs renamed A0001-A0003, labelled from their real SNOMED diagnoses), and the same records in the
original release's form (a MATLAB struct ECG per .mat, no header)."""

import json

import numpy as np
import pytest

import real_layouts as L
from data_prep import cli, cpsc2018, tables


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  src, out = tmp_path_factory.mktemp("cpsc_src"), tmp_path_factory.mktemp("cpsc_out")
  L.build_cpsc2018(src)
  # Resample to 250 Hz and keep 8 s, so the test covers both.
  options = cli.Options(shard_size=2, workers=1, progress=False, sampling_rate=250.0, num_samples=2000)
  summary = cpsc2018.convert(str(src), str(out), options)
  return src, out, summary, L.read_converted(out)


def test_waveforms_match_wfdb_resampled_and_cropped(converted):
  src, _, summary, records = converted
  assert summary.exit_code == 0 and not summary.errors
  for name in L.CPSC_RECORDS:
    enc = records[name]
    assert enc.part("ecg").data.sampling_rate == 250.0 and enc.part("ecg").data.samples.shape == (2000, 12)
    L.assert_ecg_matches(enc, L.expected_ecg_mv(src / "TrainingSet1" / name, 250.0, 2000))


def test_labels_and_class_name_text(converted):
  _, out, _, records = converted
  for name, (_, classes) in L.CPSC_RECORDS.items():
    enc = records[name]
    np.testing.assert_array_equal(enc.part("ecg").labels, [float(c in classes) for c in range(1, 10)])
    assert enc.split == tables.hash_split(name, (0.7, 0.1, 0.2), "cpsc2018")
  assert records["A0001"].part("ecg").report == "Normal ECG."
  assert records["A0002"].part("ecg").report == "Right bundle branch block."
  assert records["A0003"].part("ecg").report == "Premature atrial contraction. Premature ventricular contraction."
  info = json.loads((out / "dataset_info.json").read_text())
  assert info["ecg_label_names"] == ["NORM", "AF", "I-AVB", "LBBB", "RBBB", "PAC", "PVC", "STD", "STE"]


def test_a_reference_row_without_a_record_is_logged(converted, tmp_path):
  src, _, _, _ = converted
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(src, tmp_path / "src")
  with open(tmp_path / "src" / "REFERENCE.csv", "a") as f:
    f.write("A0004,2,,\n")
  summary = cpsc2018.convert(str(tmp_path / "src"), str(tmp_path / "out"),
                             cli.Options(workers=1, progress=False, max_error_rate=0.5))
  assert [(e["record_id"], e["kind"]) for e in summary.errors] == [("A0004", "missing file")]
  assert summary.num_written == 3 and summary.exit_code == 0


def test_original_release_mat_files_give_the_same_waveforms(converted, tmp_path):
  src, out, _, wfdb_records = converted
  L.build_cpsc2018(tmp_path / "src", original=True)
  assert not list((tmp_path / "src").rglob("*.hea"))
  options = cli.Options(shard_size=2, workers=1, progress=False, sampling_rate=250.0, num_samples=2000)
  summary = cpsc2018.convert(str(tmp_path / "src"), str(tmp_path / "out"), options)
  assert summary.exit_code == 0 and not summary.errors
  assert summary.info["record_formats"] == ["mat"]
  records = L.read_converted(tmp_path / "out")
  assert sorted(records) == sorted(L.CPSC_RECORDS)
  for name, (source, classes) in L.CPSC_RECORDS.items():
    enc = records[name]
    # ECG.data rows are named by the release's documented order, then reordered by name like any record.
    L.assert_ecg_matches(enc, L.expected_ecg_mv(L.ECG_DIR / source, 250.0, 2000))
    np.testing.assert_array_equal(enc.part("ecg").labels, [float(c in classes) for c in range(1, 10)])
    assert enc.part("ecg").report == wfdb_records[name].part("ecg").report and enc.split == wfdb_records[name].split


def test_a_bad_original_mat_file_is_logged(tmp_path):
  L.build_cpsc2018(tmp_path / "src", original=True)
  from scipy import io as scipy_io  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "src" / "TrainingSet1"
  scipy_io.savemat(folder / "A0002.mat", {"ECG": {"sex": "Male", "age": 60.0, "data": np.ones((8, 3000))}})
  (folder / "A0003.mat").write_bytes((folder / "A0003.mat").read_bytes()[:5000])
  summary = cpsc2018.convert(str(tmp_path / "src"), str(tmp_path / "out"),
                             cli.Options(workers=1, progress=False, max_error_rate=0.5))
  assert [(e["record_id"], e["kind"]) for e in summary.errors] == [("A0002", "missing leads"),
                                                                   ("A0003", "unreadable signal")]
  assert "shape (8, 3000)" in summary.errors[0]["reason"] and "A0003.mat" in summary.errors[1]["reason"]
  assert summary.exit_code == 1 and summary.num_written == 1
