"""data_prep/chexpert5x200.py on a miniature CheXpert-v1.0-small tree (train.csv with the release's columns, JPEGs
re-encoded from real NIH ChestX-ray14 / TBX11K images)."""

import hashlib
import json

import pytest

import real_layouts as L
from data_prep import chexpert5x200, cli


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root, out = tmp_path_factory.mktemp("chexpert_src"), tmp_path_factory.mktemp("chexpert_out")
  release = L.build_chexpert(root)
  summary = chexpert5x200.convert(release, str(out), cli.Options(shard_size=4, workers=1, progress=False),
                                  per_class=2, seed=0)
  return root, out, summary, L.read_converted(out)


def _expected_selection(per_class: int, seed: int) -> dict[str, str]:
  """Path -> class by the documented rule, computed from the label rows independently of the converter."""
  chosen = {}
  for name in L.FIVE:
    eligible = [r["Path"] for r in L.chexpert_rows()
                if r["Frontal/Lateral"] == "Frontal" and r.get(name) == "1.0"
                and all(r.get(o, "") in ("", "0.0") for o in L.FIVE if o != name)]
    eligible.sort(key=lambda p: hashlib.sha256(f"chexpert5x200/{seed}/{p}".encode()).hexdigest())
    chosen.update({p: name for p in eligible[:per_class]})
  return chosen


def test_selection_follows_the_documented_rule(converted):
  _, out, summary, records = converted
  assert summary.exit_code == 0 and not summary.errors
  expected = _expected_selection(2, 0)
  assert len(expected) == 10
  assert {k: v.part("cxr").report for k, v in records.items()} == expected
  assert all(enc.split == "test" for enc in records.values())
  info = json.loads((out / "dataset_info.json").read_text())
  assert info["selection"] == {name: {"eligible": 3, "selected": 2} for name in L.FIVE}
  assert info["splits"]["test"]["num_examples"] == 10 and info["splits"]["train"]["num_examples"] == 0


def test_labels_one_hot_and_images_verbatim(converted):
  root, _, _, records = converted
  for path, enc in records.items():
    assert list(enc.part("cxr").labels) == [float(name == enc.part("cxr").report) for name in chexpert5x200.CLASSES]
    assert enc.part("cxr").data == (root / path).read_bytes()
    assert enc.patient_id == path.split("/")[2]


def test_another_seed_selects_differently_but_deterministically(converted, tmp_path):
  root, _, _, records = converted
  release = str(root / "CheXpert-v1.0-small")
  options = cli.Options(workers=1, progress=False)
  chexpert5x200.convert(release, str(tmp_path / "a"), options, per_class=2, seed=1)
  chexpert5x200.convert(release, str(tmp_path / "b"), options, per_class=2, seed=1)
  a, b = L.read_converted(tmp_path / "a"), L.read_converted(tmp_path / "b")
  assert {k: v.part("cxr").report for k, v in a.items()} == _expected_selection(2, 1) == {k: v.part("cxr").report
                                                                                  for k, v in b.items()}
  assert set(a) != set(records)
