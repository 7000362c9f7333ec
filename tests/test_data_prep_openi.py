"""data_prep/openi.py on miniature Open-i / IU X-ray trees in both published layouts (report XML + NLMCXR_png, and
the indiana_reports / indiana_projections CSV pair + images_normalized), with the real IU report texts."""

import io

from PIL import Image
import pytest

import real_layouts as L
from data_prep import cli, openi

OPTIONS = cli.Options(shard_size=4, workers=1, progress=False)


@pytest.fixture(scope="module")
def csv_converted(tmp_path_factory):
  src, out = tmp_path_factory.mktemp("openi_csv"), tmp_path_factory.mktemp("openi_csv_out")
  L.build_openi_csv(src, lateral_only=("4",))
  summary = openi.convert(str(src), str(out), OPTIONS)
  return src, summary, L.read_converted(out)


def test_csv_layout_reports_and_frontal_images(csv_converted):
  src, summary, records = csv_converted
  assert summary.exit_code == 0 and not summary.errors
  assert summary.info["excluded_reports"] == {"report without a selected image": 1}  # uid 4: lateral only
  assert "ecg_storage" not in summary.info  # no ECGs
  iu = L.iu_reports()
  assert sorted(records) == ["1", "2", "3", "5", "6"]
  for uid, enc in records.items():
    assert enc.part("cxr").report == L.expected_cxr_text(iu[uid]["findings"], iu[uid]["impression"])
    assert enc.part("cxr").data == (src / "images" / "images_normalized" / L.openi_frontal_name(uid)).read_bytes()
    assert enc.split == "test" and list(enc.part("cxr").labels) == []
  assert records["3"].part("cxr").report == " ".join(iu["3"]["impression"].split())  # no findings: impression only
  assert records["1"].part("cxr").report == (iu["1"]["findings"] + " " + iu["1"]["impression"])


def test_xml_layout_gives_the_same_texts(tmp_path, csv_converted):
  first_image = L.build_openi_xml(tmp_path / "src")
  summary = openi.convert(str(tmp_path / "src"), str(tmp_path / "out"), OPTIONS)
  assert summary.exit_code == 0 and summary.info["conversion_options"]["format"] == "xml"
  records = L.read_converted(tmp_path / "out")
  iu = L.iu_reports()
  assert sorted(records) == [f"CXR{u}" for u in sorted(L.OPENI_UIDS)]
  for uid in L.OPENI_UIDS:
    enc = records[f"CXR{uid}"]
    assert enc.part("cxr").report == L.expected_cxr_text(iu[uid]["findings"], iu[uid]["impression"])
    assert enc.part("cxr").data == (tmp_path / "src" / "NLMCXR_png" / f"{first_image[uid]}.png").read_bytes()


def test_large_images_are_downscaled_to_png(tmp_path):
  L.build_openi_csv(tmp_path / "src", uids=("1",))
  big = Image.open(io.BytesIO(L.fixture_image(L.CXR_IMAGES[0], "PNG"))).resize((300, 200))
  big.save(tmp_path / "src" / "images" / "images_normalized" / L.openi_frontal_name("1"))
  options = cli.Options(workers=1, progress=False, image_size=150)
  openi.convert(str(tmp_path / "src"), str(tmp_path / "out"), options)
  image = Image.open(io.BytesIO(L.read_converted(tmp_path / "out")["1"].part("cxr").data))
  assert image.format == "PNG" and image.size == (150, 100)
