"""Scalars to TensorBoard event files (tensorboardX: no TensorFlow needed) and to a JSON-lines file.

Only process 0 writes. On resume, `truncate_after(step)` drops JSON lines of steps the restored state has not
done yet, so the file never shows a step twice.

The workdir may be local or a URI (gs://..., through `medbind_jax.paths`). Locally, `metrics.jsonl` is appended to
line by line, as before. Object stores cannot append, so for a URI workdir the writer keeps every line in memory
(starting from the file's current content) and rewrites the whole object at most every `flush_secs` seconds and on
`truncate_after`, `flush` and `close`: a crash loses at most the last `flush_secs` of lines (the resumed run
re-logs the steps after its checkpoint anyway). TensorBoard event files go the same way: tensorboardX picks an
event-file writer by URI scheme (`tensorboardX.record_writer.register_writer_factory`); for the workdir's scheme
this module registers one over epath that rewrites the whole event file on each of tensorboardX's flushes
(every 120 s and on close; scalar event files are small), replacing tensorboardX's own gs:// / s3:// writers,
which need google-cloud-storage / boto3.
"""

from __future__ import annotations

import io
import json
import math
import time
from typing import Mapping

import jax

from medbind_jax import paths

METRICS_FILE = "metrics.jsonl"


def _lines_up_to(lines, step: int) -> list[str]:
  """The JSON lines of steps <= `step` (blank lines dropped)."""
  return [line for line in lines if line.strip() and json.loads(line)["step"] <= step]


class MetricWriter:

  def __init__(self, workdir: str, *, flush_secs: float = 30.0):
    self.enabled = jax.process_index() == 0
    self.path = paths.join(workdir, METRICS_FILE)
    self._local = paths.is_local(workdir)
    self._flush_secs = flush_secs
    self._lines: list[str] | None = None  # a URI workdir's whole file, once read
    self._dirty, self._flushed_at = False, time.monotonic()
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      if not self._local:
        _register_event_file_writer(workdir)
      self._tb = SummaryWriter(paths.join(workdir, "tensorboard"))

  def _remote_lines(self) -> list[str]:
    if self._lines is None:
      self._lines = paths.read_text(self.path).splitlines(keepends=True) if paths.exists(self.path) else []
    return self._lines

  def truncate_after(self, step: int) -> None:
    if not self.enabled:
      return
    if not self._local:
      lines = self._remote_lines()
      self._lines = _lines_up_to(lines, step)
      self._dirty = self._dirty or self._lines != lines
      self.flush()
      return
    if not paths.exists(self.path):
      return
    with paths.open_file(self.path) as f:
      kept = _lines_up_to(f, step)
    paths.write_text_atomic(self.path, "".join(kept))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for name, value in scalars.items():
      value = float(value)
      row[name] = value if math.isfinite(value) else str(value)
      self._tb.add_scalar(name, value, int(step))
    line = json.dumps(row) + "\n"
    if self._local:
      with paths.open_file(self.path, "a") as f:
        f.write(line)
      return
    self._remote_lines().append(line)
    self._dirty = True
    if time.monotonic() - self._flushed_at >= self._flush_secs:
      self.flush()

  def flush(self) -> None:
    """Writes what a URI workdir's metrics.jsonl holds so far (local files are always up to date)."""
    if self.enabled and not self._local and self._dirty:
      paths.write_text_atomic(self.path, "".join(self._remote_lines()))
      self._dirty, self._flushed_at = False, time.monotonic()

  def close(self) -> None:
    self.flush()
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None


class _EventFile:
  """tensorboardX's event-file interface (write / flush / close) over epath, for object stores: the file's bytes
  are kept in memory and the whole object is rewritten on each flush that has something new."""

  def __init__(self, path: str):
    self._path, self._buffer, self._written = path, io.BytesIO(), 0

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    if self._buffer.tell() != self._written:
      paths.write_bytes_atomic(self._path, self._buffer.getvalue())
      self._written = self._buffer.tell()

  def close(self) -> None:
    self.flush()


class _EventFiles:
  """The writer factory tensorboardX's `record_writer` looks up by URI scheme."""

  def open(self, path: str) -> _EventFile:
    return _EventFile(path)

  def directory_check(self, path: str) -> None:
    paths.makedirs(path)


def _register_event_file_writer(workdir: str) -> None:
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  record_writer.register_writer_factory(str(workdir).split("://", 1)[0], _EventFiles())
