"""data_prep/mimic_cxr.py on a miniature MIMIC-CXR-JPG tree: gzipped metadata/split/chexpert tables, JPEGs re-encoded
from real NIH ChestX-ray14 / TBX11K images, and real IU X-ray reports written as MIMIC-CXR report files."""

import gzip
import io
import json

import numpy as np
from PIL import Image
import pytest

import real_layouts as L
from data_prep import cli, mimic_cxr

OPTIONS = cli.Options(shard_size=2, workers=1, progress=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  src, reports, out = (tmp_path_factory.mktemp(n) for n in ("mimic_cxr_src", "mimic_cxr_reports", "mimic_cxr_out"))
  L.build_mimic_cxr(src, reports_root=reports)
  summary = mimic_cxr.convert(str(src), str(out), OPTIONS, reports=str(reports))
  return src, out, summary, L.read_converted(out), reports


def test_tables_are_gzipped_csv_with_the_release_columns(converted):
  src = converted[0]
  with gzip.open(src / "mimic-cxr-2.0.0-metadata.csv.gz", "rt") as f:
    assert f.readline().strip().split(",") == list(L.METADATA_COLUMNS)
  with gzip.open(src / "mimic-cxr-2.0.0-chexpert.csv.gz", "rt") as f:
    assert f.readline().strip().split(",")[:4] == ["subject_id", "study_id", "Atelectasis", "Cardiomegaly"]


def test_one_frontal_image_per_study_with_official_splits(converted):
  src, out, summary, records, _ = converted
  assert summary.exit_code == 0 and not summary.errors
  assert {k: v.split for k, v in records.items()} == {"s50414267": "train", "s53189527": "train",
                                                      "s54321000": "val"}
  chosen = {"s50414267": "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",  # PA, not the lateral
            "s53189527": "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab",  # the only (AP) image
            "s54321000": "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714"}  # PA preferred over AP
  for study in L.DEFAULT_CXR_STUDIES:
    enc = records[f"s{study.study_id}"]
    path = src / f"files/p{study.subject_id[:2]}/p{study.subject_id}/s{study.study_id}/{chosen[enc.encounter_id]}.jpg"
    assert enc.part("cxr").data == path.read_bytes()  # 128 px JPEG: kept byte for byte
    assert enc.patient_id == study.subject_id and not enc.has("ecg")
  info = json.loads((out / "dataset_info.json").read_text())
  assert info["excluded_images"] == {"image of a view not selected": 1, "other image of a chosen study": 1}
  assert info["cxr_label_names"] == list(mimic_cxr.CHEXPERT_LABELS)


def test_reports_are_findings_then_impression(converted):
  records = converted[3]
  iu = L.iu_reports()
  for study in L.DEFAULT_CXR_STUDIES:
    row = iu[study.report_uid]
    assert records[f"s{study.study_id}"].part("cxr").report == L.expected_cxr_text(row["findings"],
                                                                                    row["impression"])
  assert records["s50414267"].part("cxr").report.startswith("Borderline cardiomegaly. Midline sternotomy XXXX.")


def test_chexpert_labels_with_blank_as_unknown(converted):
  records = converted[3]
  names = list(mimic_cxr.CHEXPERT_LABELS)
  for study in L.DEFAULT_CXR_STUDIES:
    enc = records[f"s{study.study_id}"]
    cells = study.chexpert or {}
    expected = [float(cells[n]) if cells.get(n) else -1.0 for n in names]
    np.testing.assert_array_equal(enc.part("cxr").labels, expected)
    np.testing.assert_array_equal(enc.extras["cxr_label_mentioned"], [float(bool(cells.get(n))) for n in names])
  enc = records["s50414267"]
  assert enc.part("cxr").labels[names.index("Cardiomegaly")] == 1.0
  assert enc.part("cxr").labels[names.index("Lung Opacity")] == -1.0
  assert enc.part("cxr").labels[names.index("Pleural Effusion")] == 0.0


def test_study_time_handles_dropped_leading_zeros():
  assert mimic_cxr.study_time("21800801", "73512.5") - mimic_cxr.study_time("21800801", "0") == 7 * 3600 + 35 * 60 + 12.5
  assert np.isnan(mimic_cxr.study_time("21800801", ""))


def test_downscaling_re_encodes_as_png(converted, tmp_path):
  src, reports = converted[0], converted[4]
  options = cli.Options(shard_size=10, workers=1, progress=False, image_size=64)
  mimic_cxr.convert(str(src), str(tmp_path), options, reports=str(reports))
  records = L.read_converted(tmp_path)
  assert len(records) == 3
  for enc in records.values():
    image = Image.open(io.BytesIO(enc.part("cxr").data))
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "L"


def test_label_names_are_chexperts_own():
  names = (L.FIXTURES / "labels" / "chexpert14_labels.txt").read_text().split("\n")
  names = tuple(n.strip() for n in names if n.strip())
  assert mimic_cxr.CHEXPERT_LABELS == names  # CheXpert's published order
  assert sorted(L.CHEXPERT_COLUMNS) == sorted(names)  # the MIMIC table holds the same 14, alphabetically
