"""Open-i / Indiana University chest X-ray collection (IU X-ray) -> MEDBind-JAX shards (CXR + report).

    python -m data_prep.openi --src DIR --out DIR [--format auto|xml|csv] [--images DIR] [--all-views]
        [--split test] [--image-size 512] [--workers N]

Two published layouts are read (--format auto picks xml when DIR/ecgen-radiology/ exists, else csv):

  xml  (Open-i's NLMCXR_reports.tgz + NLMCXR_png.tgz, unpacked)
       DIR/ecgen-radiology/N.xml   one report each: <AbstractText Label="FINDINGS">, <AbstractText
                                   Label="IMPRESSION">, <uId id="CXRN"/>, and one <parentImage id="CXRN_..."> per image
       DIR/NLMCXR_png/CXRN_....png the images, named by parentImage id (--images to point elsewhere)
  csv  (the widely used CSV re-packaging)
       DIR/indiana_reports.csv     uid, MeSH, Problems, image, indication, comparison, findings, impression
       DIR/indiana_projections.csv uid, filename, projection (Frontal / Lateral)
       DIR/images/images_normalized/<filename>   the PNGs (--images to point elsewhere)

One CXR-only record per report:
  cxr/image    csv: the report's first Frontal image by file name (--all-views: first of any view); reports
               without one are excluded and counted. xml: the first parentImage in document order (the XML states
               no view)
  cxr/report   FINDINGS then IMPRESSION (`report_text.cxr_report_text`: whitespace collapsed, one space between); both
               blank is an "empty report" error
  cxr/labels   none (label names are empty)
  split        all records in --split (default test: Open-i is an evaluation set here)
  ids          encounter_id = study_id = patient_id = the report's uid (xml: the uId, e.g. CXR1; csv: uid)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import xml.etree.ElementTree as ElementTree
from typing import Sequence

from data_prep import cli, cxr_io, report_text, runner, tables
from data_prep.errors import RecordError
from medbind_jax import paths
from medbind_jax.data import schema

SPEC = runner.DatasetSpec(
    name="openi", version="1",
    source="Indiana University chest X-ray collection via Open-i (National Library of Medicine)",
    licence="CC BY-NC-ND 4.0 (as stated in the Open-i report XML); check the terms of the copy you downloaded",
    citation="Demner-Fushman D, Kohli MD, Rosenman MB, et al. Preparing a collection of radiology examinations for "
             "distribution and retrieval. J Am Med Inform Assoc 23(2), 304-310 (2016)",
    description="Chest X-rays with the FINDINGS and IMPRESSION of their radiology reports.",
    label_names={"cxr": ()})


@dataclasses.dataclass(frozen=True)
class OpeniTask:
  record_id: str
  split: str
  image_path: str
  findings: str
  impression: str


def _xml_text(root: ElementTree.Element, label: str) -> str:
  for element in root.iter("AbstractText"):
    if element.get("Label", "").upper() == label:
      return "".join(element.itertext())
  return ""


def plan_xml(src: str, images: str, split: str) -> tuple[list[OpeniTask], list, dict]:
  report_dir = paths.join(src, "ecgen-radiology")
  tasks, errors, excluded = [], [], {"report without an image": 0}
  for name in sorted(p.name for p in paths.as_path(report_dir).iterdir()):
    if not name.endswith(".xml"):
      continue
    path = paths.join(report_dir, name)
    try:
      root = ElementTree.fromstring(paths.read_bytes(path))
    except ElementTree.ParseError as err:
      errors.append((name[:-4], split, RecordError("unreadable report", f"{path}: {err}")))
      continue
    uid = root.find("uId")
    record_id = uid.get("id") if uid is not None and uid.get("id") else name[:-4]
    image_ids = [e.get("id") for e in root.iter("parentImage") if e.get("id")]
    if not image_ids:
      excluded["report without an image"] += 1
      continue
    tasks.append(OpeniTask(record_id, split, paths.join(images, image_ids[0] + ".png"),
                           _xml_text(root, "FINDINGS"), _xml_text(root, "IMPRESSION")))
  return tasks, errors, excluded


def plan_csv(src: str, images: str, split: str, all_views: bool) -> tuple[list[OpeniTask], list, dict]:
  reports = tables.read_csv(tables.find_file(src, "indiana_reports.csv"), ["uid", "findings", "impression"])
  projections = tables.read_csv(tables.find_file(src, "indiana_projections.csv"), ["uid", "filename", "projection"])
  files: dict[str, list[str]] = {}
  for row in projections:
    if all_views or row["projection"].strip() == "Frontal":
      files.setdefault(row["uid"].strip(), []).append(row["filename"].strip())
  tasks, excluded = [], {"report without a selected image": 0}
  for row in reports:
    uid = row["uid"].strip()
    if uid not in files:
      excluded["report without a selected image"] += 1
      continue
    tasks.append(OpeniTask(uid, split, paths.join(images, sorted(files[uid])[0]), row["findings"],
                           row["impression"]))
  return tasks, [], excluded


def convert_record(task: OpeniTask, options: cli.Options) -> schema.Encounter:
  text = report_text.cxr_report_text(task.findings, task.impression)
  image = cxr_io.prepare_image(tables.read_bytes(task.image_path, "image"), options.image_size, task.image_path)
  return schema.Encounter(encounter_id=task.record_id, patient_id=task.record_id, split=task.split,
                          dataset=SPEC.name, parts={"cxr": schema.Part(data=image, report=text,
                                                                       study_id=task.record_id)})


def convert(src: str, out: str, options: cli.Options, *, source_format: str = "auto",
            images: str | None = None, all_views: bool = False, split: str = "test") -> runner.Summary:
  if source_format == "auto":
    source_format = "xml" if paths.as_path(paths.join(src, "ecgen-radiology")).is_dir() else "csv"
  if source_format == "xml":
    tasks, errors, excluded = plan_xml(src, images or paths.join(src, "NLMCXR_png"), split)
  else:
    tasks, errors, excluded = plan_csv(src, images or paths.join(src, "images", "images_normalized"), split,
                                       all_views)
  if not tasks and not errors:
    raise ValueError(f"no reports with images found under {src} ({source_format} layout)")
  params = {"format": source_format, "all_views": all_views, "split": split}
  return runner.run_conversion(SPEC, tasks, convert_record, out, options, params=params, plan_errors=errors,
                               extra_info={"excluded_reports": excluded})


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_common_args(parser, cxr=True, src_help="Open-i / IU X-ray root (xml or csv layout)")
  parser.add_argument("--format", choices=("auto", "xml", "csv"), default="auto")
  parser.add_argument("--images", default=None, help="image folder (default by layout, see above)")
  parser.add_argument("--all-views", action="store_true", help="csv layout: lateral images may be chosen too")
  parser.add_argument("--split", choices=schema.SPLITS, default="test")
  args = parser.parse_args(argv)
  cli.setup_logging()
  return convert(args.src, args.out, cli.options_from_args(args), source_format=args.format,
                 images=args.images, all_views=args.all_views, split=args.split).exit_code


if __name__ == "__main__":
  sys.exit(main())
