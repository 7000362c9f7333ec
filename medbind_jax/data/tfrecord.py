"""TFRecord framing with CRC checks, without TensorFlow.

A TFRecord file is a sequence of frames::

    uint64 length | uint32 masked_crc32c(length) | bytes data[length] | uint32 masked_crc32c(data)

(little-endian). Readers here verify both CRCs. `grain.experimental.TFRecordIterDataset` does not, and
offers no random access, so the project keeps its own small reader: an index pass (`scan_tfrecord`) that
locates and validates every frame, and `RecordReader.read` that re-checks one frame on access (its header, whose
length must be the one the `FrameRef` was made with, and both CRCs). `RecordReader.read` is therefore the check of
record data taken from a stored index (`shard_index`) rather than from a scan.

Files are read and written through `medbind_jax.paths` (etils.epath): local paths and URIs (gs://...) alike.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import threading
from typing import BinaryIO, Iterable, Iterator

import crc32c

from medbind_jax import paths

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<QI")  # length, masked crc of the length bytes
_FOOTER = struct.Struct("<I")  # masked crc of the data
_MASK_DELTA = 0xA282EAD8
# A frame longer than this is taken as a corrupt header rather than trusted for a huge read.
MAX_RECORD_BYTES = 1 << 31


class CorruptRecordError(IOError):
  """A TFRecord frame failed its CRC or ended early.

  Attributes:
    path: the file.
    offset: byte offset of the frame's start in the file.
    reason: what was wrong.
  """

  def __init__(self, path: str, offset: int, reason: str):
    self.path, self.offset, self.reason = str(path), int(offset), reason
    super().__init__(f"corrupt TFRecord in {path} at byte offset {offset}: {reason}")


def masked_crc(data: bytes) -> int:
  """The CRC32C variant stored in TFRecord frames (rotated and offset, see TFRecord docs)."""
  crc = crc32c.crc32c(data)
  return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
  """Returns `data` wrapped in one TFRecord frame."""
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", masked_crc(length)) + data + _FOOTER.pack(masked_crc(data))


class TFRecordWriter:
  """Writes frames to `path` via a temporary file renamed into place on a clean close.

  A writer interrupted mid-way leaves only `path + '.tmp'`, never a half-written `path`, so a re-run can tell
  finished shards from unfinished ones by their name. On an object store the temporary object is copied to `path`
  on close (`paths.replace`): an object store has no rename, but a finished shard still appears under its name
  only once complete.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._tmp = self.path + ".tmp"
    self._file: BinaryIO | None = paths.open_file(self._tmp, "wb")
    self.num_records = 0
    self.num_bytes = 0  # the file's size so far
    self.crc32c = 0  # CRC32C (unmasked) of the file's bytes so far, for the shard index (`shard_index`)

  def write(self, data: bytes) -> int:
    """Appends one frame holding `data`; returns the byte offset of `data` in the file (`FrameRef.offset`)."""
    framed = frame(data)
    self._file.write(framed)
    offset = self.num_bytes + _HEADER.size
    self.num_records += 1
    self.num_bytes += len(framed)
    self.crc32c = crc32c.crc32c(framed, self.crc32c)
    return offset

  def close(self) -> None:
    if self._file is not None:
      self._file.flush()
      if paths.is_local(self._tmp):
        os.fsync(self._file.fileno())
      self._file.close()
      self._file = None
      paths.replace(self._tmp, self.path)

  def abort(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
      paths.remove(self._tmp)

  def __enter__(self) -> "TFRecordWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


@dataclasses.dataclass(frozen=True)
class FrameRef:
  """Where one record's data lies: `length` bytes at `offset` (the data, not the frame header)."""

  path: str
  offset: int
  length: int

  @property
  def frame_offset(self) -> int:
    return self.offset - _HEADER.size


@dataclasses.dataclass
class ScanResult:
  frames: list[FrameRef]
  # (path, frame_offset, reason) for every problem met; empty on a clean file.
  problems: list[tuple[str, int, str]]
  # True when a damaged header made the rest of the file unreadable.
  truncated_scan: bool = False


def _check_frame(path: str, f: BinaryIO, offset: int, size: int, verify_data: bool) -> tuple[int, bytes | None]:
  """Validates the frame at `offset`; returns (data length, data if read). Raises CorruptRecordError."""
  header = f.read(_HEADER.size)
  if len(header) < _HEADER.size:
    raise CorruptRecordError(path, offset, f"file ends inside a frame header ({len(header)} of 12 bytes)")
  length, length_crc = _HEADER.unpack(header)
  if masked_crc(header[:8]) != length_crc:
    raise CorruptRecordError(path, offset, "length CRC mismatch (damaged frame header)")
  if length > MAX_RECORD_BYTES:
    raise CorruptRecordError(path, offset, f"implausible record length {length}")
  end = offset + _HEADER.size + length + _FOOTER.size
  if end > size:
    raise CorruptRecordError(path, offset, f"file ends inside the record: frame needs {end - offset} bytes, "
                             f"{size - offset} remain (truncated file)")
  if not verify_data:
    f.seek(length + _FOOTER.size, os.SEEK_CUR)
    return length, None
  data = f.read(length)
  (data_crc,) = _FOOTER.unpack(f.read(_FOOTER.size))
  if masked_crc(data) != data_crc:
    raise CorruptRecordError(path, offset, "data CRC mismatch (damaged record contents)")
  return length, data


def iter_records(path: str | os.PathLike, *, skip_corrupt: bool = False,
                 problems: list | None = None) -> Iterator[tuple[FrameRef, bytes]]:
  """Yields (FrameRef, data) for each valid record of a file in order, verifying both CRCs.

  With `skip_corrupt=False` the first bad frame raises `CorruptRecordError` (file and byte offset). With
  `skip_corrupt=True` a record whose data CRC fails is logged and skipped; a damaged header or a truncated
  tail ends the file there (its framing cannot be trusted further), also logged. Each skip is appended to
  `problems` as (path, frame offset, reason).
  """
  yield from _iter_frames(os.fspath(path), skip_corrupt, [] if problems is None else problems,
                          verify_data=True)


def _iter_frames(path: str, skip_corrupt: bool, problems: list, verify_data: bool):
  size = paths.file_size(path)
  with paths.open_file(path, "rb") as f:
    offset = 0
    while offset < size:
      try:
        length, data = _check_frame(path, f, offset, size, verify_data)
      except CorruptRecordError as err:
        if not skip_corrupt:
          raise
        log.warning("skipping %s", err)
        problems.append((path, offset, err.reason))
        if "data CRC" not in err.reason:
          return  # framing lost: nothing after this offset can be located reliably
        # The header was sound, so the next frame starts right after this one.
        length = _HEADER.unpack(_read_at(f, offset, _HEADER.size))[0]
        offset += _HEADER.size + length + _FOOTER.size
        f.seek(offset)
        continue
      yield FrameRef(path, offset + _HEADER.size, length), data
      offset += _HEADER.size + length + _FOOTER.size


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
  f.seek(offset)
  return f.read(n)


def scan_tfrecord(path: str | os.PathLike, *, skip_corrupt: bool = False,
                  verify_data: bool = True) -> ScanResult:
  """Indexes every frame of a file (see `iter_frames` for the error policy) without keeping the data."""
  problems: list[tuple[str, int, str]] = []
  frames = [ref for ref, _ in _iter_frames(os.fspath(path), skip_corrupt, problems, verify_data)]
  truncated = any("data CRC" not in reason for _, _, reason in problems)
  return ScanResult(frames=frames, problems=problems, truncated_scan=truncated)


class RecordReader:
  """Random access to records by `FrameRef`, re-verifying the frame on every read: its header (length CRC, and the
  length must be `FrameRef.length`: a file replaced since it was indexed is caught here) and the data CRC.

  File handles are opened lazily and kept per thread, so one reader can serve grain's reader threads (through
  `paths.open_file`: a seekable handle for local files and object stores alike). Picklable (handles are not
  pickled), so it can also travel to grain worker processes.
  """

  def __init__(self):
    self._local = threading.local()

  def __getstate__(self):
    return {}

  def __setstate__(self, state):
    del state
    self._local = threading.local()

  def _handle(self, path: str) -> BinaryIO:
    handles = getattr(self._local, "handles", None)
    if handles is None:
      handles = self._local.handles = {}
    f = handles.get(path)
    if f is None:
      f = handles[path] = paths.open_file(path, "rb")
    return f

  def read(self, ref: FrameRef) -> bytes:
    """The data of the frame at `ref`; CorruptRecordError (file and frame offset) when the frame is damaged,
    truncated, or not the frame `ref` was made from. One read of header, data and footer."""
    f = self._handle(ref.path)
    f.seek(ref.frame_offset)
    size = _HEADER.size + ref.length + _FOOTER.size
    framed = f.read(size)
    if len(framed) < size:
      raise CorruptRecordError(ref.path, ref.frame_offset, "file ends inside the record (truncated file)")
    length, length_crc = _HEADER.unpack_from(framed)
    if masked_crc(framed[:8]) != length_crc:
      raise CorruptRecordError(ref.path, ref.frame_offset, "length CRC mismatch (damaged frame header)")
    if length != ref.length:
      raise CorruptRecordError(ref.path, ref.frame_offset, f"the frame holds {length} bytes where {ref.length} were "
                               "indexed (the file changed after it was indexed)")
    (data_crc,) = _FOOTER.unpack_from(framed, _HEADER.size + length)
    data = framed[_HEADER.size:_HEADER.size + length]
    if masked_crc(data) != data_crc:
      raise CorruptRecordError(ref.path, ref.frame_offset, "data CRC mismatch (damaged record contents)")
    return data


def write_tfrecord(path: str | os.PathLike, records: Iterable[bytes]) -> int:
  """Writes all `records` to `path` (atomically); returns how many were written."""
  with TFRecordWriter(path) as writer:
    for data in records:
      writer.write(data)
  return writer.num_records
