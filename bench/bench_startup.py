"""Start-up time to the first training batch without and with shard indexes (medbind_jax/data/shard_index.py).

  python -m bench.bench_startup                                    # 50,000 records: 20 shards of 2,500, 2 of 25,000
  python -m bench.bench_startup --records 100000 --shard-sizes 5000,50000 --payload-kb 32 --data-dir /tmp/su

Writes (into a temporary folder, or --data-dir) one dataset per shard size, of the same records: linked CXR+ECG
encounters and some single-modality ones, with tiny payloads by default (an 8x8 PNG, 0.5 s of 12-lead ECG at 100 Hz,
about 1.5 KB a record; `--payload-kb` pads the CXR image up to that size) and a few hundred distinct report texts,
through the project's writer (`shard_index.ShardWriter`, as the converters do). Then times, for each:

  read     no index files, nothing written (`index_split(write_indexes=False)`): every start before indexes existed
  first    no index files: the first start of a dataset converted before them (reads the shards, writes the indexes)
  indexed  with the index files: every later start, and every start of data the converters now write

each as index_split + the text-table rows of the unique reports + train_dataset + its first batch (the start-up
path of train.py), best of --reps. The shards are in the page cache (just written), so `read` is a lower bound:
on network storage (GCS, NFS) reading every record costs far more, while `indexed` reads only the index files.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import shutil
import sys
import tempfile
import time
import types

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# pylint: disable=wrong-import-position
from medbind_jax.data import codecs, pipeline, preprocess, schema, shard_index
from medbind_jax.data.text import TableRows

LAYOUT = pipeline.Layout(("cxr", "ecg"), ("cxr", "ecg"), {"cxr_ecg": ("cxr", "ecg")})
SPECS = {"cxr": preprocess.CxrSpec(image_size=16), "ecg": preprocess.EcgSpec(sampling_rate=50.0, num_samples=25)}


def _png(rng: np.random.Generator, payload_bytes: int) -> bytes:
  side = max(8, int(np.ceil(np.sqrt(payload_bytes))))  # noise does not compress: about side^2 bytes
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def make_records(num_records: int, payload_kb: float, seed: int = 0) -> list[tuple[bytes, shard_index.RecordEntry]]:
  """Serialised records and their index entries: 3 in 4 linked (CXR+ECG), the rest CXR-only or ECG-only."""
  rng = np.random.default_rng(seed)
  images = [_png(rng, int(payload_kb * 1024)) for _ in range(16)]
  ecgs = [codecs.EcgData(rng.integers(-500, 500, (50, 12)).astype(np.int16), [1000.0] * 12, sampling_rate=100.0)
          for _ in range(16)]
  records = []
  for i in range(num_records):
    cxr = schema.Part(images[i % 16], report=f"cxr finding {i % 397}: no acute cardiopulmonary process.",
                      labels=[float(i % 2)])
    ecg = schema.Part(ecgs[i % 16], report=f"sinus rhythm, pattern {i % 113}. otherwise normal ecg.", labels=[1.0])
    parts = {"cxr": cxr, "ecg": ecg} if i % 4 != 3 else ({"cxr": cxr} if i % 8 == 3 else {"ecg": ecg})
    enc = schema.Encounter(f"e{i:07d}", f"p{i // 2:07d}", "train", "bench", linked=len(parts) == 2, parts=parts)
    data = schema.encode_encounter(enc)
    records.append((data, shard_index.record_entry(data)))
  return records


def write_dataset(out_dir: str, records, shard_size: int) -> list[str]:
  """Shards of `shard_size` records with their indexes, and dataset_info.json; returns the index files."""
  os.makedirs(out_dir, exist_ok=True)
  count = -(-len(records) // shard_size)
  stats = []
  for s in range(count):
    shard = schema.ShardStats(schema.shard_name("train", s, count))
    with shard_index.ShardWriter(os.path.join(out_dir, shard.file)) as writer:
      for data, entry in records[s * shard_size:(s + 1) * shard_size]:
        writer.write(data, entry)
        shard.add(types.SimpleNamespace(parts=entry.reports, linked=entry.linked))  # all ShardStats.add reads
    shard.index = writer.index_file
    stats.append(shard)
  schema.write_dataset_info(out_dir, name="bench_startup", shards={"train": stats},
                            label_names={"cxr": ["a"], "ecg": ["b"]})
  return [s.index for s in stats]


def time_to_first_batch(data_dir: str, **index_options) -> tuple[float, float, pipeline.SplitIndex]:
  """(seconds of index_split, seconds to the first batch in all, the index)."""
  start = time.perf_counter()
  index = pipeline.index_split(data_dir, "train", progress=False, **index_options)
  indexed = time.perf_counter() - start
  texts = sorted({r.reports[m] for r in index.records for m in LAYOUT.report_modalities if r.has(m)})
  dataset = pipeline.train_dataset(index, TableRows({t: i for i, t in enumerate(texts)}), pipeline.BatchSpec(32, 8),
                                   LAYOUT, specs=SPECS, seed=0)
  batch = dataset[0]
  assert batch["inputs"]["cxr"].shape[0] == 32
  return indexed, time.perf_counter() - start, index


def _move(files: list[str], src: str, dst: str) -> None:
  os.makedirs(dst, exist_ok=True)
  for f in files:
    os.replace(os.path.join(src, f), os.path.join(dst, f))


def _size_mb(directory: str, names) -> float:
  return sum(os.path.getsize(os.path.join(directory, n)) for n in names) / 1e6


def bench(data_dir: str, records, shard_size: int, reps: int) -> dict:
  write_dataset(data_dir, records, shard_size)
  info = schema.read_dataset_info(data_dir)
  shards = [s["file"] for s in info["splits"]["train"]["shards"]]
  index_files = [s["index"] for s in info["splits"]["train"]["shards"]]
  aside = data_dir + "_indexes_aside"
  row = {"records": len(records), "shards": len(shards), "per_shard": shard_size,
         "shard_mb": _size_mb(data_dir, shards), "index_mb": _size_mb(data_dir, index_files)}
  _move(index_files, data_dir, aside)  # as converted before indexes existed
  best = lambda runs: min(runs, key=lambda r: r[1])  # noqa: E731
  row["read"] = best([time_to_first_batch(data_dir, write_indexes=False) for _ in range(reps)])[:2]
  reference = time_to_first_batch(data_dir, write_indexes=False)[2].records
  first = []
  for _ in range(reps):
    for f in index_files:
      if os.path.exists(os.path.join(data_dir, f)):
        os.remove(os.path.join(data_dir, f))
    first.append(time_to_first_batch(data_dir))
  row["first"] = best(first)[:2]
  indexed = [time_to_first_batch(data_dir) for _ in range(reps)]
  row["indexed"] = best(indexed)[:2]
  if indexed[-1][2].records != reference:
    raise AssertionError(f"{data_dir}: the index from the index files differs from the one read from the shards")
  shutil.rmtree(aside)
  return row


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--records", type=int, default=50_000)
  parser.add_argument("--shard-sizes", default="2500,25000", help="records per shard, one dataset each")
  parser.add_argument("--payload-kb", type=float, default=0.0, help="CXR payload size (default: an 8x8 PNG)")
  parser.add_argument("--reps", type=int, default=3, help="timed starts per variant (best is shown)")
  parser.add_argument("--data-dir", default="", help="where to write the datasets (default: a temporary folder)")
  args = parser.parse_args(argv)
  root = args.data_dir or tempfile.mkdtemp(prefix="bench_startup_")
  try:
    start = time.perf_counter()
    records = make_records(args.records, args.payload_kb)
    print(f"{args.records} records of {np.mean([len(d) for d, _ in records]) / 1e3:.1f} KB made in "
          f"{time.perf_counter() - start:.1f} s; writing to {root}", flush=True)
    rows = []
    for size in map(int, args.shard_sizes.split(",")):
      start = time.perf_counter()
      rows.append(bench(os.path.join(root, f"shards_of_{size}"), records, size, args.reps))
      print(f"  shards of {size}: done in {time.perf_counter() - start:.1f} s", flush=True)
    print("\ntime to the first training batch (s; index_split alone in brackets), best of", args.reps)
    print("| records | shards x records | shards MB | indexes MB | read (no index) | first start (reads, writes "
          "indexes) | indexed | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['records']:,} | {r['shards']} x {r['per_shard']:,} | {r['shard_mb']:.1f} | {r['index_mb']:.2f} | "
            f"{r['read'][1]:.2f} ({r['read'][0]:.2f}) | {r['first'][1]:.2f} ({r['first'][0]:.2f}) | "
            f"{r['indexed'][1]:.2f} ({r['indexed'][0]:.2f}) | {r['read'][1] / r['indexed'][1]:.1f}x |")
  finally:
    if not args.data_dir:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
