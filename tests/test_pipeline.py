"""Training batches: static shapes, linked rows, determinism by seed, process sharding, checkpointable state."""

import numpy as np
import pytest

from medbind_jax.data import pipeline, preprocess
from medbind_jax.data.text import TableRows
from tiny_data import write_tiny_dataset

CXR = preprocess.CxrSpec(image_size=16)
ECG = preprocess.EcgSpec(sampling_rate=50.0, num_samples=80)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny")
  write_tiny_dataset(d, num_records=24, num_shards=3)
  return pipeline.index_split(str(d), "train", progress=False)


def _rows(index):
  texts = sorted({r.cxr_report for r in index.records} | {r.ecg_report for r in index.records})
  return TableRows({t: i for i, t in enumerate(texts)})


def _dataset(index, seed=0, process_index=0, process_count=1, n=8, m=4):
  spec = pipeline.BatchSpec(n, m, process_index, process_count)
  return pipeline.train_dataset(index, _rows(index), spec, cxr=CXR, ecg=ECG, seed=seed)


def test_batch_layout(index):
  batch = _dataset(index)[0]
  assert batch["cxr"].shape == (8, 16, 16, 1) and batch["cxr"].dtype == np.float32
  assert batch["ecg"].shape == (8, 80, 12)
  assert batch["linked"].tolist() == [True] * 4 + [False] * 4
  # Linked rows pair the CXR and ECG of one encounter.
  np.testing.assert_array_equal(batch["cxr_index"][:4], batch["ecg_index"][:4])
  for row in range(8):
    record = index.records[batch["cxr_index"][row]]
    np.testing.assert_array_equal(batch["cxr_text_key"][row], preprocess.text_key(record.cxr_report))
  assert batch["cxr_text"]["row"].shape == (8,)


def test_deterministic_by_seed(index):
  a, b, c = _dataset(index, seed=1), _dataset(index, seed=1), _dataset(index, seed=2)
  for step in range(3):
    np.testing.assert_array_equal(a[step]["cxr"], b[step]["cxr"])
    np.testing.assert_array_equal(a[step]["ecg_index"], b[step]["ecg_index"])
  assert any(not np.array_equal(a[s]["cxr_index"], c[s]["cxr_index"]) for s in range(3))


def test_epochs_cover_every_linked_record(index):
  ds = _dataset(index, n=8, m=4)
  seen = np.concatenate([ds[s]["cxr_index"][:4] for s in range(6)])  # 24 linked records, 4 per step
  assert sorted(seen.tolist()) == list(range(24))


def test_processes_split_the_global_batch(index):
  whole = _dataset(index)
  parts = [_dataset(index, process_index=p, process_count=2) for p in range(2)]
  for step in range(2):
    g = whole[step]
    p0, p1 = parts[0][step], parts[1][step]
    # Linked rows of the global batch are the linked rows of process 0 then process 1, and likewise unlinked.
    np.testing.assert_array_equal(g["cxr_index"][:4], np.concatenate([p0["cxr_index"][:2], p1["cxr_index"][:2]]))
    np.testing.assert_array_equal(g["cxr_index"][4:], np.concatenate([p0["cxr_index"][2:], p1["cxr_index"][2:]]))


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
    np.testing.assert_array_equal(got["cxr_index"], want["cxr_index"])
    np.testing.assert_array_equal(got["cxr"], want["cxr"])


def test_bad_batch_spec_is_explained():
  with pytest.raises(ValueError, match="divide by the 3 processes"):
    pipeline.BatchSpec(8, 4, 0, 3)
  with pytest.raises(ValueError, match="linked_per_batch"):
    pipeline.BatchSpec(8, 9)
