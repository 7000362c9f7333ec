"""CheXpert 5x200 (the GLoRIA evaluation set) built from CheXpert's label table -> MEDBind-JAX shards.

    python -m data_prep.chexpert5x200 --src DIR --out DIR [--csv train.csv] [--per-class 200] [--seed 0]
        [--all-views] [--image-size 512] [--workers N]

Expected source layout (CheXpert v1.0 or v1.0-small as distributed):

  DIR/train.csv   Path, Sex, Age, Frontal/Lateral, AP/PA, then the 14 labels (No Finding, ..., Support Devices)
                  with cells 1.0, 0.0, -1.0 or blank. Path is relative to DIR's parent and starts with the release
                  folder ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"); a Path that does not
                  resolve there is tried relative to DIR without its first component.
  DIR/train/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg

Selection rule (deterministic): an image is eligible for class C of the five (Atelectasis, Cardiomegaly,
Consolidation, Edema, Pleural Effusion) when its C cell is 1.0 and the cells of the other four are 0.0 or blank
(blank = not mentioned, counted negative; an uncertain -1.0 on any of the five excludes the image), and, unless
--all-views, it is Frontal. Per class the eligible images are ordered by sha256("chexpert5x200/{seed}/{Path}") and
the first --per-class (200) are taken; the default seed is 0. Classes are disjoint by construction. A class with
fewer eligible images keeps them all (dataset_info.json lists the counts).

One CXR-only record per selected image, all in split "test":
  cxr/labels   one-hot over the five classes (`CLASSES` order)
  cxr/report   the class name (CheXpert's reports are not public), e.g. "Pleural Effusion"
  ids          encounter_id = study_id = Path; patient_id = the patientNNNNN folder
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
from typing import Sequence

from data_prep import cli, cxr_io, runner, tables
from medbind_jax import paths
from medbind_jax.data import schema

CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
SPEC = runner.DatasetSpec(
    name="chexpert5x200", version="1",
    source="CheXpert v1.0 (Stanford ML Group); 5x200 selection as in GLoRIA (Huang et al., ICCV 2021)",
    licence="Stanford University School of Medicine CheXpert Dataset Research Use Agreement (no redistribution)",
    citation="Irvin J, Rajpurkar P, Ko M, et al. CheXpert: A Large Chest Radiograph Dataset with Uncertainty "
             "Labels and Expert Comparison. AAAI 2019; Huang S-C, Shen L, Lungren MP, Yeung S. GLoRIA: A Multimodal "
             "Global-Local Representation Learning Framework for Label-efficient Medical Image Recognition. "
             "ICCV 2021",
    description="200 frontal chest X-rays for each of five findings, each positive for exactly that one of the "
                "five; text = class name.",
    label_names={"cxr": CLASSES})


@dataclasses.dataclass(frozen=True)
class ChexpertTask:
  record_id: str
  split: str
  patient_id: str
  image_path: str
  class_index: int


def resolve_image(src: str, path: str) -> str:
  """CheXpert's Path (release folder first) -> a file path under src (see the module docstring)."""
  beside = paths.join(os.path.dirname(paths.absolute(src).rstrip("/")), path)
  if paths.exists(beside):
    return beside
  parts = path.replace("\\", "/").split("/")
  return paths.join(src, *parts[1:])


def eligible_class(row: dict[str, str], frontal_only: bool) -> int | None:
  """The index in CLASSES this row is eligible for, or None."""
  if frontal_only and row.get("Frontal/Lateral", "").strip() != "Frontal":
    return None
  values = [row[name].strip() for name in CLASSES]
  positives = [i for i, v in enumerate(values) if v and float(v) == 1.0]
  negative = all(not v or float(v) == 0.0 for i, v in enumerate(values) if i not in positives)
  return positives[0] if len(positives) == 1 and negative else None


def plan(src: str, *, csv_name: str = "train.csv", per_class: int = 200, seed: int = 0, frontal_only: bool = True):
  """(tasks, per-class eligible and selected counts)."""
  rows = tables.read_csv(tables.find_file(src, csv_name), ["Path", "Frontal/Lateral", *CLASSES])
  by_class: dict[int, list[str]] = {i: [] for i in range(len(CLASSES))}
  for row in rows:
    try:
      index = eligible_class(row, frontal_only)
    except ValueError as err:
      raise ValueError(f"{csv_name}: row {row['Path']!r}: a label cell is not 1.0, 0.0, -1.0 or blank ({err})") \
          from err
    if index is not None:
      by_class[index].append(row["Path"].strip())
  tasks, counts = [], {}
  for index, eligible in by_class.items():
    eligible.sort(key=lambda p: (hashlib.sha256(f"chexpert5x200/{seed}/{p}".encode("utf-8")).hexdigest(), p))
    chosen = eligible[:per_class]
    counts[CLASSES[index]] = {"eligible": len(eligible), "selected": len(chosen)}
    for path in chosen:
      patient = next((p for p in path.split("/") if p.startswith("patient")), path)
      tasks.append(ChexpertTask(path, "test", patient, resolve_image(src, path), index))
  return tasks, counts


def convert_record(task: ChexpertTask, options: cli.Options) -> schema.Encounter:
  image = cxr_io.prepare_image(tables.read_bytes(task.image_path, "image"), options.image_size, task.image_path)
  labels = tuple(float(i == task.class_index) for i in range(len(CLASSES)))
  return schema.Encounter(encounter_id=task.record_id, patient_id=task.patient_id, split=task.split,
                          dataset=SPEC.name, parts={"cxr": schema.Part(data=image, report=CLASSES[task.class_index],
                                                                       labels=labels, study_id=task.record_id)})


def convert(src: str, out: str, options: cli.Options, *, csv_name: str = "train.csv", per_class: int = 200,
            seed: int = 0, frontal_only: bool = True) -> runner.Summary:
  tasks, counts = plan(src, csv_name=csv_name, per_class=per_class, seed=seed, frontal_only=frontal_only)
  if not tasks:
    raise ValueError(f"no eligible images in {csv_name} under {src}")
  params = {"csv": csv_name, "per_class": per_class, "seed": seed, "frontal_only": frontal_only}
  return runner.run_conversion(SPEC, tasks, convert_record, out, options, params=params,
                               extra_info={"selection": counts})


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  cli.add_common_args(parser, cxr=True, src_help="CheXpert release folder (with train.csv and train/)")
  parser.add_argument("--csv", default="train.csv", help="label table to select from (default train.csv)")
  parser.add_argument("--per-class", type=int, default=200)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--all-views", action="store_true", help="lateral images are eligible too")
  args = parser.parse_args(argv)
  cli.setup_logging()
  return convert(args.src, args.out, cli.options_from_args(args), csv_name=args.csv, per_class=args.per_class,
                 seed=args.seed, frontal_only=not args.all_views).exit_code


if __name__ == "__main__":
  sys.exit(main())
