"""CPSC2018 (ICBEB 2018 challenge) -> MEDBind-JAX shards (12-lead ECG + 9-class labels).

    python -m data_prep.cpsc2018 --src DIR --out DIR [--workers N] [--split-fractions 0.7,0.1,0.2]
        [--mat-units mV] [--sampling-rate 500] [--num-samples 5000] [--shard-size 1000] [--max-error-rate 0.05]

Expected source layout: the challenge's reference table and the records in either published form, found
anywhere under DIR (e.g. TrainingSet1/..TrainingSet3/ of the original release, or Training_WFDB/):

  DIR/REFERENCE.csv        Recording, First_label, Second_label, Third_label (class numbers 1-9; blanks allowed)
  DIR/**/A0001.hea         WFDB (the PhysioNet/CinC Challenge 2020 conversion): header + MATLAB v4 signal file
  DIR/**/A0001.mat         A0001.mat ('16x1+24' or '16+24'); 12 named leads, 500 Hz, 6-60 s
  DIR/**/A0001.mat         (no .hea beside it) the original release: a MATLAB struct `ECG` with fields sex, age
                           and data (12 x samples, in --mat-units, default mV), 500 Hz. The file names no leads:
                           its rows are named by the release's documented order I, II, III, aVR, aVL, aVF, V1-V6
                           (`ORIGINAL_LEADS`) and then canonicalised by name like every other record.

One ECG-only record per REFERENCE row:
  ecg/labels   9 classes (`CLASSES`), multi-hot from First/Second/Third_label
  ecg/report   made from the class names, since CPSC2018 has no reports: the names of the record's classes in
               label-number order, each ending in '.', joined by spaces ("Atrial fibrillation. Right bundle branch
               block.")
  signal       longer records keep their first --num-samples (10 s at 500 Hz by default)
  split        CPSC2018's labelled data has no official test split: `tables.hash_split(Recording,
               --split-fractions, salt 'cpsc2018')`, per recording (the release has no patient ids)
  ids          encounter_id = study_id = patient_id = Recording
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence

import numpy as np

from data_prep import cli, ecg_io, runner, tables
from data_prep.errors import RecordError
from medbind_jax.data import schema

# Label number -> (short name, text); the numbering of REFERENCE.csv.
CLASSES = {
    1: ("NORM", "Normal ECG"),
    2: ("AF", "Atrial fibrillation"),
    3: ("I-AVB", "First-degree atrioventricular block"),
    4: ("LBBB", "Left bundle branch block"),
    5: ("RBBB", "Right bundle branch block"),
    6: ("PAC", "Premature atrial contraction"),
    7: ("PVC", "Premature ventricular contraction"),
    8: ("STD", "ST-segment depression"),
    9: ("STE", "ST-segment elevation"),
}
LABEL_COLUMNS = ("First_label", "Second_label", "Third_label")
# Row order of ECG.data in the original release's .mat files (which carry no lead names) and their rate.
ORIGINAL_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
ORIGINAL_RATE = 500.0
MAT_UNITS_TO_MV = {"mV": 1.0, "uV": 1e-3}
SPLIT_SALT = "cpsc2018"
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
SPEC = runner.DatasetSpec(
    name="cpsc2018", version="1",
    source="The China Physiological Signal Challenge 2018 (ICBEB 2018) training set, WFDB version of the "
           "PhysioNet/CinC Challenge 2020",
    licence="CC BY 4.0 (PhysioNet/CinC Challenge 2020 data); check the terms of the copy you downloaded",
    citation="Liu F, Liu C, Zhao L, et al. An open access database for evaluating the algorithms of "
             "electrocardiogram rhythm and morphology abnormality detection. J Med Imaging Health Inform 8(7), "
             "1368-1373 (2018); Perez Alday EA, et al. Classification of 12-lead ECGs: the PhysioNet/Computing in "
             "Cardiology Challenge 2020. Physiol Meas 41 (2020)",
    description="12-lead ECGs with up to three of 9 rhythm/morphology classes; the text is made from the class "
                "names.",
    label_names={"ecg": tuple(short for short, _ in CLASSES.values())})


@dataclasses.dataclass(frozen=True)
class CpscTask:
  record_id: str
  split: str
  record_path: str  # without extension; '' when neither a .hea nor a .mat was found under --src
  record_format: str  # "wfdb" (a .hea beside the .mat) or "mat" (the original MATLAB struct)
  classes: tuple[int, ...]
  mat_units: str = "mV"  # unit of ECG.data in an original-release .mat


def class_text(classes: Sequence[int]) -> str:
  return " ".join(CLASSES[c][1] + "." for c in sorted(set(classes)))


def find_records(src: str) -> dict[str, tuple[str, str]]:
  """Record name -> (path without extension, "wfdb" or "mat") of every record under src: a .hea is a WFDB
  record, a .mat without a .hea beside it an original-release record (first in sorted walk order). `src` is
  local: the records are read by wfdb and scipy.io.loadmat from local files (output still goes anywhere,
  `runner`)."""
  found: dict[str, tuple[str, str]] = {}
  for directory, dirs, files in os.walk(src):
    dirs.sort()
    names = set(files)
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext == ".hea" or (ext == ".mat" and stem + ".hea" not in names):
        found.setdefault(stem, (os.path.join(directory, stem), "wfdb" if ext == ".hea" else "mat"))
  return found


def read_original_mat(record_path: str, units: str = "mV") -> ecg_io.EcgSignal:
  """A record of the original release (`record_path`.mat: struct ECG with data [12, samples]) in millivolts."""
  from scipy import io as scipy_io  # pylint: disable=import-outside-toplevel

  path = record_path + ".mat"
  if not os.path.isfile(path):
    raise RecordError("missing file", f"signal {path}")
  try:
    struct = scipy_io.loadmat(path)["ECG"]
    data = np.asarray(struct["data"][0, 0], np.float64)
  except Exception as err:  # scipy raises several types on a damaged or foreign file
    raise RecordError("unreadable signal", f"{path}: {type(err).__name__}: {err} (expected a struct ECG with "
                      "a field data)") from err
  if data.ndim != 2 or data.shape[0] != len(ORIGINAL_LEADS):
    raise RecordError("missing leads", f"{path}: ECG.data has shape {data.shape}, expected "
                      f"({len(ORIGINAL_LEADS)}, samples) in the order {list(ORIGINAL_LEADS)}")
  return ecg_io.EcgSignal(data.T * MAT_UNITS_TO_MV[units], list(ORIGINAL_LEADS), ORIGINAL_RATE)


def plan(src: str, fractions: Sequence[float] = DEFAULT_FRACTIONS, mat_units: str = "mV"
         ) -> tuple[list[CpscTask], list[tuple[str, str, RecordError]]]:
  rows = tables.read_csv(tables.find_file(src, "REFERENCE.csv"), ["Recording", *LABEL_COLUMNS[:1]])
  if not rows:
    raise ValueError(f"REFERENCE.csv under {src} has no rows")
  found = find_records(src)
  tasks, errors = [], []
  for row in rows:
    record_id = row["Recording"].strip()
    split = tables.hash_split(record_id, fractions, SPLIT_SALT)
    try:
      classes = tuple(sorted({int(float(row[c])) for c in LABEL_COLUMNS if row.get(c, "").strip()}))
      if not classes or any(c not in CLASSES for c in classes):
        raise ValueError(f"classes {classes}")
    except ValueError as err:
      errors.append((record_id, split, RecordError("bad labels", f"{err} (expected 1-9)")))
      continue
    record_path, record_format = found.get(record_id, ("", ""))
    tasks.append(CpscTask(record_id, split, record_path, record_format, classes, mat_units))
  return tasks, errors


def convert_record(task: CpscTask, options: cli.Options) -> schema.Encounter:
  if not task.record_path:
    raise RecordError("missing file", f"no {task.record_id}.hea or {task.record_id}.mat under --src")
  if task.record_format == "mat":
    ecg, extras = ecg_io.prepare_ecg(read_original_mat(task.record_path, task.mat_units), options)
  else:
    ecg, extras = ecg_io.wfdb_ecg(task.record_path, options)
  return schema.Encounter(
      encounter_id=task.record_id, patient_id=task.record_id, split=task.split, dataset=SPEC.name,
      parts={"ecg": schema.Part(data=ecg, report=class_text(task.classes),
                                labels=tuple(float(c in task.classes) for c in CLASSES), study_id=task.record_id)},
      extras=extras)


def convert(src: str, out: str, options: cli.Options, *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
            mat_units: str = "mV") -> runner.Summary:
  if mat_units not in MAT_UNITS_TO_MV:
    raise ValueError(f"mat_units must be one of {sorted(MAT_UNITS_TO_MV)}, got {mat_units!r}")
  tasks, errors = plan(src, fractions, mat_units)
  formats = sorted({t.record_format for t in tasks if t.record_format})
  return runner.run_conversion(SPEC, tasks, convert_record, out, options,
                               params={"split_fractions": list(fractions), "split_salt": SPLIT_SALT,
                                       "mat_units": mat_units},
                               plan_errors=errors, extra_info={"record_formats": formats})


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_common_args(parser, ecg=True, src_help="folder with REFERENCE.csv and the records (WFDB or original .mat) below it")
  parser.add_argument("--split-fractions", type=cli.parse_fractions, default=DEFAULT_FRACTIONS,
                      help="train,val,test shares of recordings (default 0.7,0.1,0.2)")
  parser.add_argument("--mat-units", choices=sorted(MAT_UNITS_TO_MV), default="mV",
                      help="unit of ECG.data in original-release .mat files (records without a .hea)")
  args = parser.parse_args(argv)
  cli.setup_logging()
  return convert(args.src, args.out, cli.options_from_args(args), fractions=args.split_fractions,
                 mat_units=args.mat_units).exit_code


if __name__ == "__main__":
  sys.exit(main())
