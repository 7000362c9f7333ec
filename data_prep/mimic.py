"""MIMIC-CXR-JPG + MIMIC-IV-ECG -> one MEDBind-JAX dataset with linked CXR-ECG encounters for EMCL.

    python -m data_prep.mimic --src CXR_DIR --ecg-src ECG_DIR --out DIR [--reports DIR]
        [--admissions mimiciv/hosp/admissions.csv.gz] [--window-hours 24] [--views PA,AP] [--workers N]
        [--split-fractions 0.8,0.1,0.1] [--image-size 512] [--sampling-rate 500] [--num-samples 5000]

Sources, each laid out as distributed (see data_prep/mimic_cxr.py and data_prep/mimic_ecg.py for the details):
  --src         MIMIC-CXR-JPG 2.0.0 root: mimic-cxr-2.0.0-{metadata,split,chexpert}.csv.gz, files/pXX/pSUBJECT/sSTUDY/*.jpg
  --reports     root of files/pXX/pSUBJECT/sSTUDY.txt (MIMIC-CXR reports); default --src
  --ecg-src     MIMIC-IV-ECG 1.0 root: record_list.csv, machine_measurements.csv, files/pNNNN/pSUBJECT/sSTUDY/
  --admissions  optional MIMIC-IV hosp/admissions.csv(.gz) (subject_id, hadm_id, admittime, dischtime): gives
                each study the admission containing its time, so that "same admission" can link

Records: CXR studies and ECGs are paired by `data_prep.linking.link_events` (same subject; same admission when
both have one, else acquisition times within --window-hours, inclusive; one-to-one, closest first). A pair becomes
one record with both modalities and linked=True (encounter_id 'cxr-sSTUDY+ecg-sSTUDY'); every other study is a
single-modality record ('cxr-sSTUDY' / 'ecg-sSTUDY'). The CXR and ECG halves are built exactly as the
single-dataset converters build them. A pair whose CXR or ECG half fails is logged as one error (the reason names
the half) and left out whole.

Splits are by subject, so a linked pair always lands in one split: a subject with any MIMIC-CXR image takes
MIMIC-CXR's official split (which is by subject; should its images disagree, test > val > train), so CXR
evaluations stay comparable with published MIMIC-CXR numbers; a subject with ECGs only takes
`tables.hash_split(subject_id, --split-fractions, 'mimic')`, as in data_prep/mimic_ecg.py. Hence an ECG may sit in
another split here than in a stand-alone mimic_ecg conversion. dataset_info.json reports the linking counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from data_prep import cli, linking, mimic_cxr, mimic_ecg, runner, tables
from data_prep.errors import RecordError
from medbind_jax.data import schema

SPEC = runner.DatasetSpec(
    name="mimic", version="1",
    source=f"{mimic_cxr.SPEC.source}; {mimic_ecg.SPEC.source}; optionally MIMIC-IV hosp/admissions",
    licence=mimic_cxr.SPEC.licence,
    citation=f"{mimic_cxr.SPEC.citation}; {mimic_ecg.SPEC.citation}",
    description="MIMIC chest X-rays (FINDINGS + IMPRESSION, CheXpert labels) and MIMIC-IV ECGs (machine "
                "statements); CXR-ECG pairs of one encounter are single linked records.",
    label_names={**mimic_cxr.SPEC.label_names, **mimic_ecg.SPEC.label_names})


@dataclasses.dataclass(frozen=True)
class MimicTask:
  record_id: str
  split: str
  subject_id: str
  cxr: mimic_cxr.CxrStudy | None
  ecg: mimic_ecg.EcgStudy | None


def read_admissions(path: str) -> list[linking.Admission]:
  rows = tables.read_csv(path, ["subject_id", "hadm_id", "admittime", "dischtime"])
  return [linking.Admission(r["subject_id"].strip(), r["hadm_id"].strip(), tables.epoch_seconds(r["admittime"]),
                            tables.epoch_seconds(r["dischtime"])) for r in rows]


def plan(src: str, ecg_src: str, *, reports: str | None = None, admissions: str | None = None,
         window_hours: float = linking.DEFAULT_WINDOW_HOURS, views: Sequence[str] = mimic_cxr.DEFAULT_VIEWS,
         fractions: Sequence[float] = mimic_ecg.DEFAULT_FRACTIONS):
  """(tasks, plan errors, extra dataset_info) for the combined dataset."""
  cxr_tasks, cxr_errors, excluded = mimic_cxr.plan_studies(src, reports, views)
  ecg_tasks, ecg_errors = mimic_ecg.plan_studies(ecg_src, fractions)
  official = mimic_cxr.subject_splits(src)

  def split_of(subject: str) -> str:
    return official.get(subject) or tables.hash_split(subject, fractions, mimic_ecg.SPLIT_SALT)

  cxr_events = [linking.Event(t.record_id, t.subject_id, t.time) for t in cxr_tasks]
  ecg_events = [linking.Event(t.record_id, t.subject_id, t.time) for t in ecg_tasks]
  if admissions:
    stays = read_admissions(admissions)
    cxr_events = linking.assign_admissions(cxr_events, stays)
    ecg_events = linking.assign_admissions(ecg_events, stays)
  result = linking.link_events(cxr_events, ecg_events, window_hours)
  cxr_by_id = {t.record_id: t for t in cxr_tasks}
  ecg_by_id = {t.record_id: t for t in ecg_tasks}
  tasks = []
  for cxr_id, ecg_id in result.pairs:
    cxr, ecg = cxr_by_id.pop(cxr_id), ecg_by_id.pop(ecg_id)
    split = split_of(cxr.subject_id)
    tasks.append(MimicTask(f"cxr-{cxr_id}+ecg-{ecg_id}", split, cxr.subject_id,
                           dataclasses.replace(cxr, split=split), dataclasses.replace(ecg, split=split)))
  for cxr in cxr_by_id.values():
    split = split_of(cxr.subject_id)
    tasks.append(MimicTask(f"cxr-{cxr.record_id}", split, cxr.subject_id, dataclasses.replace(cxr, split=split),
                           None))
  for ecg in ecg_by_id.values():
    split = split_of(ecg.subject_id)
    tasks.append(MimicTask(f"ecg-{ecg.record_id}", split, ecg.subject_id, None, dataclasses.replace(ecg, split=split)))
  errors = [(f"cxr-{r}", s, e) for r, s, e in cxr_errors] + [(f"ecg-{r}", s, e) for r, s, e in ecg_errors]
  extra = {"linking": {"window_hours": window_hours, "admissions": bool(admissions), **result.counts},
           "excluded_images": excluded}
  return tasks, errors, extra


def convert_record(task: MimicTask, options: cli.Options) -> schema.Encounter:
  parts, extras = {}, {}
  builders = (("cxr", task.cxr, lambda study: (mimic_cxr.cxr_part(study, options), {})),
              ("ecg", task.ecg, lambda study: mimic_ecg.ecg_part(study, options)))  # (part, record extras)
  for modality, study, build in builders:
    if study is None:
      continue
    try:
      parts[modality], part_extras = build(study)
      extras.update(part_extras)
    except RecordError as err:
      raise RecordError(err.kind, f"{modality.upper()} {study.record_id}: {err.detail}") from err
  if task.cxr is not None:
    extras["cxr_label_mentioned"] = task.cxr.mentioned
  return schema.Encounter(encounter_id=task.record_id, patient_id=task.subject_id, split=task.split,
                          dataset=SPEC.name, linked=len(parts) == 2, parts=parts, extras=extras)


def convert(src: str, ecg_src: str, out: str, options: cli.Options, *, reports: str | None = None,
            admissions: str | None = None, window_hours: float = linking.DEFAULT_WINDOW_HOURS,
            views: Sequence[str] = mimic_cxr.DEFAULT_VIEWS,
            fractions: Sequence[float] = mimic_ecg.DEFAULT_FRACTIONS) -> runner.Summary:
  tasks, errors, extra = plan(src, ecg_src, reports=reports, admissions=admissions, window_hours=window_hours,
                              views=views, fractions=fractions)
  print(f"linking: {extra['linking']}", flush=True)
  params = {"views": list(views), "window_hours": window_hours, "admissions": bool(admissions),
            "split_fractions": list(fractions), "split_salt": mimic_ecg.SPLIT_SALT}
  return runner.run_conversion(SPEC, tasks, convert_record, out, options, params=params, plan_errors=errors,
                               extra_info=extra)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_common_args(parser, ecg=True, cxr=True, src_help="MIMIC-CXR-JPG 2.0.0 root (tables and files/)")
  parser.add_argument("--ecg-src", required=True, help="MIMIC-IV-ECG 1.0 root (record_list.csv, files/)")
  parser.add_argument("--reports", default=None, help="root of files/pXX/pSUBJECT/sSTUDY.txt; default --src")
  parser.add_argument("--admissions", default=None, help="MIMIC-IV hosp/admissions.csv(.gz), optional")
  parser.add_argument("--window-hours", type=float, default=linking.DEFAULT_WINDOW_HOURS,
                      help="link a CXR and an ECG of one subject taken at most this far apart (inclusive)")
  parser.add_argument("--views", type=mimic_cxr.parse_views, default=mimic_cxr.DEFAULT_VIEWS,
                      help="ViewPosition values to keep, in order of preference (default PA,AP); 'all' keeps all")
  parser.add_argument("--split-fractions", type=cli.parse_fractions, default=mimic_ecg.DEFAULT_FRACTIONS,
                      help="train,val,test shares for subjects without a MIMIC-CXR image")
  args = parser.parse_args(argv)
  cli.setup_logging()
  return convert(args.src, args.ecg_src, args.out, cli.options_from_args(args), reports=args.reports,
                 admissions=args.admissions, window_hours=args.window_hours, views=args.views,
                 fractions=args.split_fractions).exit_code


if __name__ == "__main__":
  sys.exit(main())
