"""TFRecord framing: CRCs are checked, damage raises an error naming file and offset, skip mode counts it."""

import importlib.util
import os

import numpy as np
import pytest

from tiny_data import flip_byte, write_tiny_dataset
from medbind_jax.data import pipeline, schema, tfrecord


def test_roundtrip_and_random_access(tmp_path):
  encs = write_tiny_dataset(tmp_path)
  index = pipeline.index_split(str(tmp_path), "train", progress=False)
  assert sorted(r.encounter_id for r in index.records) == sorted(e.encounter_id for e in encs)
  reader = tfrecord.RecordReader()
  by_id = {e.encounter_id: e for e in encs}
  for meta in reversed(index.records):  # random order access
    got = schema.decode_encounter(reader.read(meta.ref))
    want = by_id[got.encounter_id]
    assert got.part("cxr").data == want.part("cxr").data and got.part("ecg").report == want.part("ecg").report
    np.testing.assert_array_equal(got.part("ecg").data.samples, want.part("ecg").data.samples)


def test_frame_matches_tensorflow_layout():
  # Known value: masked CRC32C of the 8-byte little-endian length 0, as every TFRecord reader computes it.
  data = b"hello"
  framed = tfrecord.frame(data)
  assert framed[:8] == (5).to_bytes(8, "little")
  assert framed[12:17] == data
  assert len(framed) == 8 + 4 + 5 + 4
  assert tfrecord.masked_crc(b"") == 0xA282EAD8  # crc32c("") == 0, rotated and offset by the mask delta


# Files written by TensorFlow's own TFRecordWriter (tests/fixtures/tfrecord/README.md); `make_fixture.py` there holds
# the record recipe, loaded here without TensorFlow.
_TF_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "tfrecord")
_spec = importlib.util.spec_from_file_location("tf_fixture_recipe", os.path.join(_TF_DIR, "make_fixture.py"))
TF_RECIPE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(TF_RECIPE)
with open(os.path.join(_TF_DIR, TF_RECIPE.EXAMPLE_FILE), "rb") as _f:
  TF_EXAMPLE = _f.read()
TF_FILES = TF_RECIPE.file_records(TF_EXAMPLE)  # file name -> its payloads, in order


@pytest.mark.parametrize("name", sorted(TF_FILES))
def test_reads_file_written_by_tensorflow(name):
  path = os.path.join(_TF_DIR, name)
  refs, payloads = zip(*tfrecord.iter_records(path))  # both CRCs of every frame checked
  assert [len(p) for p in payloads] == [len(p) for p in TF_FILES[name]]
  assert list(payloads) == TF_FILES[name]
  scan = tfrecord.scan_tfrecord(path)
  assert scan.frames == list(refs) and not scan.problems
  reader = tfrecord.RecordReader()
  assert [reader.read(ref) for ref in reversed(refs)] == TF_FILES[name][::-1]


@pytest.mark.parametrize("name", sorted(TF_FILES))
def test_writes_bytes_identical_to_tensorflow(name, tmp_path):
  with open(os.path.join(_TF_DIR, name), "rb") as f:
    want = f.read()
  out = os.path.join(tmp_path, name)
  assert tfrecord.write_tfrecord(out, TF_FILES[name]) == len(TF_FILES[name])
  with open(out, "rb") as f:
    assert f.read() == want
  # Frame by frame as well, so a mismatch points at a payload size rather than at the whole file.
  offset = 0
  for data in TF_FILES[name]:
    framed = tfrecord.frame(data)
    assert framed == want[offset:offset + len(framed)], f"frame of a {len(data)}-byte payload"
    offset += len(framed)


def test_tensorflow_example_parses_with_project_schema():
  data = TF_FILES[TF_RECIPE.DEFAULT_FILE][-1]
  feats = schema.parse_features(data)
  kinds = {"bytes_list": TF_RECIPE.EXAMPLE_BYTES, "float_list": TF_RECIPE.EXAMPLE_FLOATS,
           "int64_list": TF_RECIPE.EXAMPLE_INTS}
  assert sorted(feats) == sorted(key for values in kinds.values() for key in values)
  for kind, values in kinds.items():
    for key, want in values.items():
      assert feats[key].WhichOneof("kind") == kind, key
      np.testing.assert_array_equal(list(getattr(feats[key], kind).value), want, err_msg=key)
  enc = schema.decode_encounter(data)
  assert (enc.encounter_id, enc.patient_id, enc.split, enc.dataset, enc.linked) == (
      "tf-fixture-0", "p0", "train", "tf_fixture", False)
  ecg = enc.part("ecg")
  np.testing.assert_array_equal(ecg.data.samples, TF_RECIPE.EXAMPLE_SAMPLES)
  assert ecg.data.leads == TF_RECIPE.EXAMPLE_LEADS == schema.LEADS_12 and ecg.data.sampling_rate == 500.0
  assert ecg.report == TF_RECIPE.EXAMPLE_BYTES["ecg/report"][0].decode() and ecg.study_id == "s0"
  np.testing.assert_array_equal(ecg.labels, [1, 0, -1])
  assert ecg.time == 1.6e9 and sorted(enc.parts) == ["ecg"]
  np.testing.assert_array_equal(enc.extras["severity"], [0.25, 0.5])
  # And back: the project's encoder writes the same Example for the decoded encounter.
  assert schema.parse_features(schema.encode_encounter(enc)) == feats


def _shard_path(tmp_path, index=0):
  return os.path.join(tmp_path, schema.shard_name("train", index, 2))


def test_flipped_byte_raises_with_file_and_offset(tmp_path):
  write_tiny_dataset(tmp_path)
  path = _shard_path(tmp_path)
  refs = tfrecord.scan_tfrecord(path).frames
  flip_byte(path, refs[1].offset + 20)  # inside the second record's data
  with pytest.raises(tfrecord.CorruptRecordError) as err:
    pipeline.index_split(str(tmp_path), "train", progress=False)
  assert err.value.path == path and err.value.offset == refs[1].frame_offset
  assert path in str(err.value) and f"byte offset {refs[1].frame_offset}" in str(err.value)
  assert "data CRC" in str(err.value)


def test_flipped_byte_detected_on_read_after_indexing(tmp_path):
  write_tiny_dataset(tmp_path)
  index = pipeline.index_split(str(tmp_path), "train", progress=False)
  ref = index.records[0].ref
  flip_byte(ref.path, ref.offset + 3)
  with pytest.raises(tfrecord.CorruptRecordError, match="data CRC"):
    tfrecord.RecordReader().read(ref)


def test_truncated_mid_record_raises(tmp_path):
  write_tiny_dataset(tmp_path)
  path = _shard_path(tmp_path)
  last = tfrecord.scan_tfrecord(path).frames[-1]
  with open(path, "r+b") as f:
    f.truncate(last.offset + last.length // 2)
  with pytest.raises(tfrecord.CorruptRecordError) as err:
    pipeline.index_split(str(tmp_path), "train", progress=False)
  assert err.value.offset == last.frame_offset and "truncated" in str(err.value)


def test_damaged_header_raises(tmp_path):
  write_tiny_dataset(tmp_path)
  path = _shard_path(tmp_path)
  second = tfrecord.scan_tfrecord(path).frames[1]
  flip_byte(path, second.frame_offset + 2)  # inside the length field
  with pytest.raises(tfrecord.CorruptRecordError, match="length CRC"):
    pipeline.index_split(str(tmp_path), "train", progress=False)


def test_truncated_at_record_boundary_is_not_silent(tmp_path):
  """A shard cut exactly between records frames cleanly; the count in dataset_info.json catches it."""
  write_tiny_dataset(tmp_path)
  path = _shard_path(tmp_path)
  last = tfrecord.scan_tfrecord(path).frames[-1]
  with open(path, "r+b") as f:
    f.truncate(last.frame_offset)
  with pytest.raises(ValueError, match="lists 3 records but 2 could be read"):
    pipeline.index_split(str(tmp_path), "train", progress=False)


def test_skip_mode_counts_and_continues(tmp_path, caplog):
  write_tiny_dataset(tmp_path)
  flipped = _shard_path(tmp_path, 0)
  refs = tfrecord.scan_tfrecord(flipped).frames
  flip_byte(flipped, refs[0].offset + 10)
  truncated = _shard_path(tmp_path, 1)
  last = tfrecord.scan_tfrecord(truncated).frames[-1]
  with open(truncated, "r+b") as f:
    f.truncate(last.offset + 5)
  index = pipeline.index_split(str(tmp_path), "train", skip_corrupt=True, progress=False)
  assert len(index.records) == 4
  assert [(p, o) for p, o, _ in index.skipped] == [(flipped, refs[0].frame_offset), (truncated, last.frame_offset)]
  assert index.num_missing == 2
  assert sum("skipping corrupt TFRecord" in r.getMessage() for r in caplog.records) == 2


def test_writer_is_atomic(tmp_path):
  path = os.path.join(tmp_path, "x.tfrecord")
  with pytest.raises(RuntimeError):
    with tfrecord.TFRecordWriter(path) as w:
      w.write(b"abc")
      raise RuntimeError("interrupted")
  assert not os.path.exists(path) and not os.path.exists(path + ".tmp")
