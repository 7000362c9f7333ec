"""ECG input and output of the converters: reading WFDB records, matching leads by name, and the stored form.

`read_wfdb` (checked reading, in mV), `match_leads` (leads matched by name into `schema.LEADS_12` with the
package's one rule, `medbind_jax.data.leads`), `resample`, `quantize_ecg` (int16 + per-lead gain), and
`prepare_ecg` / `wfdb_ecg`: a source ECG -> the `codecs.EcgData` payload of a record's "ecg" part and the record's
extras. `ECG_STORAGE` states the stored precision in dataset_info.json.
"""

from __future__ import annotations

import dataclasses
import math
import os
from fractions import Fraction
from typing import Sequence

import numpy as np
from scipy import signal as scipy_signal

from data_prep import cli
from data_prep.errors import RecordError
from medbind_jax.data import codecs, leads, schema

INT16_MAX = 32767
FLAT_PTP_MV = 1e-3  # a lead whose peak-to-peak is below 1 uV over the whole record counts as flat (disconnected)
# Bytes per sample of the WFDB storage formats whose file size can be checked before reading.
_WFDB_BYTES_PER_SAMPLE = {"8": 1, "16": 2, "61": 2, "80": 1, "160": 2, "212": 1.5, "24": 3, "32": 4}
# Record extra ([12] floats) marking the leads a source held inverted ('-aVR') and conversion negated back.
INVERTED_LEADS = "ecg_inverted_leads"
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

  Local files only (os, not `medbind_jax.paths`): wfdb opens the header and signal files by local path.
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


def match_leads(names: Sequence[str]) -> tuple[list[int], list[int]]:
  """`leads.match_leads` (the package's one lead-name rule) with its LeadError as RecordError of the same kind
  ("missing leads" / "duplicate lead") and message, so conversion error logs count and explain it."""
  try:
    return leads.match_leads(names)
  except leads.LeadError as err:
    raise RecordError(err.kind, err.detail) from err


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
               "to the first conversion_options.num_samples; a source lead named inverted ('-aVR', see "
               "medbind_jax.data.leads) is negated back to the true lead and marked 1 in the record's "
               f"extra/{INVERTED_LEADS} [12]")


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


def prepare_ecg(ecg: EcgSignal, options: cli.Options) -> tuple[codecs.EcgData, dict[str, list[float]]]:
  """Source ECG -> (the stored payload: 12 leads by name, checked, resampled, cropped, quantised; the record's
  extras: {INVERTED_LEADS: [12] 1.0 where the source held the inverted lead} when it held any, else {}).

  Order: leads matched into `schema.LEADS_12` by name (`match_leads`), an inverted source lead ('-aVR') negated
  back to the lead; non-finite samples rejected; the whole record resampled to `options.sampling_rate`
  (`resample`); the first `options.num_samples` kept (shorter records keep their length: the training pipeline
  pads); flat leads (peak-to-peak < 1 uV) rejected; `quantize_ecg`.
  """
  columns, signs = match_leads(ecg.leads)
  signal_mv = np.asarray(ecg.signal_mv, np.float64)[:, columns] * np.asarray(signs, np.float64)
  bad = leads.non_finite(signal_mv, schema.LEADS_12)
  if bad:
    raise RecordError("non-finite samples", bad)
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
  data = codecs.EcgData(samples=samples, gain=[float(g) for g in gain], leads=schema.LEADS_12,
                        sampling_rate=float(options.sampling_rate))
  return data, ({INVERTED_LEADS: [float(sign < 0) for sign in signs]} if min(signs) < 0 else {})


def wfdb_ecg(record_path: str, options: cli.Options) -> tuple[codecs.EcgData, dict[str, list[float]]]:
  """`prepare_ecg(read_wfdb(record_path), options)`."""
  return prepare_ecg(read_wfdb(record_path), options)
