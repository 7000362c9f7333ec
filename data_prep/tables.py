"""Source tables, paths and splits: `read_csv` (plain or gzipped CSV, all values as str), `find_file`,
`hash_split`, `epoch_seconds`, `read_bytes`.

Files are read through `medbind_jax.paths` (etils.epath), so tables, images and report files may lie under a URI
(gs://...) as well as locally; WFDB records (`ecg_io`) are read by wfdb from local files only."""

from __future__ import annotations

import calendar
import csv
import datetime
import gzip
import hashlib
import io
import math
from typing import Sequence

from data_prep.errors import RecordError
from medbind_jax import paths


def find_file(directory: str, name: str, *, required: bool = True) -> str | None:
  """`directory/name`, or `directory/name.gz` when only the gzipped copy is there."""
  for candidate in (name, name + ".gz") if not name.endswith(".gz") else (name, name[:-3]):
    path = paths.join(directory, candidate)
    if paths.is_file(path):
      return path
  if required:
    raise FileNotFoundError(f"{name} (or {name}.gz) not found in {directory}: is --src the dataset root as "
                            "distributed?")
  return None


def read_csv(path: str, columns: Sequence[str] = ()) -> list[dict[str, str]]:
  """Rows of a CSV (gzipped when the name ends in .gz) as dicts of str; blank cells are ''.

  Raises ValueError naming the file when one of `columns` is missing from its header.
  """
  with paths.open_file(path, "rb") as raw, \
      io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw, encoding="utf-8",
                       newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: missing columns {missing}; it has {reader.fieldnames}")
    return list(reader)


def hash_split(key: str, fractions: Sequence[float] = (0.8, 0.1, 0.1), salt: str = "medbind") -> str:
  """A split from a hash of `key` (e.g. a subject id): stable across runs, machines and dataset versions."""
  digest = hashlib.sha256(f"{salt}/{key}".encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "little") / 2.0 ** 64
  train, val, _ = fractions
  return "train" if u < train else "val" if u < train + val else "test"


def epoch_seconds(text: str, fmt: str = "%Y-%m-%d %H:%M:%S") -> float:
  """Seconds since 1970-01-01 of a timestamp read as UTC (MIMIC's shifted dates included); NaN when blank or
  not in `fmt`."""
  try:
    stamp = datetime.datetime.strptime(text.strip(), fmt)
  except (ValueError, AttributeError):
    return math.nan
  return float(calendar.timegm(stamp.timetuple())) + stamp.microsecond / 1e6


def read_bytes(path: str, what: str) -> bytes:
  """The file's bytes; RecordError('missing {what} file ...') when it does not exist or cannot be read."""
  try:
    return paths.read_bytes(path)
  except FileNotFoundError as err:
    raise RecordError("missing file", f"{what} {path}") from err
  except OSError as err:
    raise RecordError("unreadable file", f"{what} {path}: {err}") from err
