"""MIMIC-IV-ECG 1.0 -> MEDBind-JAX shards (12-lead ECG + machine-read statements).

    python -m data_prep.mimic_ecg --src DIR --out DIR [--workers N] [--split-fractions 0.8,0.1,0.1]
        [--sampling-rate 500] [--num-samples 5000] [--shard-size 1000] [--max-error-rate 0.05]

Expected source layout (the PhysioNet release, unchanged; .csv or .csv.gz):

  DIR/record_list.csv            subject_id, study_id, file_name, ecg_time ("YYYY-MM-DD HH:MM:SS"), path
                                 (path = files/pNNNN/pSUBJECT/sSTUDY/STUDY, without extension)
  DIR/machine_measurements.csv   subject_id, study_id, cart_id, ecg_time, report_0 .. report_17, bandwidth,
                                 filtering, rr_interval, ... (one row per study)
  DIR/files/pNNNN/pSUBJECT/sSTUDY/STUDY.hea + STUDY.dat    WFDB, 12 leads named I II III aVR aVF aVL V1-V6 (in
                                 that order: leads are matched by name), 500 Hz, 5000 samples, 200 units/mV

One ECG-only record per study:
  ecg/report   the non-blank report_0..report_17 statements in order, joined by `report_text.join_statements`
               ("Sinus rhythm", "Normal ECG" -> "Sinus rhythm. Normal ECG."); a study without any is an
               "empty report" error
  ecg/labels   none (MIMIC-IV-ECG has no label table; label names are empty)
  split        by subject: `tables.hash_split(subject_id, --split-fractions, salt "mimic")`, the same function
               data_prep/mimic.py uses for subjects without a CXR
  ids          encounter_id = study_id = 's' + study id; patient_id = subject id; ecg/time = ecg_time
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence

from data_prep import cli, ecg_io, report_text, runner, tables
from data_prep.errors import RecordError
from medbind_jax.data import schema

NUM_STATEMENTS = 18
SPLIT_SALT = "mimic"
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
SPEC = runner.DatasetSpec(
    name="mimic_ecg", version="1",
    source="MIMIC-IV-ECG: Diagnostic Electrocardiogram Matched Subset v1.0, PhysioNet",
    licence="Open Data Commons Open Database License v1.0 (ODbL) as published on PhysioNet; check the current "
            "terms of the version you downloaded",
    citation="Gow B, Pollard T, Nathanson LA, et al. MIMIC-IV-ECG: Diagnostic Electrocardiogram Matched Subset "
             "(version 1.0). PhysioNet (2023). doi:10.13026/4nqg-sb35; PhysioNet (Goldberger et al. 2000)",
    description="10 s 12-lead ECGs with the machine-read statements of the acquiring cart.",
    label_names={"ecg": ()})


@dataclasses.dataclass(frozen=True)
class EcgStudy:
  record_id: str
  split: str
  subject_id: str
  study_id: str
  record_path: str  # WFDB record path without extension
  report: str
  time: float


def statements_by_study(src: str) -> dict[str, str]:
  """study_id -> the joined machine statements of machine_measurements.csv."""
  columns = [f"report_{i}" for i in range(NUM_STATEMENTS)]
  path = tables.find_file(src, "machine_measurements.csv")
  return {row["study_id"].strip(): report_text.join_statements(row.get(c, "") for c in columns)
          for row in tables.read_csv(path, ["study_id", "report_0"])}


def plan_studies(src: str, fractions: Sequence[float] = DEFAULT_FRACTIONS
                 ) -> tuple[list[EcgStudy], list[tuple[str, str, RecordError]]]:
  """One task per row of record_list.csv (studies without statements fail at conversion, so they are logged)."""
  statements = statements_by_study(src)
  rows = tables.read_csv(tables.find_file(src, "record_list.csv"), ["subject_id", "study_id", "ecg_time", "path"])
  if not rows:
    raise ValueError(f"record_list.csv under {src} lists no records")
  tasks, errors = [], []
  for row in rows:
    subject, study = row["subject_id"].strip(), row["study_id"].strip()
    record_id = f"s{study}"
    split = tables.hash_split(subject, fractions, SPLIT_SALT)
    if not row["path"].strip():
      errors.append((record_id, split, RecordError("missing file", "blank path in record_list.csv")))
      continue
    tasks.append(EcgStudy(record_id=record_id, split=split, subject_id=subject, study_id=study,
                          record_path=os.path.join(src, row["path"].strip()), report=statements.get(study, ""),
                          time=tables.epoch_seconds(row["ecg_time"])))
  return tasks, errors


def ecg_part(task: EcgStudy, options: cli.Options) -> tuple[schema.Part, dict[str, list[float]]]:
  """The "ecg" part of a record and the record's extras from it (see `ecg_io.prepare_ecg`; also used by
  data_prep/mimic.py)."""
  if not task.report:
    raise RecordError("empty report", f"no machine statements for study {task.study_id}")
  ecg, extras = ecg_io.wfdb_ecg(task.record_path, options)
  return schema.Part(data=ecg, report=task.report, study_id=task.record_id, time=task.time), extras


def convert_record(task: EcgStudy, options: cli.Options) -> schema.Encounter:
  part, extras = ecg_part(task, options)
  return schema.Encounter(encounter_id=task.record_id, patient_id=task.subject_id, split=task.split,
                          dataset=SPEC.name, parts={"ecg": part}, extras=extras)


def convert(src: str, out: str, options: cli.Options, *,
            fractions: Sequence[float] = DEFAULT_FRACTIONS) -> runner.Summary:
  tasks, errors = plan_studies(src, fractions)
  return runner.run_conversion(SPEC, tasks, convert_record, out, options,
                               params={"split_fractions": list(fractions), "split_salt": SPLIT_SALT},
                               plan_errors=errors)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_common_args(parser, ecg=True, src_help="MIMIC-IV-ECG 1.0 root (record_list.csv, files/)")
  parser.add_argument("--split-fractions", type=cli.parse_fractions, default=DEFAULT_FRACTIONS,
                      help="train,val,test shares of subjects (default 0.8,0.1,0.1)")
  args = parser.parse_args(argv)
  cli.setup_logging()
  return convert(args.src, args.out, cli.options_from_args(args), fractions=args.split_fractions).exit_code


if __name__ == "__main__":
  sys.exit(main())
