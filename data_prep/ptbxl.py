"""PTB-XL -> MEDBind-JAX shards (ECG + free-text report + diagnostic superclasses).

    python -m data_prep.ptbxl --src DIR --out DIR [--workers N] [--records hr|lr] [--min-likelihood 0]
        [--shard-size 1000] [--sampling-rate 500] [--num-samples 5000] [--max-error-rate 0.05]

Expected source layout (the PhysioNet release, unchanged):

  DIR/ptbxl_database.csv              one row per ECG; used columns: ecg_id, patient_id, recording_date
                                      ("YYYY-MM-DD HH:MM:SS"), report, scp_codes ("{'NORM': 100.0, ...}"),
                                      strat_fold, filename_hr, filename_lr
  DIR/scp_statements.csv              the 71 SCP statements: first column (unnamed in the release) = the code,
                                      with columns diagnostic (1.0 or blank) and diagnostic_class
  DIR/records500/NNNNN/NNNNN_hr.hea   WFDB header + .dat: 12 leads (I II III AVR AVL AVF V1-V6), 500 Hz, 10 s
  DIR/records100/NNNNN/NNNNN_lr.hea   the 100 Hz copies (--records lr)

One ECG-only record per ecg_id:
  ecg/report   the `report` column verbatim (English or German, as recorded)
  ecg/labels   NORM, MI, STTC, CD, HYP: 1.0 when any SCP code of the row whose statement is diagnostic maps to
               that `diagnostic_class` (codes of every likelihood count, including 0, unless --min-likelihood)
  split        strat_fold 1-8 train, 9 val, 10 test (the dataset's recommended folds)
  ids          encounter_id = study_id = ecg_id (5 digits), patient_id = patient_id
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
from typing import Sequence

from data_prep import cli, ecg_io, runner, tables
from data_prep.errors import RecordError
from medbind_jax.data import schema

SUPERCLASSES = ("NORM", "MI", "STTC", "CD", "HYP")
SPEC = runner.DatasetSpec(
    name="ptbxl", version="1",
    source="PTB-XL, a large publicly available electrocardiography dataset (PhysioNet, v1.0.3)",
    licence="CC BY 4.0",
    citation="Wagner P, Strodthoff N, Bousseljot R-D, et al. PTB-XL, a large publicly available "
             "electrocardiography dataset. Sci Data 7, 154 (2020); PhysioNet doi:10.13026/kfzx-aw45",
    description="12-lead 10 s ECGs with cardiologist free-text reports; labels are the SCP diagnostic "
                "superclasses.",
    label_names={"ecg": SUPERCLASSES})
FOLD_SPLITS = {**{fold: "train" for fold in range(1, 9)}, 9: "val", 10: "test"}


@dataclasses.dataclass(frozen=True)
class PtbxlTask:
  record_id: str
  split: str
  patient_id: str
  record_path: str  # WFDB record path without extension
  report: str
  labels: tuple[float, ...]
  time: float


def superclass_map(scp_statements_path: str) -> dict[str, str]:
  """SCP code -> diagnostic superclass, for the diagnostic statements of scp_statements.csv."""
  rows = tables.read_csv(scp_statements_path, ["diagnostic", "diagnostic_class"])
  code_column = next(iter(rows[0])) if rows else ""
  mapping = {}
  for row in rows:
    if row["diagnostic"].strip() and float(row["diagnostic"]) == 1.0 and row["diagnostic_class"].strip():
      mapping[row[code_column].strip()] = row["diagnostic_class"].strip()
  return mapping


def plan(src: str, *, records: str = "hr", min_likelihood: float = 0.0
         ) -> tuple[list[PtbxlTask], list[tuple[str, str, RecordError]]]:
  """Tasks (one per row of ptbxl_database.csv) and the rows rejected while reading the table."""
  database = tables.find_file(src, "ptbxl_database.csv")
  codes_to_class = superclass_map(tables.find_file(src, "scp_statements.csv"))
  file_column = f"filename_{records}"
  rows = tables.read_csv(database, ["ecg_id", "patient_id", "report", "scp_codes", "strat_fold", file_column])
  if not rows:
    raise ValueError(f"{database} has no rows")
  tasks, errors = [], []
  for row in rows:
    record_id = f"{int(float(row['ecg_id'])):05d}"
    try:
      fold = int(float(row["strat_fold"]))
    except ValueError:
      fold = None
    split = FOLD_SPLITS.get(fold)
    if split is None:
      errors.append((record_id, "test", RecordError("bad split", f"strat_fold {row['strat_fold']!r}")))
      continue
    try:
      scp_codes = ast.literal_eval(row["scp_codes"])
      if not isinstance(scp_codes, dict):
        raise ValueError("not a dict")
    except (ValueError, SyntaxError) as err:
      errors.append((record_id, split, RecordError("bad labels", f"scp_codes {row['scp_codes']!r}: {err}")))
      continue
    classes = {codes_to_class[code] for code, likelihood in scp_codes.items()
               if code in codes_to_class and float(likelihood) >= min_likelihood}
    if not row[file_column].strip():
      errors.append((record_id, split, RecordError("missing file", f"no {file_column} for ecg_id {record_id}")))
      continue
    patient = row["patient_id"].strip()
    tasks.append(PtbxlTask(
        record_id=record_id, split=split,
        patient_id=str(int(float(patient))) if patient else f"ecg{record_id}",
        record_path=os.path.join(src, row[file_column].strip()), report=row["report"],
        labels=tuple(float(name in classes) for name in SUPERCLASSES),
        time=tables.epoch_seconds(row.get("recording_date", ""))))
  return tasks, errors


def convert_record(task: PtbxlTask, options: cli.Options) -> schema.Encounter:
  if not task.report.strip():
    raise RecordError("empty report", "blank `report` column")
  ecg, extras = ecg_io.wfdb_ecg(task.record_path, options)
  return schema.Encounter(
      encounter_id=task.record_id, patient_id=task.patient_id, split=task.split, dataset=SPEC.name,
      parts={"ecg": schema.Part(data=ecg, report=task.report, labels=task.labels, study_id=task.record_id,
                                time=task.time)}, extras=extras)


def convert(src: str, out: str, options: cli.Options, *, records: str = "hr",
            min_likelihood: float = 0.0) -> runner.Summary:
  tasks, errors = plan(src, records=records, min_likelihood=min_likelihood)
  return runner.run_conversion(SPEC, tasks, convert_record, out, options,
                               params={"records": records, "min_likelihood": min_likelihood}, plan_errors=errors)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_common_args(parser, ecg=True)
  parser.add_argument("--records", choices=("hr", "lr"), default="hr",
                      help="records500 (hr, 500 Hz) or records100 (lr, 100 Hz)")
  parser.add_argument("--min-likelihood", type=float, default=0.0,
                      help="SCP codes below this likelihood do not count toward a superclass")
  args = parser.parse_args(argv)
  cli.setup_logging()
  return convert(args.src, args.out, cli.options_from_args(args), records=args.records,
                 min_likelihood=args.min_likelihood).exit_code


if __name__ == "__main__":
  sys.exit(main())
