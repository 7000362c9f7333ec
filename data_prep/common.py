"""Shared machinery of the real-dataset converters (`data_prep/<dataset>.py`): one place for each thing.

A converter does two things: it *plans* (reads the source's tables and lists one small picklable task per output
record, each with a `record_id` and a `split`) and it *converts* one task into a `schema.Encounter` (a module-level
function, so worker processes can run it). Everything else lives here:

  CLI            `add_common_args` / `options_from_args`: --src --out --workers --shard-size --max-error-rate
                 --overwrite --no-progress, plus --sampling-rate --num-samples (ECG) and --image-size (CXR).
  Running        `run_conversion`: deterministic shards, a parallel map over records with a progress bar,
                 the per-run error log, resume, `dataset_info.json`, the end-of-run summary and the exit code.
  ECG            `read_wfdb`, `canonical_lead_order`, `prepare_ecg` (resample, crop, checks), `quantize_ecg`.
  CXR images     `prepare_image` (decode check, optional downscale to PNG).
  Text           `report_sections` (MIMIC-CXR style FINDINGS / IMPRESSION), `cxr_report_text`,
                 `join_statements` (ECG machine statements).
  Tables         `read_csv` (plain or gzipped CSV, all values as str), `find_file`, `hash_split`.

Output of a run in `--out`:

  {split}.tfrecord-NNNNN-of-MMMMM   shards (`schema.shard_name`); a record's shard is fixed by the plan alone
  dataset_info.json                 counts per split, label names, provenance, options, error counts
  errors.jsonl                      one JSON object per failed record: {"record_id", "split", "kind", "reason"}
  convert_state.json                the resume manifest: the plan's fingerprint and each finished shard's
                                    counts, size and errors

Determinism and resume: tasks are sorted by (split, record_id) and cut into consecutive shards of `--shard-size`
tasks, so the shard of a record depends only on the plan, never on worker timing; a record that fails leaves its
shard one record shorter. Each shard is written to `name.tmp` and renamed when complete (`TFRecordWriter`), then
recorded in `convert_state.json`. A re-run with the same plan and options keeps every shard whose final file
exists with the size and record count the manifest lists, and redoes the rest (missing files, stray `.tmp`
files, shards the manifest does not list): the output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import csv
import dataclasses
import datetime
import functools
import gzip
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import time
import types
from fractions import Fraction
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from scipy import signal as scipy_signal
import tqdm

from medbind_jax.data import schema, tfrecord

log = logging.getLogger(__name__)

STATE_FILE = "convert_state.json"
ERRORS_FILE = "errors.jsonl"
INT16_MAX = 32767
FLAT_PTP_MV = 1e-3  # a lead whose peak-to-peak is below 1 uV over the whole record counts as flat (disconnected)
_ERRORS_SHOWN = 10  # errors printed while running; all of them go to errors.jsonl


class RecordError(Exception):
  """A source record that cannot be converted.

  `kind` is a short fixed category ("missing file", "empty report", ...) counted in dataset_info.json; the
  message (`kind: detail`) is the reason written to the error log.
  """

  def __init__(self, kind: str, detail: str = ""):
    self.kind, self.detail = kind, detail
    super().__init__(f"{kind}: {detail}" if detail else kind)


# ================================================================================================================
# Options and CLI
# ================================================================================================================


@dataclasses.dataclass(frozen=True)
class Options:
  """Options shared by all converters.

  shard_size, sampling_rate, num_samples and image_size change the output (they are part of the resume
  fingerprint); workers, max_error_rate, progress and overwrite do not.
  """

  shard_size: int = 1000  # records per shard (tasks per shard: failed records leave a shard shorter)
  workers: int = 1  # processes; 1 converts in this process
  max_error_rate: float = 0.05  # exit non-zero when failed / planned records exceeds this
  sampling_rate: float = 500.0  # ECG output rate, Hz
  num_samples: int = 5000  # ECG output length: longer records keep their first num_samples; 0 keeps all
  image_size: int = 512  # CXR: longest side above this is downscaled (to PNG); 0 keeps the original bytes
  progress: bool = True
  overwrite: bool = False  # replace the output of a run with another plan or options instead of refusing

  def __post_init__(self):
    if self.shard_size < 1:
      raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
    if not 0.0 <= self.max_error_rate <= 1.0:
      raise ValueError(f"--max-error-rate must lie in [0, 1], got {self.max_error_rate}")
    if not self.sampling_rate > 0:
      raise ValueError(f"--sampling-rate must be positive, got {self.sampling_rate}")
    if self.num_samples < 0 or self.image_size < 0:
      raise ValueError("--num-samples and --image-size must be >= 0 (0: keep the source's)")

  def output_options(self) -> dict:
    """The options that change the bytes written (recorded in dataset_info.json and the fingerprint)."""
    return {"shard_size": self.shard_size, "sampling_rate": self.sampling_rate, "num_samples": self.num_samples,
            "image_size": self.image_size}


def add_common_args(parser: argparse.ArgumentParser, *, ecg: bool = False, cxr: bool = False,
                    src_help: str = "dataset root, laid out as distributed (see the module docstring)") -> None:
  defaults = Options()
  parser.add_argument("--src", required=True, help=src_help)
  parser.add_argument("--out", required=True, help="output directory for shards and dataset_info.json")
  parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                      help="worker processes (1: convert in this process); the output does not depend on it")
  parser.add_argument("--shard-size", type=int, default=defaults.shard_size, help="records per shard")
  parser.add_argument("--max-error-rate", type=float, default=defaults.max_error_rate,
                      help="exit with status 1 when the share of failed records exceeds this")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an output directory converted with another plan or other options")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  if ecg:
    parser.add_argument("--sampling-rate", type=float, default=defaults.sampling_rate,
                        help="ECG output sampling rate in Hz (polyphase resampling when it differs)")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples,
                        help="ECG output length in samples: longer records keep the first ones; 0 keeps all")
  if cxr:
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help="downscale images whose longest side exceeds this (re-encoded as 8-bit PNG); "
                             "0 keeps the original bytes")


def options_from_args(args: argparse.Namespace) -> Options:
  defaults = Options()
  return Options(shard_size=args.shard_size, workers=max(1, args.workers), max_error_rate=args.max_error_rate,
                 sampling_rate=getattr(args, "sampling_rate", defaults.sampling_rate),
                 num_samples=getattr(args, "num_samples", defaults.num_samples),
                 image_size=getattr(args, "image_size", defaults.image_size),
                 progress=not args.no_progress, overwrite=args.overwrite)


def parse_fractions(text: str) -> tuple[float, float, float]:
  """'0.8,0.1,0.1' -> (train, val, test) fractions; they must be non-negative and sum to 1."""
  parts = tuple(float(x) for x in text.split(","))
  if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6:
    raise argparse.ArgumentTypeError(f"expected three non-negative fractions summing to 1, got {text!r}")
  return parts


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


# ================================================================================================================
# Tables, paths, splits
# ================================================================================================================


def find_file(directory: str, name: str, *, required: bool = True) -> str | None:
  """`directory/name`, or `directory/name.gz` when only the gzipped copy is there."""
  for candidate in (name, name + ".gz") if not name.endswith(".gz") else (name, name[:-3]):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  if required:
    raise FileNotFoundError(f"{name} (or {name}.gz) not found in {directory}: is --src the dataset root as "
                            "distributed?")
  return None


def read_csv(path: str, columns: Sequence[str] = ()) -> list[dict[str, str]]:
  """Rows of a CSV (gzipped when the name ends in .gz) as dicts of str; blank cells are ''.

  Raises ValueError naming the file when one of `columns` is missing from its header.
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8", newline="") as f:
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
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError as err:
    raise RecordError("missing file", f"{what} {path}") from err
  except OSError as err:
    raise RecordError("unreadable file", f"{what} {path}: {err}") from err


# ================================================================================================================
# ECG
# ================================================================================================================

# Bytes per sample of the WFDB storage formats whose file size can be checked before reading.
_WFDB_BYTES_PER_SAMPLE = {"8": 1, "16": 2, "61": 2, "80": 1, "160": 2, "212": 1.5, "24": 3, "32": 4}
_UNITS_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "v": 1e3}


@dataclasses.dataclass
class EcgSignal:
  """An ECG as read from its source: `signal_mv` float64 [num_samples, num_leads] in millivolts."""

  signal_mv: np.ndarray
  leads: list[str]
  sampling_rate: float
  comments: list[str] = dataclasses.field(default_factory=list)


def read_wfdb(record_path: str) -> EcgSignal:
  """Reads a WFDB record (`record_path` without extension; `.hea` with `.dat` or MATLAB v4 `.mat` signals).

  Checks, each raising RecordError with the reason: header and signal files present; signal files as long as
  the header says (a truncated file); the header's per-signal checksums where it has them (damaged contents);
  physical units known. Samples wfdb marks invalid come back as NaN (see `prepare_ecg`).
  """
  import wfdb  # pylint: disable=import-outside-toplevel  (heavy; only ECG converters need it)

  header_path = record_path + ".hea"
  if not os.path.isfile(header_path):
    raise RecordError("missing file", f"header {header_path}")
  try:
    header = wfdb.rdheader(record_path)
  except Exception as err:  # wfdb raises many types on a bad header
    raise RecordError("unreadable header", f"{header_path}: {err}") from err
  if not header.n_sig or not header.sig_len:
    raise RecordError("empty signal", f"{header_path} has n_sig={header.n_sig}, sig_len={header.sig_len}")
  directory = os.path.dirname(record_path)
  per_file: dict[str, list[int]] = {}
  for i, name in enumerate(header.file_name):
    per_file.setdefault(name, []).append(i)
  for name, channels in per_file.items():
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise RecordError("missing file", f"signal {path}")
    width = _WFDB_BYTES_PER_SAMPLE.get(str(header.fmt[channels[0]]))
    if width is not None:
      offset = (header.byte_offset[channels[0]] or 0) if header.byte_offset else 0
      need = offset + int(math.ceil(header.sig_len * len(channels) * width))
      have = os.path.getsize(path)
      if have < need:
        raise RecordError("truncated signal file", f"{path} has {have} bytes, the header needs {need}")
  try:
    record = wfdb.rdrecord(record_path, physical=False)
  except Exception as err:
    raise RecordError("unreadable signal", f"{record_path}: {err}") from err
  digital = record.d_signal
  if digital is None or digital.shape != (header.sig_len, header.n_sig):
    raise RecordError("unreadable signal", f"{record_path}: read {None if digital is None else digital.shape} "
                      f"samples, the header says ({header.sig_len}, {header.n_sig})")
  if record.checksum is not None:
    sums = np.sum(digital, axis=0, dtype=np.int64) % 65536
    bad = [record.sig_name[i] for i, want in enumerate(record.checksum)
           if want is not None and sums[i] != int(want) % 65536]
    if bad:
      raise RecordError("checksum mismatch", f"leads {bad} of {record_path} (damaged signal file)")
  signal_mv = record.dac(return_res=64)
  scale = []
  for unit in record.units:
    factor = _UNITS_TO_MV.get(str(unit).strip().lower())
    if factor is None:
      raise RecordError("unknown units", f"{record_path}: {unit!r} (expected mV, uV or V)")
    scale.append(factor)
  return EcgSignal(signal_mv * np.asarray(scale), list(record.sig_name), float(record.fs),
                   list(record.comments or []))


def lead_key(name: str) -> str:
  """Normalised lead name: case, spaces, '-' / '_' and a leading 'lead' ignored ('AVR', 'aVR', 'Lead_avr')."""
  key = re.sub(r"[\s_\-]", "", str(name)).lower()
  return key[4:] if key.startswith("lead") and len(key) > 4 else key


_CANONICAL_KEYS = {lead_key(lead): i for i, lead in enumerate(schema.LEADS_12)}


def canonical_lead_order(leads: Sequence[str]) -> list[int]:
  """Column index of each of `schema.LEADS_12` in `leads`, matched by name (never by position).

  Leads beyond the 12 (e.g. Frank vx/vy/vz) are ignored. RecordError when a lead is missing or named twice.
  """
  found: dict[int, int] = {}
  for column, name in enumerate(leads):
    canonical = _CANONICAL_KEYS.get(lead_key(name))
    if canonical is None:
      continue
    if canonical in found:
      raise RecordError("duplicate lead", f"{schema.LEADS_12[canonical]} appears twice in {list(leads)}")
    found[canonical] = column
  missing = [lead for i, lead in enumerate(schema.LEADS_12) if i not in found]
  if missing:
    raise RecordError("missing leads", f"{missing}; the record has {list(leads)}")
  return [found[i] for i in range(len(schema.LEADS_12))]


def resample(signal_mv: np.ndarray, rate_in: float, rate_out: float) -> np.ndarray:
  """Polyphase resampling along time (scipy.signal.resample_poly, rate ratio as a fraction of denominator
  <= 1000); the identity when the rates are equal."""
  if rate_in == rate_out:
    return signal_mv
  ratio = Fraction(rate_out / rate_in).limit_denominator(1000)
  return scipy_signal.resample_poly(signal_mv, ratio.numerator, ratio.denominator, axis=0)


# How ECGs are stored, as dataset_info.json states it (see `quantize_ecg`).
ECG_STORAGE = ("int16 samples [num_samples, 12] in I, II, III, aVR, aVL, aVF, V1-V6 order with a float32 gain "
               "per lead (ADC units per mV, value_mV = sample / gain) chosen so the lead's peak |value| maps to "
               "32767: |stored - source| <= 0.5 / gain mV (+ float32 rounding), i.e. <= 0.5 uV for leads within "
               "+-32.7 mV; resampled with scipy.signal.resample_poly to conversion_options.sampling_rate and cut "
               "to the first conversion_options.num_samples")


def quantize_ecg(signal_mv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """float [T, L] millivolts -> (int16 samples [T, L], float32 gain [L] in ADC units per mV).

  Each lead gets the largest gain that maps its peak |value| to at most 32767, so nothing clips and
  `samples / gain` differs from the input by at most 0.5 / gain = peak / 65534 mV per lead (plus float32
  rounding, ~1e-7 relative): 0.15 uV for a lead peaking at 10 mV, and at most 0.5 uV for any lead within
  +-32.8 mV. For an int16 source of gain G with zero baseline, peak * G <= 32767, so the gain here is >= G:
  without resampling, rounding `samples / gain * G` recovers the source's ADC values.
  """
  peak = np.max(np.abs(signal_mv), axis=0)
  gain = np.float32(INT16_MAX) / np.maximum(peak, 1e-12).astype(np.float32)
  gain = np.where(peak > 0, gain, np.float32(1.0)).astype(np.float32)
  while True:
    samples = np.rint(signal_mv * gain.astype(np.float64))
    over = np.max(np.abs(samples), axis=0) > INT16_MAX  # float32 rounding of the gain went up
    if not over.any():
      return samples.astype(np.int16), gain
    gain = np.where(over, np.nextafter(gain, np.float32(0)), gain).astype(np.float32)


@dataclasses.dataclass
class PreparedEcg:
  """ECG fields of a record: int16 samples [num_samples, 12] in `schema.LEADS_12` order."""

  samples: np.ndarray
  gain: list[float]
  sampling_rate: float

  def fields(self) -> dict:
    """Keyword arguments of `schema.Encounter` for the ECG payload."""
    return {"ecg_samples": self.samples, "ecg_gain": self.gain, "ecg_leads": schema.LEADS_12,
            "ecg_sampling_rate": self.sampling_rate}


def prepare_ecg(ecg: EcgSignal, options: Options) -> PreparedEcg:
  """Source ECG -> stored form: 12 leads by name, checked, resampled, cropped, quantised.

  Order: leads reordered into `schema.LEADS_12` by name; non-finite samples rejected; the whole record
  resampled to `options.sampling_rate` (`resample`); the first `options.num_samples` kept (shorter records keep
  their length: the training pipeline pads); flat leads (peak-to-peak < 1 uV) rejected; `quantize_ecg`.
  """
  columns = canonical_lead_order(ecg.leads)
  signal_mv = np.asarray(ecg.signal_mv, np.float64)[:, columns]
  bad = ~np.isfinite(signal_mv)
  if bad.any():
    leads = [schema.LEADS_12[i] for i in np.flatnonzero(bad.any(axis=0))]
    raise RecordError("non-finite samples", f"{int(bad.sum())} in leads {leads}")
  if not ecg.sampling_rate > 0:
    raise RecordError("bad sampling rate", f"{ecg.sampling_rate}")
  signal_mv = resample(signal_mv, ecg.sampling_rate, options.sampling_rate)
  if options.num_samples:
    signal_mv = signal_mv[:options.num_samples]
  if signal_mv.shape[0] < 2:
    raise RecordError("empty signal", f"{signal_mv.shape[0]} samples after resampling")
  flat = np.ptp(signal_mv, axis=0) < FLAT_PTP_MV
  if flat.any():
    raise RecordError("flat leads", f"{[schema.LEADS_12[i] for i in np.flatnonzero(flat)]} (peak-to-peak "
                      f"below {FLAT_PTP_MV * 1000:g} uV)")
  samples, gain = quantize_ecg(signal_mv)
  return PreparedEcg(samples, [float(g) for g in gain], float(options.sampling_rate))


def wfdb_ecg(record_path: str, options: Options) -> PreparedEcg:
  """`prepare_ecg(read_wfdb(record_path), options)`."""
  return prepare_ecg(read_wfdb(record_path), options)


# ================================================================================================================
# CXR images
# ================================================================================================================

MIN_IMAGE_SIDE = 32


def _to_gray8(image: Image.Image) -> Image.Image:
  """8-bit grayscale; 16/32-bit images are min-max scaled to 0..255 (chest X-rays are grayscale)."""
  if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
    arr = np.asarray(image, np.float64)
    low, high = float(arr.min()), float(arr.max())
    arr = (arr - low) / (high - low) * 255.0 if high > low else np.zeros_like(arr)
    return Image.fromarray(np.rint(arr).astype(np.uint8))
  return image.convert("L")


def prepare_image(data: bytes, image_size: int, name: str = "image") -> bytes:
  """Checks that `data` decodes and returns the bytes to store.

  Kept as they are (no re-compression) when they are an 8-bit grayscale/RGB PNG or JPEG and either
  `image_size` is 0 or the longest side is at most `image_size`. Otherwise converted to 8-bit grayscale, resized
  (Lanczos, aspect kept) so the longest side is `image_size` when it was larger, and stored as PNG (lossless
  from there on). RecordError when the image cannot be decoded or is smaller than 32 px.
  """
  if not data:
    raise RecordError("unreadable image", f"{name} is empty")
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as err:  # PIL raises several types on bad data
    raise RecordError("unreadable image", f"{name}: {err}") from err
  width, height = image.size
  if min(width, height) < MIN_IMAGE_SIDE:
    raise RecordError("image too small", f"{name} is {width}x{height}, under {MIN_IMAGE_SIDE} px")
  fits = image_size == 0 or max(width, height) <= image_size
  if fits and image.format in ("PNG", "JPEG") and image.mode in ("L", "RGB"):
    return data
  image = _to_gray8(image)
  if not fits:
    scale = image_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
  out = io.BytesIO()
  image.save(out, format="PNG")
  return out.getvalue()


# ================================================================================================================
# Text
# ================================================================================================================

# A section header: an upper-case phrase at the start of a line followed by a colon ("FINDINGS:", "IMPRESSION:",
# "FINDINGS AND IMPRESSION:"). Header lines without a colon ("FINAL REPORT") are not sections.
_SECTION = re.compile(r"^[ \t]*([A-Z][A-Z /&(),-]*[A-Z)])[ \t]*:", re.MULTILINE)


def collapse_whitespace(text: str) -> str:
  return " ".join(text.split())


def report_sections(report: str) -> dict[str, str]:
  """Sections of a free-text radiology report, {HEADER: text with whitespace collapsed}.

  A section runs from its header to the next header; a repeated header keeps its first occurrence.
  """
  sections: dict[str, str] = {}
  matches = list(_SECTION.finditer(report))
  for k, match in enumerate(matches):
    end = matches[k + 1].start() if k + 1 < len(matches) else len(report)
    header = collapse_whitespace(match.group(1))
    sections.setdefault(header, collapse_whitespace(report[match.end():end]))
  return sections


def findings_impression(report: str) -> tuple[str, str]:
  """(findings, impression) of a MIMIC-CXR style report; '' where absent. A combined 'FINDINGS AND IMPRESSION'
  section counts as findings."""
  sections = report_sections(report)
  findings = sections.get("FINDINGS") or sections.get("FINDINGS AND IMPRESSION") or \
      sections.get("IMPRESSION AND FINDINGS") or ""
  return findings, sections.get("IMPRESSION", "")


def cxr_report_text(findings: str, impression: str) -> str:
  """The stored CXR report: findings then impression, each with whitespace collapsed, joined by one space.

  RecordError('empty report') when both are blank.
  """
  text = " ".join(collapse_whitespace(part) for part in (findings, impression) if part and part.strip())
  if not text:
    raise RecordError("empty report", "no FINDINGS or IMPRESSION text")
  return text


def join_statements(statements: Iterable[str]) -> str:
  """ECG machine statements -> one text: each stripped, blanks dropped, a '.' added where a statement does not
  end in punctuation, joined by single spaces ('Sinus rhythm', 'Normal ECG' -> 'Sinus rhythm. Normal ECG.')."""
  parts = []
  for statement in statements:
    statement = collapse_whitespace(statement or "")
    if statement:
      parts.append(statement if statement[-1] in ".!?;:" else statement + ".")
  return " ".join(parts)


# ================================================================================================================
# Running a conversion
# ================================================================================================================


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What dataset_info.json says about a converted dataset."""

  name: str  # dataset_info name and each record's `dataset` field
  version: str  # bump when the converter's output changes for the same input (part of the fingerprint)
  source: str
  licence: str
  citation: str
  description: str = ""
  cxr_label_names: tuple[str, ...] = ()
  ecg_label_names: tuple[str, ...] = ()


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
  digest.update(json.dumps({"dataset": spec.name, "version": spec.version, "options": options.output_options(),
                            "params": params}, sort_keys=True, default=str).encode("utf-8"))
  for split, record_id in plan:
    digest.update(f"\n{split}\t{record_id}".encode("utf-8"))
  return digest.hexdigest()


def _write_json(path: str, value: Any) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


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
  path = os.path.join(out_dir, file)
  if entry is None or not os.path.isfile(path) or os.path.getsize(path) != entry["bytes"]:
    return False
  try:
    scan = tfrecord.scan_tfrecord(path, verify_data=False)
  except tfrecord.CorruptRecordError:
    return False
  return len(scan.frames) == entry["num_examples"]


def _remove_previous_output(out_dir: str, state: Mapping) -> None:
  """Removes what a previous run listed (shards, their .tmp files, dataset_info, error log, manifest)."""
  for file in state.get("shards", {}):
    for path in (os.path.join(out_dir, file), os.path.join(out_dir, file + ".tmp")):
      if os.path.exists(path):
        os.remove(path)
  for name in (schema.DATASET_INFO, ERRORS_FILE, STATE_FILE):
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
      os.remove(path)


def _prepare_out_dir(out_dir: str, spec: DatasetSpec, fingerprint: str, options: Options) -> dict:
  """The resume manifest to continue from ({} for a fresh start); refuses to mix runs of different plans."""
  os.makedirs(out_dir, exist_ok=True)
  state_path = os.path.join(out_dir, STATE_FILE)
  state = _read_json(state_path) if os.path.isfile(state_path) else None
  if state is None:
    info_path = os.path.join(out_dir, schema.DATASET_INFO)
    if os.path.isfile(info_path) and _read_json(info_path).get("name") != spec.name and not options.overwrite:
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


def _convert_one(convert: Callable[[Any, Options], schema.Encounter], options: Options,
                 task: Any) -> tuple[bool, Any, tuple]:
  """(True, serialised record, (has_cxr, has_ecg, linked)) or (False, (kind, reason), ()). Never raises for a
  bad record: any exception becomes its reason, so one record cannot stop a run of hundreds of thousands."""
  try:
    enc = convert(task, options)
    if enc.split != task.split:
      raise RecordError("converter bug", f"returned split {enc.split!r} for a task of split {task.split!r}")
    return True, schema.encode_encounter(enc), (enc.has_cxr, enc.has_ecg, bool(enc.linked))
  except RecordError as err:
    return False, (err.kind, str(err)), ()
  except Exception as err:  # pylint: disable=broad-except
    return False, (f"unexpected {type(err).__name__}", f"unexpected {type(err).__name__}: {err}"), ()


def _map_records(convert, options: Options, tasks: Sequence[Any], workers: int) -> Iterator[tuple]:
  """`_convert_one` over `tasks`, in order: in this process (workers <= 1) or in a 'spawn' pool (safe when the
  caller holds threads, e.g. JAX's)."""
  fn = functools.partial(_convert_one, convert, options)
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
  state_path = os.path.join(out_dir, STATE_FILE)

  pending: list[tuple[str, list[Any]]] = []
  reused: list[str] = []
  for split in schema.SPLITS:
    for file, shard_tasks in plan[split]:
      if _shard_is_finished(out_dir, file, state["shards"].get(file)):
        reused.append(file)
        continue
      state["shards"].pop(file, None)
      for path in (os.path.join(out_dir, file), os.path.join(out_dir, file + ".tmp")):
        if os.path.exists(path):
          os.remove(path)
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
      tqdm.tqdm.write(f"(further errors go to {os.path.join(out_dir, ERRORS_FILE)} only)", file=sys.stderr)
    shown[0] += 1
    return {"record_id": record_id, "split": split, "kind": kind, "reason": reason}

  plan_error_log = [note_error(record_id, split, err.kind, str(err)) for record_id, split, err in plan_errors]
  all_tasks = [t for _, ts in pending for t in ts]
  results = _map_records(convert, options, all_tasks, min(options.workers, max(1, len(all_tasks))))
  with tqdm.tqdm(total=num_tasks, unit="rec", desc=spec.name, disable=not options.progress) as bar, \
      contextlib.closing(results):
    for file, shard_tasks in pending:
      stats = schema.ShardStats(file=file)
      shard_errors = []
      with tfrecord.TFRecordWriter(os.path.join(out_dir, file)) as writer:
        for task in shard_tasks:
          ok, payload, flags = next(results)
          if ok:
            writer.write(payload)
            stats.add(types.SimpleNamespace(has_cxr=flags[0], has_ecg=flags[1], linked=flags[2]))
          else:
            shard_errors.append(note_error(task.record_id, task.split, *payload))
          bar.update(1)
      state["shards"][file] = {**dataclasses.asdict(stats), "bytes": os.path.getsize(os.path.join(out_dir, file)),
                               "errors": shard_errors}
      _write_json(state_path, state)
      bar.set_postfix(errors=shown[0])

  # Everything below is recomputed from the manifest, so a resumed run ends exactly like an uninterrupted one.
  errors = list(plan_error_log)
  shards: dict[str, list[schema.ShardStats]] = {split: [] for split in schema.SPLITS}
  for split in schema.SPLITS:
    for file, _ in plan[split]:
      entry = state["shards"][file]
      shards[split].append(schema.ShardStats(file=file, **{k: entry[k] for k in (
          "num_examples", "num_cxr", "num_ecg", "num_linked")}))
      errors.extend(entry["errors"])
  errors = [{key: error[key] for key in ("record_id", "split", "kind", "reason")} for error in errors]
  errors_path = os.path.join(out_dir, ERRORS_FILE)
  with open(errors_path + ".tmp", "w", encoding="utf-8") as f:
    for error in errors:
      f.write(json.dumps(error, ensure_ascii=False) + "\n")
  os.replace(errors_path + ".tmp", errors_path)

  num_planned = len(tasks) + len(plan_errors)
  error_rate = len(errors) / num_planned if num_planned else 0.0
  by_kind: dict[str, int] = {}
  for error in errors:
    by_kind[error["kind"]] = by_kind.get(error["kind"], 0) + 1
  info = schema.write_dataset_info(
      out_dir, name=spec.name, shards=shards, cxr_label_names=spec.cxr_label_names,
      ecg_label_names=spec.ecg_label_names, source=spec.source, licence=spec.licence, citation=spec.citation,
      description=spec.description, converter=f"data_prep/{spec.name}.py", converter_version=spec.version,
      conversion_options={**options.output_options(), **params}, fingerprint=fingerprint,
      errors={"num_errors": len(errors), "num_planned": num_planned, "error_rate": error_rate,
              "max_error_rate": options.max_error_rate, "by_kind": dict(sorted(by_kind.items())),
              "log": ERRORS_FILE},
      **({"ecg_storage": ECG_STORAGE} if any(s.num_ecg for stats in shards.values() for s in stats) else {}),
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
    lines.append(f"  {split:5s}: {stats['num_examples']} records in {len(stats['shards'])} shard(s) "
                 f"({stats['num_cxr']} CXR, {stats['num_ecg']} ECG, {stats['num_linked']} linked)")
  lines.append(f"  written {summary.num_written} of {summary.num_planned} planned records in "
               f"{summary.seconds:.1f} s; shards written {len(summary.shards_written)}, kept from a previous run "
               f"{len(summary.shards_reused)}")
  by_kind = info["errors"]["by_kind"]
  lines.append(f"  errors: {len(summary.errors)} ({summary.error_rate:.2%}, limit "
               f"{info['errors']['max_error_rate']:.2%})" + (f": {by_kind}" if by_kind else "")
               + (f"; see {os.path.join(summary.out_dir, ERRORS_FILE)}" if summary.errors else ""))
  if summary.exit_code:
    lines.append("  FAILED: the error rate exceeds --max-error-rate (the output is complete but check the log)")
  print("\n".join(lines), flush=True)
