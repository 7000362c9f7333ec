"""Training batches: static shapes, linked rows, determinism by seed, process sharding, checkpointable state."""

import jax
import numpy as np
import pytest

from medbind_jax import losses
from medbind_jax.data import pipeline, preprocess
from medbind_jax.data.text import TableRows
from tiny_data import write_tiny_dataset

SPECS = {"cxr": preprocess.CxrSpec(image_size=16), "ecg": preprocess.EcgSpec(sampling_rate=50.0, num_samples=80)}
EDGES = (losses.Edge("cxr_text", ("cxr", "text")), losses.Edge("ecg_text", ("ecg", "text")),
         losses.Edge("cxr_ecg", ("cxr", "ecg"), "pair"))
LAYOUT = pipeline.Layout.from_edges(EDGES)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny")
  write_tiny_dataset(d, num_records=24, num_shards=3)
  return pipeline.index_split(str(d), "train", progress=False)


def _rows(index):
  texts = sorted({r.reports["cxr"] for r in index.records} | {r.reports["ecg"] for r in index.records})
  return TableRows({t: i for i, t in enumerate(texts)})


def _dataset(index, seed=0, process_index=0, process_count=1, n=8, m=4):
  spec = pipeline.BatchSpec(n, m, process_index, process_count)
  return pipeline.train_dataset(index, _rows(index), spec, LAYOUT, specs=SPECS, seed=seed)


def test_batch_layout(index):
  assert LAYOUT.modalities == ("cxr", "ecg") and LAYOUT.report_modalities == ("cxr", "ecg")
  assert dict(LAYOUT.pair_edges) == {"cxr_ecg": ("cxr", "ecg")}
  batch = _dataset(index)[0]
  assert batch["inputs"]["cxr"].shape == (8, 16, 16, 1) and batch["inputs"]["cxr"].dtype == np.float32
  assert batch["inputs"]["ecg"].shape == (8, 80, 12)
  assert batch["pair_mask"]["cxr_ecg"].tolist() == [True] * 4 + [False] * 4
  # Linked rows pair the CXR and ECG of one encounter.
  np.testing.assert_array_equal(batch["index"]["cxr"][:4], batch["index"]["ecg"][:4])
  for row in range(8):
    record = index.records[batch["index"]["cxr"][row]]
    np.testing.assert_array_equal(batch["text_key"]["cxr"][row], preprocess.text_key(record.reports["cxr"]))
  assert batch["reports"]["cxr"]["row"].shape == (8,)


def test_linked_rows_are_a_prefix_of_every_device_block(index):
  """Split over devices, each device's block starts with its linked rows (dealt round-robin), so pair edges can
  score a static prefix; the same records as the one-device layout, one encounter per linked row."""
  one = _dataset(index)[0]
  spec = pipeline.BatchSpec(8, 3, shards=2)  # 3 linked rows over 2 devices: prefixes of 2, one slot unlinked
  assert spec.linked_rows_per_shard == 2 and spec.linked_slots().tolist() == [0, 2, -1, -1, 1, -1, -1, -1]
  two = pipeline.train_dataset(index, _rows(index), spec, LAYOUT, specs=SPECS, seed=0)[0]
  assert two["pair_mask"]["cxr_ecg"].tolist() == [True, True, False, False, True, False, False, False]
  linked = two["pair_mask"]["cxr_ecg"]
  np.testing.assert_array_equal(two["index"]["cxr"][linked], two["index"]["ecg"][linked])
  assert all(index.records[i].linked for i in two["index"]["cxr"][linked])
  np.testing.assert_array_equal(two["index"]["cxr"][[0, 4, 1]], one["index"]["cxr"][:3])  # linked rows 0, 1, 2
  spec = pipeline.BatchSpec(8, 4, shards=2)
  assert pipeline.train_dataset(index, _rows(index), spec, LAYOUT, specs=SPECS, seed=0)[0]["pair_mask"][
      "cxr_ecg"].tolist() == [True, True, False, False] * 2
  with pytest.raises(ValueError, match="must divide by the 3 devices"):
    pipeline.BatchSpec(8, 2, shards=3)


def test_deterministic_by_seed(index):
  a, b, c = _dataset(index, seed=1), _dataset(index, seed=1), _dataset(index, seed=2)
  for step in range(3):
    np.testing.assert_array_equal(a[step]["inputs"]["cxr"], b[step]["inputs"]["cxr"])
    np.testing.assert_array_equal(a[step]["index"]["ecg"], b[step]["index"]["ecg"])
  assert any(not np.array_equal(a[s]["index"]["cxr"], c[s]["index"]["cxr"]) for s in range(3))


def test_epochs_cover_every_linked_record(index):
  ds = _dataset(index, n=8, m=4)
  seen = np.concatenate([ds[s]["index"]["cxr"][:4] for s in range(6)])  # 24 linked records, 4 per step
  assert sorted(seen.tolist()) == list(range(24))


def test_processes_split_the_global_batch(index):
  """Two processes of one device each read the two halves of the batch one process with two devices reads: the
  same records, inputs (augmentation included), reports and masks, row for row."""
  whole = pipeline.train_dataset(index, _rows(index), pipeline.BatchSpec(8, 3, shards=2), LAYOUT, specs=SPECS,
                                 seed=0)
  parts = [pipeline.train_dataset(index, _rows(index), pipeline.BatchSpec(8, 3, p, 2), LAYOUT, specs=SPECS, seed=0)
           for p in range(2)]
  for step in range(2):
    g, p0, p1 = whole[step], parts[0][step], parts[1][step]
    joined = jax.tree.map(lambda a, b: np.concatenate([a, b]), p0, p1)
    jax.tree.map(np.testing.assert_array_equal, joined, g)
    # 3 linked rows over 2 devices: rows 0 and 1 of the first block, row 0 of the second.
    assert g["pair_mask"]["cxr_ecg"].tolist() == [True, True, False, False, True, False, False, False]
    np.testing.assert_array_equal(g["index"]["cxr"][g["pair_mask"]["cxr_ecg"]],
                                  g["index"]["ecg"][g["pair_mask"]["cxr_ecg"]])


def test_iterator_state_restores_exact_order(index):
  ds = _dataset(index)
  it = pipeline.train_iterator(ds, num_threads=2, prefetch=2)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = pipeline.train_iterator(ds, num_threads=2, prefetch=2)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["index"]["cxr"], want["index"]["cxr"])
    np.testing.assert_array_equal(got["inputs"]["cxr"], want["inputs"]["cxr"])


def test_bad_batch_spec_is_explained():
  with pytest.raises(ValueError, match="divide by the 3 devices"):
    pipeline.BatchSpec(8, 4, 0, 3)
  with pytest.raises(ValueError, match="linked_per_batch"):
    pipeline.BatchSpec(8, 9)


def test_reads_schema_version_1_shards(tmp_path):
  """A dataset converted before modalities were keyed (tests/fixtures/v1, written by that code) still indexes,
  decodes and batches, without re-conversion."""
  import json
  import os
  import shutil
  # A copy: indexing a dataset without shard indexes writes them beside its shards (shard_index.py).
  data_dir = str(tmp_path / "dataset_v1")
  shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "v1", "dataset_v1"), data_dir)
  with open(os.path.join(data_dir, "dataset_info.json")) as f:
    assert json.load(f)["schema_version"] == 1
  index = pipeline.index_split(data_dir, "train", progress=False)
  assert index.info["modalities"] == ["cxr", "ecg"] and len(index.records) == 8
  assert all(r.linked and r.modalities == ("cxr", "ecg") for r in index.records)
  assert [r.reports["cxr"] for r in index.records[:3]] == ["cxr report 0", "cxr report 1", "cxr report 2"]
  batch = pipeline.train_dataset(index, _rows(index), pipeline.BatchSpec(4, 2), LAYOUT, specs=SPECS, seed=0)[0]
  assert batch["inputs"]["cxr"].shape == (4, 16, 16, 1) and batch["inputs"]["ecg"].shape == (4, 80, 12)
  assert np.all(np.isfinite(batch["inputs"]["ecg"])) and np.abs(batch["inputs"]["ecg"]).max() > 0


def test_a_modality_without_a_partner_draws_all_rows_from_its_pool(index):
  """Edges decide the layout: with only tmcl edges there are no linked rows, and each modality has its rows."""
  layout = pipeline.Layout.from_edges(EDGES[:1])  # cxr-text alone
  assert layout.modalities == ("cxr",) and not layout.pair_edges
  batch = pipeline.train_dataset(index, _rows(index), pipeline.BatchSpec(8, 0), layout, specs=SPECS, seed=0)[0]
  assert set(batch["inputs"]) == {"cxr"} and batch["pair_mask"] == {} and set(batch["reports"]) == {"cxr"}
  with pytest.raises(ValueError, match="no pair edge uses linked rows"):
    pipeline.train_dataset(index, _rows(index), pipeline.BatchSpec(8, 4), layout, specs=SPECS, seed=0)
