"""Shard indexes (medbind_jax/data/shard_index.py): written with the shards, used by `pipeline.index_split` instead of
reading the records, equal to what reading gives, checked against damage and stale shards, and added to datasets
converted before they existed (on first use, or with `python -m data_prep.add_index`)."""

import builtins
import dataclasses
import errno
import io
import json
import logging
import os

import numpy as np
from PIL import Image
import pytest

from data_prep import add_index, cli, runner
from data_prep import synthetic_world as sw
from medbind_jax.data import codecs, pipeline, schema, shard_index, tfrecord
from tiny_data import flip_byte, write_tiny_dataset


def _reference_records(data_dir: str, split: str, only: str | None = None) -> list[pipeline.RecordMeta]:
  """The split's RecordMetas (of shard path `only`) as index_split built them before indexes existed: every record
  read and decoded."""
  info = schema.read_dataset_info(data_dir)
  records = []
  for shard in info["splits"][split]["shards"]:
    if only and os.path.join(data_dir, shard["file"]) != only:
      continue
    for ref, data in tfrecord.iter_records(os.path.join(data_dir, shard["file"])):
      enc = schema.decode_encounter(data)
      records.append(pipeline.RecordMeta(ref, enc.encounter_id, enc.patient_id, enc.linked, tuple(sorted(enc.parts)),
                                         {m: part.report for m, part in enc.parts.items()}))
  return records


def _shards(data_dir: str, split: str = "train") -> list[str]:
  return [os.path.join(data_dir, s["file"]) for s in schema.read_dataset_info(data_dir)["splits"][split]["shards"]]


def _index_files(data_dir) -> list[str]:
  return sorted(f for f in os.listdir(data_dir) if ".index-" in f)


@pytest.fixture()
def opened(monkeypatch):
  """The paths passed to open() from here on."""
  paths = []
  real_open = builtins.open

  def spy(file, *args, **kwargs):
    paths.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else file)
    return real_open(file, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", spy)
  return paths


def _old_dataset(tmp_path, **kwargs) -> str:
  """A dataset as converted before indexes existed (tiny_data writes plain TFRecord shards)."""
  data_dir = str(tmp_path / "data")
  os.makedirs(data_dir)
  write_tiny_dataset(data_dir, **kwargs)
  return data_dir


# ---------------------------------------------------------------------------------------------------------------------
# Written with the shards
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Task:
  record_id: str
  split: str


def _png(seed: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _convert(task: _Task, options) -> schema.Encounter:
  """Records of every kind: linked, CXR only, ECG only; non-ASCII and empty reports."""
  del options
  i = int(task.record_id)
  ecg = schema.Part(codecs.EcgData(np.full((20, 12), i, np.int16), [1000.0] * 12, sampling_rate=100.0),
                    report=f"Sinusrhythmus {i % 3} – normal", labels=[1.0])
  cxr = schema.Part(_png(i), report="" if i == 4 else f"no acute findings {i}", labels=[0.0])
  parts = [{"cxr": cxr, "ecg": ecg}, {"cxr": cxr}, {"ecg": ecg}][i % 3]
  return schema.Encounter(f"e{i}", f"p{i // 2}", task.split, "toy", linked=len(parts) == 2, parts=parts)


SPEC = runner.DatasetSpec(name="toy", version="1", source="tests", licence="CC0", citation="",
                          label_names={"cxr": ("a",), "ecg": ("b",)})


def test_converters_and_the_synthetic_world_write_an_index_per_shard_equal_to_reading(tmp_path, opened):
  out = str(tmp_path / "converted")
  tasks = [_Task(f"{i:02d}", "test" if i % 5 == 0 else "train") for i in range(14)]
  runner.run_conversion(SPEC, tasks, _convert, out, cli.Options(shard_size=4, workers=1, progress=False))
  world = str(tmp_path / "world")
  sw.generate_world(world, sw.WorldParams(num_patients=6, num_shards=(2, 1, 1), image_size=32, ecg_sampling_rate=100,
                                          ecg_seconds=2.0), workers=1, progress=False)
  for data_dir in (out, world):
    info = schema.read_dataset_info(data_dir)
    for split, split_info in info["splits"].items():
      if not split_info["shards"]:
        continue
      for shard in split_info["shards"]:  # named in dataset_info.json, beside the shard, matching it
        assert shard["index"] == shard_index.index_name(shard["file"]) and ".tfrecord-" not in shard["index"]
        index = shard_index.read_index(os.path.join(data_dir, shard["index"]))
        assert index.num_records == shard["num_examples"]
        assert (index.shard_bytes, index.shard_crc32c) == (
            os.path.getsize(os.path.join(data_dir, shard["file"])),
            shard_index.file_crc32c(os.path.join(data_dir, shard["file"])))
      opened.clear()
      got = pipeline.index_split(data_dir, split, progress=False)
      assert not set(opened) & set(_shards(data_dir, split)), "index_split opened a shard despite its index"
      assert got.records == _reference_records(data_dir, split) and not got.skipped and not got.num_missing
  converted = pipeline.index_split(out, "train", progress=False).records
  assert {r.modalities for r in converted} == {("cxr", "ecg"), ("cxr",), ("ecg",)}
  assert any(r.reports.get("cxr") == "" for r in converted)
  assert any("–" in r.reports.get("ecg", "") for r in converted)


def test_a_resumed_conversion_indexes_a_kept_shard_that_has_none(tmp_path):
  out = str(tmp_path / "out")
  tasks = [_Task(f"{i:02d}", "train") for i in range(6)]
  options = cli.Options(shard_size=3, workers=1, progress=False)
  runner.run_conversion(SPEC, tasks, _convert, out, options)
  expected = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
  os.remove(os.path.join(out, "train.index-00000-of-00002"))  # as if converted before indexes existed
  summary = runner.run_conversion(SPEC, tasks, _convert, out, options)
  assert summary.shards_reused == ["train.tfrecord-00000-of-00002", "train.tfrecord-00001-of-00002"]
  assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == expected


# ---------------------------------------------------------------------------------------------------------------------
# Datasets converted before indexes existed
# ---------------------------------------------------------------------------------------------------------------------


def test_an_old_dataset_is_indexed_on_first_use_and_the_second_start_reads_no_shard(tmp_path, opened, caplog):
  data_dir = _old_dataset(tmp_path, num_records=9, num_shards=3, splits=("train", "test"))
  want = _reference_records(data_dir, "train")
  assert not _index_files(data_dir)
  with caplog.at_level(logging.INFO):
    first = pipeline.index_split(data_dir, "train", progress=False)
  assert first.records == want
  assert _index_files(data_dir) == [f"train.index-0000{i}-of-00003" for i in range(3)]
  info = schema.read_dataset_info(data_dir)
  assert [s["index"] for s in info["splits"]["train"]["shards"]] == _index_files(data_dir)
  assert "index" not in info["splits"]["test"]["shards"][0]  # only the split that was read
  assert any("wrote their indexes" in r.getMessage() for r in caplog.records)
  opened.clear()
  second = pipeline.index_split(data_dir, "train", progress=False)
  assert second.records == want and not set(opened) & set(_shards(data_dir))
  assert sorted(os.path.basename(p) for p in opened if ".index-" in str(p)) == _index_files(data_dir)
  # The shards are opened when records are read, as before.
  reader = pipeline.ExampleReader(second, {"cxr": None})
  assert reader.encounter(4).encounter_id == want[4].encounter_id


def test_a_read_only_data_dir_falls_back_to_reading_and_names_the_command(tmp_path, monkeypatch, caplog):
  data_dir = _old_dataset(tmp_path)
  info_before = open(os.path.join(data_dir, schema.DATASET_INFO), "rb").read()

  def read_only(path, index):  # what writing gives in a read-only directory (root passes chmod, so simulated)
    raise PermissionError(errno.EACCES, "Permission denied", f"{path}.tmp")

  monkeypatch.setattr(shard_index, "write_index", read_only)
  with caplog.at_level(logging.WARNING):
    got = pipeline.index_split(data_dir, "train", progress=False)
  assert got.records == _reference_records(data_dir, "train")
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(f"python -m data_prep.add_index {data_dir}" in w and "Permission denied" in w for w in warnings)
  assert not _index_files(data_dir) and open(os.path.join(data_dir, schema.DATASET_INFO), "rb").read() == info_before


def test_the_add_index_command_indexes_verifies_and_reports(tmp_path, opened, capsys):
  data_dir = _old_dataset(tmp_path, num_records=6, num_shards=2, splits=("train", "test"))
  assert add_index.main([data_dir, "--no-progress"]) == 0
  assert "4 index(es) written, 0 kept, 0 shard(s) failed" in capsys.readouterr().out
  assert len(_index_files(data_dir)) == 4
  want = _reference_records(data_dir, "test")
  opened.clear()
  assert pipeline.index_split(data_dir, "test", progress=False).records == want
  assert not set(opened) & set(_shards(data_dir, "test"))
  assert add_index.main([data_dir, "--no-progress", "--split", "train"]) == 0
  assert "0 index(es) written, 2 kept" in capsys.readouterr().out

  # --verify reads the shards: a record damaged after indexing (same size) is reported with file and offset, and
  # the stale index removed, so that training reads the shard again under its skip_corrupt rules.
  shard = _shards(data_dir)[1]
  second = tfrecord.scan_tfrecord(shard).frames[1]
  flip_byte(shard, second.offset + 5)
  assert add_index.main([data_dir, "--no-progress", "--split", "train"]) == 0  # cheap checks pass: same size
  assert add_index.main([data_dir, "--no-progress", "--split", "train", "--verify"]) == 1
  err = capsys.readouterr().err
  assert f"corrupt TFRecord in {shard} at byte offset {second.frame_offset}" in err
  assert not os.path.exists(os.path.join(data_dir, shard_index.index_name(os.path.basename(shard))))
  with pytest.raises(tfrecord.CorruptRecordError, match="data CRC"):
    pipeline.index_split(data_dir, "train", progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Damage and stale indexes
# ---------------------------------------------------------------------------------------------------------------------


def test_a_damaged_index_is_detected_by_name_and_rebuilt(tmp_path, caplog):
  data_dir = _old_dataset(tmp_path)
  want = pipeline.index_split(data_dir, "train", progress=False).records
  index_path = os.path.join(data_dir, "train.index-00001-of-00002")
  good = open(index_path, "rb").read()
  for offset in (3, len(good) // 2, len(good) - 1):  # magic line, compressed body, checksum
    with open(index_path, "wb") as f:
      f.write(good)
    flip_byte(index_path, offset)
    with pytest.raises(shard_index.CorruptIndexError, match=f"damaged shard index {index_path}: CRC32C mismatch"):
      shard_index.read_index(index_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert pipeline.index_split(data_dir, "train", progress=False).records == want
    assert any(index_path in r.getMessage() and "re-indexing" in r.getMessage() for r in caplog.records)
    assert open(index_path, "rb").read() == good  # rebuilt, identically
  with open(index_path, "wb") as f:
    f.write(good[:40])  # truncated
  with pytest.raises(shard_index.CorruptIndexError, match="truncated"):
    shard_index.read_index(index_path)


def test_the_index_of_a_replaced_shard_is_rebuilt(tmp_path, caplog):
  data_dir = _old_dataset(tmp_path)
  pipeline.index_split(data_dir, "train", progress=False)
  shard = _shards(data_dir)[0]
  encs = [schema.decode_encounter(data) for _, data in tfrecord.iter_records(shard)]
  for enc in encs:
    enc.parts["cxr"].report += " (amended)"
  tfrecord.write_tfrecord(shard, map(schema.encode_encounter, encs))  # same records, longer reports
  with caplog.at_level(logging.WARNING):
    got = pipeline.index_split(data_dir, "train", progress=False)
  assert any("does not match" in r.getMessage() and "was replaced" in r.getMessage() for r in caplog.records)
  assert got.records == _reference_records(data_dir, "train")
  assert sum(r.reports["cxr"].endswith("(amended)") for r in got.records) == len(encs)


def test_a_same_size_replacement_or_damage_is_caught_on_read_or_by_verify(tmp_path):
  data_dir = _old_dataset(tmp_path, num_records=8, num_shards=2)
  pipeline.index_split(data_dir, "train", progress=False)
  shard = _shards(data_dir)[0]
  frames = tfrecord.scan_tfrecord(shard).frames
  flip_byte(shard, frames[2].offset + 9)  # inside the third record's data, after indexing
  index = pipeline.index_split(data_dir, "train", progress=False)  # indexed: no record read, so not found here
  reader = pipeline.ExampleReader(index, {"cxr": None})
  reader.encounter(0)
  with pytest.raises(tfrecord.CorruptRecordError) as err:
    reader.encounter(2)
  assert (err.value.path, err.value.offset) == (shard, frames[2].frame_offset) and "data CRC" in str(err.value)
  with pytest.raises(tfrecord.CorruptRecordError, match=f"{shard} at byte offset {frames[2].frame_offset}"):
    pipeline.index_split(data_dir, "train", progress=False, verify=True)
  skipping = pipeline.index_split(data_dir, "train", progress=False, verify=True, skip_corrupt=True)
  assert [(p, o) for p, o, _ in skipping.skipped] == [(shard, frames[2].frame_offset)]
  assert skipping.num_missing == 1 and len(skipping.records) == 7
  # The stale index went with it: a later start reads that shard and applies the same rules.
  assert not os.path.exists(os.path.join(data_dir, shard_index.index_name(os.path.basename(shard))))
  with pytest.raises(tfrecord.CorruptRecordError, match="data CRC"):
    pipeline.index_split(data_dir, "train", progress=False)

  # Replaced by a shard of the same size: one report a byte longer, another a byte shorter, so the frames between
  # them move. The size check passes; reading a moved record does not.
  other = _shards(data_dir)[1]
  stale = [r.ref for r in pipeline.index_split(data_dir, "train", progress=False, skip_corrupt=True).records
           if r.ref.path == other]
  encs = [schema.decode_encounter(data) for _, data in tfrecord.iter_records(other)]
  size = os.path.getsize(other)
  encs[0].parts["cxr"].report += "!"
  encs[-1].parts["cxr"].report = encs[-1].parts["cxr"].report[:-1]
  tfrecord.write_tfrecord(other, map(schema.encode_encounter, encs))
  assert os.path.getsize(other) == size
  with pytest.raises(tfrecord.CorruptRecordError, match=f"{other} at byte offset {stale[1].frame_offset}"):
    tfrecord.RecordReader().read(stale[1])
  # Records of equal length swapped: every frame lines up with the index, so only verify=True catches it.
  pipeline.index_split(data_dir, "train", progress=False, skip_corrupt=True, verify=True)  # re-indexes `other`
  lined_up = [r.ref for r in pipeline.index_split(data_dir, "train", progress=False, skip_corrupt=True).records
              if r.ref.path == other]
  records = [data for _, data in tfrecord.iter_records(other)]
  assert len(records[1]) == len(records[2])
  tfrecord.write_tfrecord(other, [records[0], records[2], records[1], records[3]])
  assert tfrecord.RecordReader().read(lined_up[1]) == records[2]  # another record, read without complaint
  verified = pipeline.index_split(data_dir, "train", progress=False, skip_corrupt=True, verify=True)
  assert [r for r in verified.records if r.ref.path == other] == _reference_records(data_dir, "train", other)


def test_an_index_made_without_a_codec_of_the_dataset_is_rebuilt(tmp_path, caplog):
  data_dir = _old_dataset(tmp_path)
  want = pipeline.index_split(data_dir, "train", progress=False).records
  path = os.path.join(data_dir, "train.index-00000-of-00002")
  index = shard_index.read_index(path)
  del index.reports["ecg"]  # as a process without the ECG codec would have made it
  shard_index.write_index(path, dataclasses.replace(index, codecs=("cxr",)))
  with caplog.at_level(logging.WARNING):
    assert pipeline.index_split(data_dir, "train", progress=False).records == want
  assert any("made without the ecg codec" in r.getMessage() for r in caplog.records)
  # Rebuilt with the codecs of the dataset's modalities only: codecs other tests register (e.g. a fourth modality)
  # do not enter the index, so its bytes do not depend on what the process imported.
  assert shard_index.read_index(path).codecs == ("cxr", "ecg")


def test_index_file_format(tmp_path):
  data_dir = _old_dataset(tmp_path)
  pipeline.index_split(data_dir, "train", progress=False)
  data = open(os.path.join(data_dir, "train.index-00000-of-00002"), "rb").read()
  magic, header, _ = data.split(b"\n", 2)
  assert magic == b"MEDBIND-SHARD-INDEX 1"
  header = json.loads(header)
  assert header["shard"] == "train.tfrecord-00000-of-00002" and header["num_records"] == 3
  assert set(header) == {"shard", "shard_bytes", "shard_crc32c", "num_records", "codecs"}
  assert shard_index.index_name("x.tfrecord") == "x.tfrecord.index"
