"""Small hand-built datasets in the project's record schema, for tests that need exact control of the bytes."""

import io
import os

import numpy as np
from PIL import Image

from medbind_jax.data import schema, tfrecord


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
        cxr_image=_png(rng), cxr_report=f"cxr report {i % 3}", cxr_labels=[float(i % 2)],
        ecg_samples=rng.integers(-500, 500, (200, 12)).astype(np.int16), ecg_gain=[1000.0] * 12,
        ecg_sampling_rate=100.0, ecg_report=f"ecg report {i % 2}", ecg_labels=[1.0]) for i in range(num_records)]
    first = first or encs
    shards[split] = []
    for s in range(num_shards):
      stats = schema.ShardStats(schema.shard_name(split, s, num_shards))
      with tfrecord.TFRecordWriter(os.path.join(out_dir, stats.file)) as writer:
        for enc in encs[s::num_shards]:
          writer.write(schema.encode_encounter(enc))
          stats.add(enc)
      shards[split].append(stats)
  schema.write_dataset_info(out_dir, name="tiny", shards=shards, cxr_label_names=["a"], ecg_label_names=["b"])
  return first
