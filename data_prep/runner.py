"""Running a conversion: the machinery every real-dataset converter (`data_prep/<dataset>.py`) shares.

A converter does two things: it *plans* (reads the source's tables and lists one small picklable task per output
record, each with a `record_id` and a `split`) and it *converts* one task into a `schema.Encounter` (a module-level
function, so worker processes can run it). `run_conversion` does the rest: deterministic shards, a parallel map
over records with a progress bar, the per-run error log, resume, `dataset_info.json`, the end-of-run summary and
the exit code. The converters' helpers live beside it: `cli` (options and flags), `tables` (CSV, paths, splits),
`ecg_io` (WFDB, leads, the stored ECG), `cxr_io` (images), `report_text` (report sections, statements).

Output of a run in `--out`:

  {split}.tfrecord-NNNNN-of-MMMMM   shards (`schema.shard_name`); a record's shard is fixed by the plan alone
  {split}.index-NNNNN-of-MMMMM      each shard's index (`shard_index`: every record's position, ids and report
                                    texts, so that training starts without reading the records), written with it
  dataset_info.json                 counts per split and modality, label names, provenance, options, error counts
  errors.jsonl                      one JSON object per failed record: {"record_id", "split", "kind", "reason"}
  convert_state.json                the resume manifest: the plan's fingerprint and each finished shard's
                                    counts, size and errors

Determinism and resume: tasks are sorted by (split, record_id) and cut into consecutive shards of `--shard-size`
tasks, so the shard of a record depends only on the plan, never on worker timing; a record that fails leaves its
shard one record shorter. Each shard is written to `name.tmp` and renamed when complete (`TFRecordWriter`), then
recorded in `convert_state.json`. A re-run with the same plan and options keeps every shard whose final file
exists with the size and record count the manifest lists, and redoes the rest (missing files, stray `.tmp`
files, shards the manifest does not list): the output is byte-identical to an uninterrupted run. A kept shard
whose index is missing or does not match it (e.g. converted before indexes existed) gets it re-made from the shard.

`--out` may be a local directory or a URI (gs://bucket/..., s3://...): every output file is written through
`medbind_jax.paths` (etils.epath). Of the source (`--src`), tables, images and report files are read through
epath too (`tables`), so the CXR converters take a URI source; ECG records are read from local files, by wfdb
(`ecg_io.read_wfdb`) and scipy.io.loadmat (`cpsc2018`), which take local paths only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import types
from typing import Any, Callable, Iterator, Mapping, Sequence

import tqdm

from data_prep.cli import Options
from data_prep.ecg_io import ECG_STORAGE
from data_prep.errors import RecordError
from medbind_jax import paths
from medbind_jax.data import schema, shard_index, tfrecord

log = logging.getLogger(__name__)

STATE_FILE = "convert_state.json"
ERRORS_FILE = "errors.jsonl"
_ERRORS_SHOWN = 10  # errors printed while running; all of them go to errors.jsonl


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What dataset_info.json says about a converted dataset."""

  name: str  # dataset_info name and each record's `dataset` field
  version: str  # bump when the converter's output changes for the same input (part of the fingerprint)
  source: str
  licence: str
  citation: str
  # modality -> its label columns, for every modality the records may hold (dataset_info's `modalities`)
  label_names: Mapping[str, tuple[str, ...]]
  description: str = ""


@dataclasses.dataclass
class Summary:
  """The outcome of `run_conversion`."""

  out_dir: str
  num_planned: int  # tasks + records rejected while planning
  num_written: int
  errors: list[dict]  # {"record_id", "split", "kind", "reason"}, in plan order
  error_rate: float
  exit_code: int  # 0, or 1 when error_rate > max_error_rate
  shards_written: list[str]
  shards_reused: list[str]
  seconds: float
  info: dict


def _fingerprint(spec: DatasetSpec, options: Options, params: Mapping[str, Any], plan: Sequence[tuple]) -> str:
  digest = hashlib.sha256()
  digest.update(json.dumps({"dataset": spec.name, "version": spec.version, "schema_version": schema.SCHEMA_VERSION,
                            "options": options.output_options(), "params": params},
                           sort_keys=True, default=str).encode("utf-8"))
  for split, record_id in plan:
    digest.update(f"\n{split}\t{record_id}".encode("utf-8"))
  return digest.hexdigest()


def _write_json(path: str, value: Any) -> None:
  paths.write_text_atomic(path, json.dumps(value, indent=1, sort_keys=True))


def _read_json(path: str) -> Any:
  return json.loads(paths.read_text(path))


def _plan_shards(tasks: Sequence[Any], shard_size: int) -> dict[str, list[tuple[str, list[Any]]]]:
  """{split: [(shard file, tasks)]}: tasks sorted by record_id, cut into consecutive shards."""
  by_split: dict[str, list[Any]] = {split: [] for split in schema.SPLITS}
  for task in tasks:
    if task.split not in by_split:
      raise ValueError(f"task {task.record_id}: split {task.split!r} is not one of {schema.SPLITS}")
    by_split[task.split].append(task)
  plan = {}
  for split, split_tasks in by_split.items():
    split_tasks.sort(key=lambda t: t.record_id)
    count = math.ceil(len(split_tasks) / shard_size)
    plan[split] = [(schema.shard_name(split, i, count), split_tasks[i * shard_size:(i + 1) * shard_size])
                   for i in range(count)]
  return plan


def _shard_is_finished(out_dir: str, file: str, entry: Mapping | None) -> bool:
  """The final file exists with the size and record count the manifest lists (frames indexed, not decoded)."""
  path = paths.join(out_dir, file)
  if entry is None or not paths.is_file(path) or paths.file_size(path) != entry["bytes"]:
    return False
  try:
    scan = tfrecord.scan_tfrecord(path, verify_data=False)
  except tfrecord.CorruptRecordError:
    return False
  return len(scan.frames) == entry["num_examples"]


def _ensure_index(out_dir: str, file: str, entry: dict, modalities: Sequence[str]) -> None:
  """Gives a kept shard its index (re-made from the shard when missing or not matching) and names it in `entry`;
  `modalities`: the dataset's."""
  name = entry.get("index") or shard_index.index_name(file)
  index, built = shard_index.load_or_build(paths.join(out_dir, file), paths.join(out_dir, name), modalities=modalities)
  if built:
    shard_index.write_index(paths.join(out_dir, name), index)
  entry["index"] = name


def _remove_previous_output(out_dir: str, state: Mapping) -> None:
  """Removes what a previous run listed (shards, their .tmp files and indexes, dataset_info, error log, manifest)."""
  for file, entry in state.get("shards", {}).items():
    for path in (paths.join(out_dir, file), paths.join(out_dir, file + ".tmp")):
      paths.remove(path)
    shard_index.remove_index(out_dir, {**entry, "file": file})
  for name in (schema.DATASET_INFO, ERRORS_FILE, STATE_FILE):
    paths.remove(paths.join(out_dir, name))


def _prepare_out_dir(out_dir: str, spec: DatasetSpec, fingerprint: str, options: Options) -> dict:
  """The resume manifest to continue from ({} for a fresh start); refuses to mix runs of different plans."""
  paths.makedirs(out_dir)
  state_path = paths.join(out_dir, STATE_FILE)
  state = _read_json(state_path) if paths.is_file(state_path) else None
  if state is None:
    info_path = paths.join(out_dir, schema.DATASET_INFO)
    if paths.is_file(info_path) and _read_json(info_path).get("name") != spec.name and not options.overwrite:
      raise FileExistsError(f"{out_dir} holds another dataset ({_read_json(info_path).get('name')!r}); choose "
                            "another --out")
    return {"fingerprint": fingerprint, "dataset": spec.name, "shards": {}}
  if state.get("fingerprint") == fingerprint:
    return state
  if not options.overwrite:
    raise FileExistsError(
        f"{out_dir} holds a conversion of {state.get('dataset')!r} with another source plan or other output "
        "options; re-run with --overwrite to replace it, or choose another --out")
  log.info("--overwrite: removing the previous conversion in %s", out_dir)
  _remove_previous_output(out_dir, state)
  return {"fingerprint": fingerprint, "dataset": spec.name, "shards": {}}


def _convert_one(convert: Callable[[Any, Options], schema.Encounter], options: Options, modalities: Sequence[str],
                 task: Any) -> tuple[bool, Any, tuple]:
  """(True, serialised record, (its modalities, linked, its shard-index entry)) or (False, (kind, reason), ()).
  Never raises for a bad record: any exception becomes its reason, so one record cannot stop a run of hundreds of
  thousands. The index entry is decoded from the serialised bytes here, in the worker, off the writer's path."""
  try:
    enc = convert(task, options)
    if enc.split != task.split:
      raise RecordError("converter bug", f"returned split {enc.split!r} for a task of split {task.split!r}")
    if not set(enc.parts) <= set(modalities):
      raise RecordError("converter bug", f"record with modalities {sorted(enc.parts)}; the dataset declares "
                        f"{list(modalities)}")
    data = schema.encode_encounter(enc)
    return True, data, (tuple(enc.parts), bool(enc.linked), shard_index.record_entry(data, modalities))
  except RecordError as err:
    return False, (err.kind, str(err)), ()
  except Exception as err:  # pylint: disable=broad-except
    return False, (f"unexpected {type(err).__name__}", f"unexpected {type(err).__name__}: {err}"), ()


def _map_records(convert, options: Options, modalities: Sequence[str], tasks: Sequence[Any],
                 workers: int) -> Iterator[tuple]:
  """`_convert_one` over `tasks`, in order: in this process (workers <= 1) or in a 'spawn' pool (safe when the
  caller holds threads, e.g. JAX's)."""
  fn = functools.partial(_convert_one, convert, options, modalities)
  if workers <= 1 or len(tasks) <= 1:
    yield from map(fn, tasks)
    return
  chunksize = max(1, min(16, len(tasks) // (workers * 8)))
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield from pool.imap(fn, tasks, chunksize=chunksize)


def run_conversion(spec: DatasetSpec, tasks: Sequence[Any], convert: Callable[[Any, Options], schema.Encounter],
                   out_dir: str | os.PathLike, options: Options, *, params: Mapping[str, Any] | None = None,
                   plan_errors: Sequence[tuple[str, str, RecordError]] = (), extra_info: Mapping[str, Any] | None = None
                   ) -> Summary:
  """Converts `tasks` into shards in `out_dir` (see the module docstring for the layout and resume rules).

  Args:
    spec: what dataset_info.json says about the dataset.
    tasks: picklable objects with `record_id` (unique) and `split` attributes, one per output record.
    convert: module-level function (task, options) -> Encounter; raises RecordError(reason) for a bad record.
    out_dir: output directory.
    options: shared options.
    params: the converter's own options (recorded in dataset_info.json; part of the fingerprint).
    plan_errors: (record_id, split, RecordError) of source records rejected while planning; logged, counted.
    extra_info: more dataset_info.json keys (e.g. linking counts, excluded-record counts).
  """
  start = time.perf_counter()
  out_dir = os.fspath(out_dir)
  modalities = list(spec.label_names)
  params = dict(params or {})
  ids = [t.record_id for t in tasks]
  if len(set(ids)) != len(ids):
    dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
    raise ValueError(f"{spec.name}: duplicate record ids in the plan, e.g. {dupes}")
  plan = _plan_shards(tasks, options.shard_size)
  fingerprint = _fingerprint(spec, options, params,
                             [(split, t.record_id) for split in schema.SPLITS for _, ts in plan[split] for t in ts]
                             + [("plan_error", e[0]) for e in plan_errors])
  state = _prepare_out_dir(out_dir, spec, fingerprint, options)
  state_path = paths.join(out_dir, STATE_FILE)

  pending: list[tuple[str, list[Any]]] = []
  reused: list[str] = []
  for split in schema.SPLITS:
    for file, shard_tasks in plan[split]:
      if _shard_is_finished(out_dir, file, state["shards"].get(file)):
        _ensure_index(out_dir, file, state["shards"][file], modalities)
        reused.append(file)
        continue
      shard_index.remove_index(out_dir, {**state["shards"].pop(file, {}), "file": file})
      for path in (paths.join(out_dir, file), paths.join(out_dir, file + ".tmp")):
        paths.remove(path)
      pending.append((file, shard_tasks))
  _write_json(state_path, state)
  num_tasks = sum(len(ts) for _, ts in pending)
  if reused:
    log.info("%s: %d finished shard(s) kept from a previous run; converting %d shard(s), %d records",
             spec.name, len(reused), len(pending), num_tasks)

  shown = [0]

  def note_error(record_id: str, split: str, kind: str, reason: str) -> dict:
    if shown[0] < _ERRORS_SHOWN:
      tqdm.tqdm.write(f"error: {record_id}: {reason}", file=sys.stderr)
    elif shown[0] == _ERRORS_SHOWN:
      tqdm.tqdm.write(f"(further errors go to {paths.join(out_dir, ERRORS_FILE)} only)", file=sys.stderr)
    shown[0] += 1
    return {"record_id": record_id, "split": split, "kind": kind, "reason": reason}

  plan_error_log = [note_error(record_id, split, err.kind, str(err)) for record_id, split, err in plan_errors]
  all_tasks = [t for _, ts in pending for t in ts]
  results = _map_records(convert, options, modalities, all_tasks, min(options.workers, max(1, len(all_tasks))))
  with tqdm.tqdm(total=num_tasks, unit="rec", desc=spec.name, disable=not options.progress) as bar, \
      contextlib.closing(results):
    for file, shard_tasks in pending:
      stats = schema.ShardStats(file=file)
      shard_errors = []
      with shard_index.ShardWriter(paths.join(out_dir, file), modalities=modalities) as writer:
        for task in shard_tasks:
          ok, payload, counted = next(results)
          if ok:
            writer.write(payload, counted[2])
            stats.add(types.SimpleNamespace(parts=counted[0], linked=counted[1]))  # all that ShardStats.add reads
          else:
            shard_errors.append(note_error(task.record_id, task.split, *payload))
          bar.update(1)
      stats.index = writer.index_file
      state["shards"][file] = {**stats.to_json(modalities), "bytes": paths.file_size(paths.join(out_dir, file)),
                               "errors": shard_errors}
      _write_json(state_path, state)
      bar.set_postfix(errors=shown[0])

  # Everything below is recomputed from the manifest, so a resumed run ends exactly like an uninterrupted one.
  errors = list(plan_error_log)
  shards: dict[str, list[schema.ShardStats]] = {split: [] for split in schema.SPLITS}
  for split in schema.SPLITS:
    for file, _ in plan[split]:
      entry = state["shards"][file]
      shards[split].append(schema.ShardStats.from_json(entry, modalities))
      errors.extend(entry["errors"])
  errors = [{key: error[key] for key in ("record_id", "split", "kind", "reason")} for error in errors]
  paths.write_text_atomic(paths.join(out_dir, ERRORS_FILE),
                          "".join(json.dumps(error, ensure_ascii=False) + "\n" for error in errors))

  num_planned = len(tasks) + len(plan_errors)
  error_rate = len(errors) / num_planned if num_planned else 0.0
  by_kind: dict[str, int] = {}
  for error in errors:
    by_kind[error["kind"]] = by_kind.get(error["kind"], 0) + 1
  info = schema.write_dataset_info(
      out_dir, name=spec.name, shards=shards, label_names=spec.label_names, source=spec.source,
      licence=spec.licence, citation=spec.citation,
      description=spec.description, converter=f"data_prep/{spec.name}.py", converter_version=spec.version,
      conversion_options={**options.output_options(), **params}, fingerprint=fingerprint,
      errors={"num_errors": len(errors), "num_planned": num_planned, "error_rate": error_rate,
              "max_error_rate": options.max_error_rate, "by_kind": dict(sorted(by_kind.items())),
              "log": ERRORS_FILE},
      **({"ecg_storage": ECG_STORAGE} if any(s.num_by_modality.get("ecg") for stats in shards.values()
                                             for s in stats) else {}),
      **dict(extra_info or {}))
  num_written = sum(s.num_examples for stats in shards.values() for s in stats)
  exit_code = 1 if error_rate > options.max_error_rate else 0
  summary = Summary(out_dir=out_dir, num_planned=num_planned, num_written=num_written, errors=errors,
                    error_rate=error_rate, exit_code=exit_code, shards_written=[f for f, _ in pending],
                    shards_reused=reused, seconds=time.perf_counter() - start, info=info)
  print_summary(summary)
  return summary


def print_summary(summary: Summary) -> None:
  info = summary.info
  lines = [f"{info['name']} -> {summary.out_dir}"]
  for split, stats in info["splits"].items():
    per_modality = "".join(f"{stats[f'num_{m}']} {m.upper()}, " for m in info["modalities"])
    lines.append(f"  {split:5s}: {stats['num_examples']} records in {len(stats['shards'])} shard(s) "
                 f"({per_modality}{stats['num_linked']} linked)")
  lines.append(f"  written {summary.num_written} of {summary.num_planned} planned records in "
               f"{summary.seconds:.1f} s; shards written {len(summary.shards_written)}, kept from a previous run "
               f"{len(summary.shards_reused)}")
  by_kind = info["errors"]["by_kind"]
  lines.append(f"  errors: {len(summary.errors)} ({summary.error_rate:.2%}, limit "
               f"{info['errors']['max_error_rate']:.2%})" + (f": {by_kind}" if by_kind else "")
               + (f"; see {paths.join(summary.out_dir, ERRORS_FILE)}" if summary.errors else ""))
  if summary.exit_code:
    lines.append("  FAILED: the error rate exceeds --max-error-rate (the output is complete but check the log)")
  print("\n".join(lines), flush=True)
