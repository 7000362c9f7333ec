"""Per-shard index files: what `pipeline.index_split` needs of every record, so that start-up reads no record.

Without them the split index is built by reading and decoding every record of every shard, in every process, at
every start: O(records) of I/O (hours at MIMIC scale) before the first step. A shard's index is written beside it
when the shard is written (`ShardWriter`, used by `data_prep/runner.py` and the synthetic world), or later from the
shard itself (`build_index`: by `index_split` on first use, or `python -m data_prep.add_index DATA_DIR`).

File `{split}.index-NNNNN-of-MMMMM` beside the shard `{split}.tfrecord-NNNNN-of-MMMMM` (`index_name`; it does not
match the shards' pattern `*.tfrecord-*`, so nothing that lists shards by name takes an index for one):

  MEDBIND-SHARD-INDEX 1\\n     magic and format version
  {header JSON}\\n             shard (its file name), shard_bytes and shard_crc32c (size and CRC32C of the whole
                              shard file), num_records, codecs (the modality codecs the records were decoded with)
  gzip(JSON)                  columns, one entry per record in file order: offsets and lengths (`tfrecord.FrameRef`
                              of the record's data), encounter_ids, patient_ids, linked (0/1), and reports
                              {modality: [the record's report text, or null when it lacks the modality]}
  uint32 little-endian        CRC32C of every byte above

Integrity. The trailing CRC32C covers the whole file: a damaged or truncated index raises `CorruptIndexError`
naming it. The index is bound to its shard by name and size, checked at start-up with a stat, without opening the
shard; `verify=True` (`check_index`) also recomputes the shard's CRC32C (one sequential read, no decoding). A shard
replaced by another of the same size, or damaged after it was indexed, is caught when an affected record is read:
`tfrecord.RecordReader.read` checks each frame's header (its length must be the indexed one) and both CRCs, and
names the file and offset. What only `verify=True` catches: a replacement whose frames happen to line up with the
indexed ones (e.g. two records of equal length swapped).

Texts are stored once per record and modality (report texts are needed at start-up, for the text-feature cache and
the batches); gzip takes the many repeated reports (machine ECG statements) down to little.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import struct
import zlib
from typing import Any, Iterable, Mapping

import crc32c

from medbind_jax import paths
from medbind_jax.data import codecs, schema, tfrecord

log = logging.getLogger(__name__)

MAGIC = b"MEDBIND-SHARD-INDEX"
VERSION = 1
_TRAILER = struct.Struct("<I")
_CHUNK = 1 << 22  # bytes per read when checksumming a shard


class CorruptIndexError(IOError):
  """A shard index that cannot be trusted: damaged, truncated, or not an index of this format."""

  def __init__(self, path: str, reason: str):
    self.path, self.reason = str(path), reason
    super().__init__(f"damaged shard index {path}: {reason}")


def index_name(shard_file: str) -> str:
  """The index file of a shard: `train.tfrecord-00000-of-00004` -> `train.index-00000-of-00004` (another name
  form gets `.index` appended)."""
  head, sep, tail = shard_file.rpartition(".tfrecord-")
  return f"{head}.index-{tail}" if sep else shard_file + ".index"


@dataclasses.dataclass(frozen=True)
class RecordEntry:
  """What the index keeps of one record: ids, the linked flag, and the report of each modality it has."""

  encounter_id: str
  patient_id: str
  linked: bool
  reports: Mapping[str, str]  # modality -> report text, one key per (registered) modality the record has


def index_codecs(modalities: Iterable[str] | None) -> tuple[str, ...]:
  """The codecs an index of a dataset declaring `modalities` (dataset_info `modalities`; None: any) is made with:
  the registered ones among them. Codecs registered for other datasets do not enter the index, so its bytes do not
  depend on what else a process has imported."""
  return tuple(m for m in codecs.names() if modalities is None or m in modalities)


def record_entry(data: bytes, modalities: Iterable[str] | None = None) -> RecordEntry:
  """The entry of one serialised record, decoded as `pipeline.index_split` reads a record (the codecs of
  `index_codecs(modalities)` decide whether the record has their modality)."""
  enc = schema.decode_encounter(data, modalities=index_codecs(modalities), extras=False)
  return RecordEntry(enc.encounter_id, enc.patient_id, bool(enc.linked),
                     {m: part.report for m, part in enc.parts.items()})


@dataclasses.dataclass
class ShardIndex:
  """The index of one shard, column-wise (see the module docstring)."""

  shard: str  # the shard's file name (no directory)
  codecs: tuple[str, ...]  # the codecs its records were decoded with: other modalities are not in `reports`
  shard_bytes: int = 0
  shard_crc32c: int = 0
  offsets: list[int] = dataclasses.field(default_factory=list)
  lengths: list[int] = dataclasses.field(default_factory=list)
  encounter_ids: list[str] = dataclasses.field(default_factory=list)
  patient_ids: list[str] = dataclasses.field(default_factory=list)
  linked: list[bool] = dataclasses.field(default_factory=list)
  reports: dict[str, list[str | None]] = dataclasses.field(default_factory=dict)

  @property
  def num_records(self) -> int:
    return len(self.offsets)

  def add(self, offset: int, length: int, entry: RecordEntry) -> None:
    count = self.num_records
    self.offsets.append(int(offset))
    self.lengths.append(int(length))
    self.encounter_ids.append(entry.encounter_id)
    self.patient_ids.append(entry.patient_id)
    self.linked.append(bool(entry.linked))
    for modality, text in entry.reports.items():
      self.reports.setdefault(modality, [None] * count).append(text)
    for column in self.reports.values():
      if len(column) == count:  # the record lacks this modality
        column.append(None)

  def to_bytes(self) -> bytes:
    header = {"shard": self.shard, "shard_bytes": self.shard_bytes, "shard_crc32c": self.shard_crc32c,
              "num_records": self.num_records, "codecs": list(self.codecs)}
    columns = {"offsets": self.offsets, "lengths": self.lengths, "encounter_ids": self.encounter_ids,
               "patient_ids": self.patient_ids, "linked": [int(x) for x in self.linked],
               "reports": {m: self.reports[m] for m in sorted(self.reports)}}
    body = json.dumps(columns, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    payload = b"".join([MAGIC, f" {VERSION}\n".encode(), json.dumps(header, sort_keys=True).encode("utf-8"), b"\n",
                        gzip.compress(body, compresslevel=6, mtime=0)])  # mtime=0: same records, same bytes
    return payload + _TRAILER.pack(crc32c.crc32c(payload))

  @classmethod
  def from_bytes(cls, data: bytes, path: str) -> ShardIndex:
    """Parses an index file's bytes; CorruptIndexError naming `path` on any damage."""
    if len(data) < _TRAILER.size or crc32c.crc32c(data[:-_TRAILER.size]) != _TRAILER.unpack(data[-_TRAILER.size:])[0]:
      raise CorruptIndexError(path, f"CRC32C mismatch ({len(data)} bytes; damaged or truncated file)")
    magic_end = data.find(b"\n")
    magic = data[:magic_end].split(b" ")
    if len(magic) != 2 or magic[0] != MAGIC:
      raise CorruptIndexError(path, "not a shard index (no MEDBIND-SHARD-INDEX line)")
    if magic[1] != str(VERSION).encode():
      raise CorruptIndexError(path, f"index format {magic[1].decode(errors='replace')}; this code reads {VERSION}")
    header_end = data.find(b"\n", magic_end + 1)
    try:
      header = json.loads(data[magic_end + 1:header_end])
      columns = json.loads(gzip.decompress(data[header_end + 1:-_TRAILER.size]))
      index = cls(shard=header["shard"], codecs=tuple(header["codecs"]), shard_bytes=int(header["shard_bytes"]),
                  shard_crc32c=int(header["shard_crc32c"]), offsets=columns["offsets"], lengths=columns["lengths"],
                  encounter_ids=columns["encounter_ids"], patient_ids=columns["patient_ids"],
                  linked=[bool(x) for x in columns["linked"]], reports=columns["reports"])
      count = int(header["num_records"])
    except (ValueError, KeyError, TypeError, EOFError, OSError, zlib.error) as err:
      raise CorruptIndexError(path, f"unreadable ({type(err).__name__}: {err})") from err
    if any(len(column) != count for column in (index.offsets, index.lengths, index.encounter_ids, index.patient_ids,
                                               index.linked, *index.reports.values())):
      raise CorruptIndexError(path, f"columns of unequal length (header says {count} records)")
    return index


def read_index(path: str | os.PathLike) -> ShardIndex:
  """The index in `path` (one read of a small file); CorruptIndexError naming it when it is damaged."""
  path = os.fspath(path)
  return ShardIndex.from_bytes(paths.read_bytes(path), path)


def write_index(path: str | os.PathLike, index: ShardIndex) -> None:
  """Writes `index` to `path` atomically (`paths.write_bytes_atomic`: locally through a temporary file of this
  process, renamed into place; on an object store one object write): a reader never sees a partial index, and
  processes indexing the same shard at once do not clobber each other's temporary files."""
  paths.write_bytes_atomic(path, index.to_bytes())


def file_crc32c(path: str | os.PathLike) -> int:
  """CRC32C of a whole file, read sequentially."""
  crc = 0
  with paths.open_file(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = crc32c.crc32c(chunk, crc)
  return crc


def build_index(shard_path: str | os.PathLike, *, modalities: Iterable[str] | None = None, skip_corrupt: bool = False,
                problems: list | None = None) -> ShardIndex:
  """Indexes a shard by reading every record (`tfrecord.iter_records`: both CRCs of every frame checked, with its
  `skip_corrupt` rules; skips are appended to `problems`). The shard's CRC32C is that of the frames read, which is
  the file's when nothing was skipped (a clean scan covers the file end to end)."""
  shard_path = os.fspath(shard_path)
  index = ShardIndex(shard=os.path.basename(shard_path), codecs=index_codecs(modalities))
  crc = 0
  for ref, data in tfrecord.iter_records(shard_path, skip_corrupt=skip_corrupt, problems=problems):
    index.add(ref.offset, ref.length, record_entry(data, modalities))
    crc = crc32c.crc32c(tfrecord.frame(data), crc)  # the frame's bytes, both CRCs having matched
  index.shard_bytes, index.shard_crc32c = paths.file_size(shard_path), crc
  return index


def check_index(index: ShardIndex, shard_path: str | os.PathLike, *, needed_codecs: Iterable[str] = (),
                verify: bool = False) -> str | None:
  """Why `index` does not describe the shard at `shard_path`, or None when it does. Cheap checks: the shard's name
  and size (a stat), and that the index was made with every codec in `needed_codecs` (a codec it was made without
  has no column: the records' modalities of that kind would be missing). `verify`: also the CRC32C of the whole
  shard (reads it)."""
  shard_path = os.fspath(shard_path)
  if index.shard != os.path.basename(shard_path):
    return f"it indexes {index.shard!r}, not {os.path.basename(shard_path)!r}"
  size = paths.file_size(shard_path)
  if size != index.shard_bytes:
    return f"the shard has {size} bytes, the index was made for {index.shard_bytes} (the shard was replaced)"
  missing = sorted(set(needed_codecs) - set(index.codecs))
  if missing:
    return f"it was made without the {', '.join(missing)} codec(s) (made with {', '.join(index.codecs)})"
  if verify and file_crc32c(shard_path) != index.shard_crc32c:
    return "the shard's CRC32C differs from the one recorded when it was indexed (the shard changed or is damaged)"
  return None


def load_index(shard_path: str | os.PathLike, index_path: str | os.PathLike, *, needed_codecs: Iterable[str] = (),
               verify: bool = False) -> tuple[ShardIndex | None, str | None]:
  """(index, None) when `index_path` holds a usable index of the shard; (None, None) when there is no index file;
  (None, why) when there is one that must not be trusted (damaged, or not matching the shard: `check_index`)."""
  if not paths.exists(index_path):
    return None, None
  try:
    index = read_index(index_path)
  except CorruptIndexError as err:
    return None, str(err)
  why = check_index(index, shard_path, needed_codecs=needed_codecs, verify=verify)
  return (None, f"{index_path} does not match {shard_path}: {why}") if why else (index, None)


def load_or_build(shard_path: str | os.PathLike, index_path: str | os.PathLike, *,
                  modalities: Iterable[str] | None = None, verify: bool = False, rebuild: bool = False,
                  skip_corrupt: bool = False, problems: list | None = None) -> tuple[ShardIndex, bool]:
  """(index, built): the usable index in `index_path` (`load_index`; built False), else one built from the shard
  (`build_index` with `skip_corrupt` / `problems`; built True), with a warning when an index existed but could not
  be trusted. `rebuild`: build without looking at `index_path`. Writes nothing: what to keep is the caller's
  choice (a training start, `data_prep.add_index` and a resumed conversion decide differently)."""
  if not rebuild:
    index, why = load_index(shard_path, index_path, needed_codecs=index_codecs(modalities), verify=verify)
    if index is not None:
      return index, False
    if why:
      log.warning("%s; re-indexing from the shard", why)
  return build_index(shard_path, modalities=modalities, skip_corrupt=skip_corrupt, problems=problems), True


class ShardWriter:
  """Writes a shard (`tfrecord.TFRecordWriter`: temporary file renamed on a clean close) and, once it is in place,
  its index beside it. `write(data, entry)`: `entry` is `record_entry(data)` when not given (a caller that
  computed it elsewhere, e.g. in a worker process, passes it). After `close`, `index_file` is the index's name."""

  def __init__(self, path: str | os.PathLike, modalities: Iterable[str] | None = None):
    """`modalities`: those the dataset declares (dataset_info `modalities`); None: every registered codec's."""
    self.path = os.fspath(path)
    self.modalities = None if modalities is None else tuple(modalities)
    self._writer = tfrecord.TFRecordWriter(self.path)
    self._index = ShardIndex(shard=os.path.basename(self.path), codecs=index_codecs(self.modalities))
    self.index_file = ""

  @property
  def num_records(self) -> int:
    return self._writer.num_records

  def write(self, data: bytes, entry: RecordEntry | None = None) -> None:
    offset = self._writer.write(data)
    self._index.add(offset, len(data), record_entry(data, self.modalities) if entry is None else entry)

  def close(self) -> str:
    """Puts the shard in place, then writes its index; returns the index's file name."""
    if self.index_file:
      return self.index_file
    self._writer.close()
    self._index.shard_bytes, self._index.shard_crc32c = self._writer.num_bytes, self._writer.crc32c
    name = index_name(os.path.basename(self.path))
    write_index(paths.join(os.path.dirname(self.path), name), self._index)
    self.index_file = name
    return name

  def abort(self) -> None:
    self._writer.abort()

  def __enter__(self) -> ShardWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def remove_index(data_dir: str | os.PathLike, shard_entry: Mapping[str, Any]) -> None:
  """Deletes the index of a dataset_info shard entry (its recorded name and the default one), if present."""
  for name in {shard_entry.get("index") or "", index_name(shard_entry["file"])} - {""}:
    paths.remove(paths.join(data_dir, name))
