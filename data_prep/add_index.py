"""Adds the shard indexes (`medbind_jax.data.shard_index`) to a converted data directory.

  python -m data_prep.add_index DATA_DIR                 # every split; shards whose index is missing or stale
  python -m data_prep.add_index DATA_DIR --verify        # also check each indexed shard's CRC32C (reads them)
  python -m data_prep.add_index DATA_DIR --split train --force

For datasets converted before indexes existed, or kept in a place the training processes cannot write to (training
would otherwise read every record of every shard at each start; `pipeline.index_split` warns with this command).
Each shard without a usable index is read once (both CRCs of every frame checked) and its index written beside it,
then `dataset_info.json` names the indexes. A damaged shard, or one whose record count differs from
`dataset_info.json`, gets no index (a stale one is removed): it is reported (file and byte offset) and the exit
code is 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

import tqdm

from medbind_jax import paths
from medbind_jax.data import schema, shard_index, tfrecord


def add_indexes(data_dir: str, *, splits: Sequence[str] | None = None, verify: bool = False, force: bool = False,
                progress: bool = True) -> dict:
  """Indexes the shards of `splits` (default all) of `data_dir` that have no usable index (all with `force`).

  Returns {"kept": [...], "written": [...], "failed": [(file, reason)]} (shard files).
  """
  info = schema.read_dataset_info(data_dir)
  unknown = sorted(set(splits or ()) - set(info["splits"]))
  if unknown:
    raise ValueError(f"{data_dir} has no split(s) {unknown}; it has {sorted(info['splits'])}")
  kept, written, failed = [], {}, []
  shards = [s for split, v in info["splits"].items() if splits is None or split in splits for s in v["shards"]]
  for shard in tqdm.tqdm(shards, desc="index", unit="shard", disable=not progress):
    path = paths.join(data_dir, shard["file"])
    if not paths.exists(path):
      failed.append((shard["file"], f"{path} is listed in dataset_info.json but missing"))
      continue
    name = shard.get("index") or shard_index.index_name(shard["file"])
    try:
      index, built = shard_index.load_or_build(path, paths.join(data_dir, name), modalities=info.get("modalities"),
                                               verify=verify, rebuild=force)
      if built and index.num_records != shard["num_examples"]:
        raise ValueError(f"{path}: dataset_info.json lists {shard['num_examples']} records but {index.num_records} "
                         "could be read (truncated or replaced shard)")
    except (tfrecord.CorruptRecordError, ValueError) as err:
      failed.append((shard["file"], str(err)))
      # A stale index must not outlive the check: training then reads the shard, under its skip_corrupt rules.
      shard_index.remove_index(data_dir, shard)
      continue
    if not built:
      kept.append(shard["file"])
      if shard.get("index") != name:
        written[shard["file"]] = name  # found under its default name: record it
      continue
    shard_index.write_index(paths.join(data_dir, name), index)
    written[shard["file"]] = name
  if written:
    schema.record_shard_indexes(data_dir, written)
  return {"kept": kept, "written": sorted(f for f in written if f not in kept), "failed": failed}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("data_dir", help="a directory with dataset_info.json and its shards")
  parser.add_argument("--split", action="append", dest="splits", help="only this split (repeatable; default all)")
  parser.add_argument("--verify", action="store_true",
                      help="check the CRC32C of every indexed shard against its index (reads the shards)")
  parser.add_argument("--force", action="store_true", help="re-make every index, usable or not")
  parser.add_argument("--no-progress", dest="progress", action="store_false")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    result = add_indexes(args.data_dir, splits=args.splits, verify=args.verify, force=args.force,
                         progress=args.progress)
  except (FileNotFoundError, ValueError) as err:  # no dataset_info.json, unknown split, unreadable version
    print(f"error: {err}", file=sys.stderr)
    return 2
  print(f"{args.data_dir}: {len(result['written'])} index(es) written, {len(result['kept'])} kept, "
        f"{len(result['failed'])} shard(s) failed")
  for file, reason in result["failed"]:
    print(f"  failed: {file}: {reason}", file=sys.stderr)
  return 1 if result["failed"] else 0


if __name__ == "__main__":
  sys.exit(main())
