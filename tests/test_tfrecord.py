"""TFRecord framing: CRCs are checked, damage raises an error naming file and offset, skip mode counts it."""

import os

import numpy as np
import pytest

from tiny_data import write_tiny_dataset
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


def _shard_path(tmp_path, index=0):
  return os.path.join(tmp_path, schema.shard_name("train", index, 2))


def _flip_byte(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0x40]))


def test_flipped_byte_raises_with_file_and_offset(tmp_path):
  write_tiny_dataset(tmp_path)
  path = _shard_path(tmp_path)
  refs = tfrecord.scan_tfrecord(path).frames
  _flip_byte(path, refs[1].offset + 20)  # inside the second record's data
  with pytest.raises(tfrecord.CorruptRecordError) as err:
    pipeline.index_split(str(tmp_path), "train", progress=False)
  assert err.value.path == path and err.value.offset == refs[1].frame_offset
  assert path in str(err.value) and f"byte offset {refs[1].frame_offset}" in str(err.value)
  assert "data CRC" in str(err.value)


def test_flipped_byte_detected_on_read_after_indexing(tmp_path):
  write_tiny_dataset(tmp_path)
  index = pipeline.index_split(str(tmp_path), "train", progress=False)
  ref = index.records[0].ref
  _flip_byte(ref.path, ref.offset + 3)
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
  _flip_byte(path, second.frame_offset + 2)  # inside the length field
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
  _flip_byte(flipped, refs[0].offset + 10)
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
