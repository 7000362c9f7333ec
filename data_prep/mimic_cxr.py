"""MIMIC-CXR-JPG 2.0.0 with the MIMIC-CXR reports -> MEDBind-JAX shards (CXR + report + CheXpert labels).

    python -m data_prep.mimic_cxr --src DIR --out DIR [--reports DIR] [--views PA,AP] [--workers N]
        [--image-size 512] [--shard-size 1000] [--max-error-rate 0.05]

Expected source layout (the PhysioNet releases, unchanged; the tables gzipped as distributed, plain .csv also read):

  DIR/mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, PerformedProcedureStepDescription,
                                        ViewPosition, Rows, Columns, StudyDate (YYYYMMDD), StudyTime (HHMMSS.f), ...
  DIR/mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split (train / validate / test)
  DIR/mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id, and the 14 CheXpert columns (1.0, 0.0, -1.0 or blank)
  DIR/files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg       pXX = 'p' + the first two digits of the subject id
  REPORTS/files/pXX/pSUBJECT/sSTUDY.txt            MIMIC-CXR (not -JPG) free-text reports, i.e.
                                                   mimic-cxr-reports.zip unzipped; --reports, default DIR

One CXR-only record per study (the study is what a report describes):
  cxr/image    one image of the study: views filtered by --views (ViewPosition, default PA,AP: frontal), the
               first view in --views order present, then the smallest dicom_id; downscaled per --image-size
  cxr/report   FINDINGS then IMPRESSION of the report (`report_text.findings_impression` / `cxr_report_text`:
               whitespace collapsed, one space between); a study with neither is an "empty report" error
  cxr/labels   the 14 CheXpert labels in `CHEXPERT_LABELS` order: 1.0 -> 1, 0.0 -> 0, -1.0 -> -1, and blank (not
               mentioned) -> -1 as the schema's "unknown"; extra/cxr_label_mentioned is 1 where the source cell
               was not blank, so uncertain and unmentioned can still be told apart
  split        the official split (validate -> val), which is by subject
  ids          encounter_id = study_id = 's' + study id; patient_id = subject id
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Sequence

from data_prep import cli, cxr_io, report_text, runner, tables
from data_prep.errors import RecordError
from medbind_jax import paths
from medbind_jax.data import schema

CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices")
OFFICIAL_SPLITS = {"train": "train", "validate": "val", "test": "test"}
DEFAULT_VIEWS = ("PA", "AP")
SPEC = runner.DatasetSpec(
    name="mimic_cxr", version="1",
    source="MIMIC-CXR-JPG v2.0.0 (images, metadata, split, CheXpert labels) and MIMIC-CXR v2.0.0 (reports), "
           "PhysioNet (credentialed access)",
    licence="PhysioNet Credentialed Health Data License 1.5.0 (do not redistribute the converted shards)",
    citation="Johnson AEW, Pollard TJ, Greenbaum NR, et al. MIMIC-CXR-JPG, a large publicly available database of "
             "labeled chest radiographs. arXiv:1901.07042 (2019); Johnson AEW, Pollard TJ, Berkowitz SJ, et al. "
             "MIMIC-CXR, a de-identified publicly available database of chest radiographs with free-text reports. "
             "Sci Data 6, 317 (2019); PhysioNet (Goldberger et al. 2000)",
    description="One frontal chest X-ray per study with the FINDINGS and IMPRESSION of its report and the "
                "study's CheXpert labels.",
    label_names={"cxr": CHEXPERT_LABELS})


@dataclasses.dataclass(frozen=True)
class CxrStudy:
  record_id: str
  split: str
  subject_id: str
  study_id: str
  dicom_id: str
  image_path: str
  report_path: str
  labels: tuple[float, ...]
  mentioned: tuple[float, ...]
  time: float


def subject_dir(root: str, subject_id: str) -> str:
  """root/files/pXX/pSUBJECT, the MIMIC folder of a subject."""
  return paths.join(root, "files", f"p{subject_id[:2]}", f"p{subject_id}")


def study_time(study_date: str, study_time: str) -> float:
  """StudyDate (YYYYMMDD) + StudyTime (HHMMSS with optional fraction, leading zeros possibly dropped) -> epoch
  seconds (UTC); NaN when unparseable."""
  day = tables.epoch_seconds(study_date.strip().split(".")[0], "%Y%m%d")
  try:
    hhmmss = float(study_time)
  except ValueError:
    return math.nan
  hours, rest = divmod(hhmmss, 10000.0)
  minutes, seconds = divmod(rest, 100.0)
  return day + hours * 3600.0 + minutes * 60.0 + seconds


def _label(value: str) -> tuple[float, float]:
  """(label, mentioned) of one CheXpert cell."""
  value = value.strip()
  if not value:
    return -1.0, 0.0
  number = float(value)
  if number not in (1.0, 0.0, -1.0):
    raise ValueError(f"CheXpert value {value!r}")
  return number, 1.0


def subject_splits(src: str) -> dict[str, str]:
  """subject_id -> official split of its images. MIMIC-CXR's split is by subject; should a subject's images
  disagree, the most held-out split wins (test > val > train) so that no test subject leaks into training."""
  rank = {"train": 0, "val": 1, "test": 2}
  splits: dict[str, str] = {}
  for row in tables.read_csv(tables.find_file(src, "mimic-cxr-2.0.0-split.csv.gz"), ["subject_id", "split"]):
    split = OFFICIAL_SPLITS.get(row["split"].strip())
    if split is None:
      continue
    old = splits.get(row["subject_id"])
    if old is None or rank[split] > rank[old]:
      splits[row["subject_id"]] = split
  return splits


def plan_studies(src: str, reports: str | None = None, views: Sequence[str] = DEFAULT_VIEWS
                 ) -> tuple[list[CxrStudy], list[tuple[str, str, RecordError]], dict[str, int]]:
  """(one task per study with an image of an allowed view, rows rejected while reading, excluded counts)."""
  reports = reports or src
  views = tuple(v.upper() for v in views)
  image_split = {row["dicom_id"]: OFFICIAL_SPLITS.get(row["split"].strip(), "")
                 for row in tables.read_csv(tables.find_file(src, "mimic-cxr-2.0.0-split.csv.gz"),
                                            ["dicom_id", "split"])}
  labels_by_study = {}
  for row in tables.read_csv(tables.find_file(src, "mimic-cxr-2.0.0-chexpert.csv.gz"),
                             ["study_id", *CHEXPERT_LABELS]):
    labels_by_study[row["study_id"]] = row
  metadata = tables.read_csv(tables.find_file(src, "mimic-cxr-2.0.0-metadata.csv.gz"),
                             ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"])
  if not metadata:
    raise ValueError(f"no images listed in the metadata table under {src}")
  best: dict[str, tuple[tuple[int, str], dict]] = {}  # study -> (preference key, chosen metadata row)
  not_view = 0
  for row in metadata:
    view = row["ViewPosition"].strip().upper()
    if views and view not in views:
      not_view += 1
      continue
    key = (views.index(view) if views else 0, row["dicom_id"])
    if row["study_id"] not in best or key < best[row["study_id"]][0]:
      best[row["study_id"]] = (key, row)
  excluded = {"image of a view not selected": not_view,
              "other image of a chosen study": len(metadata) - not_view - len(best)}
  tasks, errors = [], []
  for study_id, (_, row) in sorted(best.items()):
    record_id = f"s{study_id}"
    subject = row["subject_id"].strip()
    split = image_split.get(row["dicom_id"], "")
    if not split:
      errors.append((record_id, "train", RecordError("bad split", f"dicom {row['dicom_id']} has no official "
                                                                   "split")))
      continue
    label_row = labels_by_study.get(study_id, {})
    try:
      pairs = [_label(label_row.get(name, "")) for name in CHEXPERT_LABELS]
    except ValueError as err:
      errors.append((record_id, split, RecordError("bad labels", str(err))))
      continue
    tasks.append(CxrStudy(
        record_id=record_id, split=split, subject_id=subject, study_id=study_id, dicom_id=row["dicom_id"],
        image_path=paths.join(subject_dir(src, subject), f"s{study_id}", row["dicom_id"] + ".jpg"),
        report_path=paths.join(subject_dir(reports, subject), f"s{study_id}.txt"),
        labels=tuple(p[0] for p in pairs), mentioned=tuple(p[1] for p in pairs),
        time=study_time(row["StudyDate"], row["StudyTime"])))
  return tasks, errors, excluded


def cxr_part(task: CxrStudy, options: cli.Options) -> schema.Part:
  """The "cxr" part of a record (also used by data_prep/mimic.py)."""
  report = tables.read_bytes(task.report_path, "report").decode("utf-8", errors="replace")
  text = report_text.cxr_report_text(*report_text.findings_impression(report))
  image = cxr_io.prepare_image(tables.read_bytes(task.image_path, "image"), options.image_size, task.image_path)
  return schema.Part(data=image, report=text, labels=task.labels, study_id=task.record_id, time=task.time)


def convert_record(task: CxrStudy, options: cli.Options) -> schema.Encounter:
  return schema.Encounter(encounter_id=task.record_id, patient_id=task.subject_id, split=task.split,
                          dataset=SPEC.name, parts={"cxr": cxr_part(task, options)},
                          extras={"cxr_label_mentioned": task.mentioned})


def convert(src: str, out: str, options: cli.Options, *, reports: str | None = None,
            views: Sequence[str] = DEFAULT_VIEWS) -> runner.Summary:
  tasks, errors, excluded = plan_studies(src, reports, views)
  return runner.run_conversion(SPEC, tasks, convert_record, out, options, params={"views": list(views)},
                               plan_errors=errors, extra_info={"excluded_images": excluded})


def parse_views(text: str) -> tuple[str, ...]:
  """'PA,AP' -> ('PA', 'AP'); 'all' -> () (every view)."""
  return () if text.strip().lower() == "all" else tuple(v.strip().upper() for v in text.split(",") if v.strip())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_common_args(parser, cxr=True, src_help="MIMIC-CXR-JPG 2.0.0 root (tables and files/)")
  parser.add_argument("--reports", default=None,
                      help="root holding files/pXX/pSUBJECT/sSTUDY.txt (MIMIC-CXR reports); default --src")
  parser.add_argument("--views", type=parse_views, default=DEFAULT_VIEWS,
                      help="ViewPosition values to keep, in order of preference (default PA,AP); 'all' keeps all")
  args = parser.parse_args(argv)
  cli.setup_logging()
  return convert(args.src, args.out, cli.options_from_args(args), reports=args.reports,
                 views=args.views).exit_code


if __name__ == "__main__":
  sys.exit(main())
