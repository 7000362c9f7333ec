"""Files the project reads and writes, local or in object stores, through `etils.epath`.

A path is a string (or `os.PathLike`): a local path, or a URI `gs://bucket/...`, `s3://bucket/...`, `az://...`
(epath sends these to fsspec, or to TensorFlow's gfile when TensorFlow is installed; the scheme's fsspec package,
gcsfs / s3fs / adlfs, must be installed). Local paths behave exactly as with `open` / `os`.

What differs on object stores, and how this module keeps callers the same:
  - Atomic replacement. Locally a file is written to a temporary file of this process (flushed and fsynced) and
    renamed over the target (`os.replace`): a reader never sees half a file. An object store has no rename, but an
    object written in one request appears whole or not at all, so `write_bytes_atomic` writes the target directly
    there. Streamed writes (shards) still go through a temporary object and `replace` (a server-side copy + delete),
    so that an interrupted or aborted writer leaves only the temporary name behind, never a partial target.
  - Appending. Object stores cannot append; `metric_writer.MetricWriter` keeps the lines in memory and rewrites
    the whole object instead (see there).
  - Directories do not exist on object stores: `makedirs` is harmless there (epath/fsspec make it a no-op, or a
    marker), and a "directory" exists once a file lies under it.

For local paths, `file_size` and `list_files` call `os` directly (same results): epath's local `stat` also looks up
the owner's user name, which fails for a uid without a passwd entry (common in containers), and `os.walk` is what
epath's local walk is. epath's fsspec `walk` is not used: it yields roots without their scheme.
"""

from __future__ import annotations

import os
import uuid
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_local(path: PathLike) -> bool:
  """True for a local path, False for a URI (`gs://...`, `s3://...`)."""
  return "://" not in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path` (local or URI; str() gives the same string back, normalised)."""
  return path if isinstance(path, epath.Path) else epath.Path(os.fspath(path))


def join(base: PathLike, *names: str) -> str:
  """`base/name/...` as a string, for local paths and URIs alike (`os.path.join` of the parts for local ones)."""
  if is_local(base):
    return os.path.join(os.fspath(base), *names)
  return os.fspath(as_path(base).joinpath(*names))


def absolute(path: PathLike) -> str:
  """A local path made absolute; a URI as it is."""
  return os.path.abspath(path) if is_local(path) else os.fspath(as_path(path))


def makedirs(path: PathLike) -> None:
  """Creates a directory and its parents (no error when it exists)."""
  as_path(path).mkdir(parents=True, exist_ok=True)


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def is_file(path: PathLike) -> bool:
  """True for an existing file (an object, not a directory prefix)."""
  p = as_path(path)
  return p.exists() and not p.is_dir()


def list_files(folder: PathLike) -> list[str]:
  """Every file under `folder`, recursively (`os.walk` locally; directory listings on object stores)."""
  if is_local(folder):
    return [os.path.join(root, n) for root, _, files in os.walk(folder) for n in files]
  out, stack = [], [as_path(folder)]
  while stack:
    for child in stack.pop().iterdir():
      if child.is_dir():
        stack.append(child)
      else:
        out.append(os.fspath(child))
  return out


def file_size(path: PathLike) -> int:
  """Size in bytes (FileNotFoundError when absent)."""
  if is_local(path):
    return os.path.getsize(path)
  return int(as_path(path).stat().length)


def remove(path: PathLike, *, missing_ok: bool = True) -> None:
  as_path(path).unlink(missing_ok=missing_ok)


def replace(src: PathLike, dst: PathLike) -> None:
  """Moves file `src` over `dst` (`os.replace` locally; copy + delete on object stores)."""
  as_path(src).replace(as_path(dst))


def temporary_name(path: PathLike) -> str:
  """A temporary file name beside `path`, unique to this process and call."""
  return f"{os.fspath(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old file or the new one, never a partial one (module
  docstring): locally a temporary file, fsynced and renamed into place; on object stores one object write."""
  if not is_local(path):
    as_path(path).write_bytes(data)
    return
  tmp = as_path(temporary_name(path))
  try:
    with tmp.open("wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    tmp.replace(path)
  finally:
    tmp.unlink(missing_ok=True)


def write_text_atomic(path: PathLike, text: str) -> None:
  """`write_bytes_atomic` of `text` in UTF-8."""
  write_bytes_atomic(path, text.encode("utf-8"))


def read_text(path: PathLike) -> str:
  return as_path(path).read_text(encoding="utf-8")


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def open_file(path: PathLike, mode: str = "r"):
  """`open(path, mode)` for local paths and URIs (text modes in UTF-8). Binary read handles are seekable on every
  backend (fsspec files read ahead in blocks)."""
  return as_path(path).open(mode)
