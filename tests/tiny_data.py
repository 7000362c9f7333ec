"""Small hand-built datasets in the project's record schema, for tests that need exact control of the bytes."""

import io
import os

import numpy as np
from PIL import Image

from medbind_jax.data import codecs, schema, tfrecord


def _png(rng, size=16) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def write_tiny_dataset(out_dir, num_records=6, num_shards=2, seed=0, splits=("train",)) -> list[schema.Encounter]:
  """Linked encounters with random 16x16 images and 2 s of 100 Hz ECG, `num_records` per split in
  `num_shards` shards each, and dataset_info.json. Returns the encounters of the first split."""
  rng = np.random.default_rng(seed)
  shards, first = {}, None
  for split in splits:
    encs = [schema.Encounter(
        encounter_id=f"{split}{i}", patient_id=f"{split}p{i}", split=split, dataset="tiny", linked=True,
        parts={"cxr": schema.Part(_png(rng), report=f"cxr report {i % 3}", labels=[float(i % 2)]),
               "ecg": schema.Part(codecs.EcgData(samples=rng.integers(-500, 500, (200, 12)).astype(np.int16),
                                                 gain=[1000.0] * 12, sampling_rate=100.0),
                                  report=f"ecg report {i % 2}", labels=[1.0])}) for i in range(num_records)]
    first = first or encs
    shards[split] = []
    for s in range(num_shards):
      stats = schema.ShardStats(schema.shard_name(split, s, num_shards))
      with tfrecord.TFRecordWriter(os.path.join(out_dir, stats.file)) as writer:
        for enc in encs[s::num_shards]:
          writer.write(schema.encode_encounter(enc))
          stats.add(enc)
      shards[split].append(stats)
  schema.write_dataset_info(out_dir, name="tiny", shards=shards, label_names={"cxr": ["a"], "ecg": ["b"]})
  return first


def flip_byte(path, offset):
  """Damages one byte of a file in place (flips bit 6), as a storage fault would."""
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0x40]))
