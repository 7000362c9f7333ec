"""Miniature source trees laid out exactly like each real dataset's download, built from the real records and
texts in tests/fixtures/real/ (see its README for provenance). Used by the data_prep converter tests.

Only file names, folder structure, table columns and compression copy the real releases; the contents are the
fixture records re-packaged (e.g. a PTB-XL-via-CinC ECG written as a MIMIC-IV-ECG study).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import gzip
import io
import os
import pathlib
import shutil
import textwrap

import numpy as np
from PIL import Image
import wfdb

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "real"
ECG_DIR = FIXTURES / "ecg"
CXR_IMAGES = ("nih_00000001_000.png", "nih_00027426_000.png", "tbx11k_h0001.png", "tbx11k_tb0005.png")

PTBXL_LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")
MIMIC_ECG_LEADS = ("I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6")


def _write_csv(path, columns, rows, gz: bool = False) -> None:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({c: row.get(c, "") for c in columns})
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if gz:
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
      f.write(buf.getvalue())
  else:
    with open(path, "w", encoding="utf-8", newline="") as f:
      f.write(buf.getvalue())


def read_fixture_csv(relative: str) -> list[dict[str, str]]:
  with open(FIXTURES / relative, encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f))


def iu_reports() -> dict[str, dict[str, str]]:
  """uid -> row of the real IU X-ray reports."""
  return {row["uid"]: row for row in read_fixture_csv("text/iu_xray_reports_uid001-030.csv")}


def expected_cxr_text(findings: str, impression: str) -> str:
  """The documented report rule: findings then impression, whitespace collapsed, one space between."""
  return " ".join(" ".join(part.split()) for part in (findings, impression) if part.strip())


# ------------------------------------------------------------------------------------------------------------
# ECG
# ------------------------------------------------------------------------------------------------------------


def write_wfdb(directory, record_name: str, source: str, *, lead_names=None, gain: float | None = None,
               base: datetime.datetime | None = None, comments=None, signal_mv: np.ndarray | None = None) -> None:
  """Writes fixture ECG `source` as WFDB `directory/record_name.hea/.dat` (format 16).

  lead_names: output names in output order, matched case-insensitively to the source's leads (so 'AVR' takes
  aVR). gain None keeps the source's ADC values and gain exactly; a number re-quantises the millivolts at that
  gain. signal_mv replaces the samples (in source lead order) before writing.
  """
  source_path = str(ECG_DIR / source)
  record = wfdb.rdrecord(source_path)
  names = list(lead_names or record.sig_name)
  position = {n.lower(): i for i, n in enumerate(record.sig_name)}
  columns = [position[n.lower()] for n in names]
  os.makedirs(directory, exist_ok=True)
  kwargs = dict(fs=record.fs, units=["mV"] * len(names), sig_name=names, fmt=["16"] * len(names),
                baseline=[0] * len(names), comments=comments, write_dir=str(directory))
  if base is not None:
    kwargs.update(base_time=base.time(), base_date=base.date())
  if gain is None and signal_mv is None:
    digital = wfdb.rdrecord(source_path, physical=False).d_signal[:, columns]
    wfdb.wrsamp(record_name, d_signal=digital, adc_gain=[record.adc_gain[c] for c in columns], **kwargs)
  else:
    values = record.p_signal if signal_mv is None else signal_mv
    wfdb.wrsamp(record_name, p_signal=values[:, columns], adc_gain=[gain or record.adc_gain[0]] * len(names),
                **kwargs)


def build_ptbxl(root, ecg_ids=(6000, 6001, 6002)) -> dict[int, dict[str, str]]:
  """PTB-XL: ptbxl_database.csv, scp_statements.csv, records500/NNNNN/NNNNN_hr.hea/.dat. Returns the rows."""
  rows = {int(r["ecg_id"]): r for r in read_fixture_csv("ecg/ptbxl_database_rows_6000-6002.csv")}
  columns = list(next(iter(rows.values())).keys())
  chosen = []
  for ecg_id in ecg_ids:
    row = dict(rows[ecg_id])
    # The release writes recording_date as "YYYY-MM-DD HH:MM:SS"; the fixture rows went through a spreadsheet.
    row["recording_date"] = datetime.datetime.strptime(row["recording_date"], "%m/%d/%y %H:%M").strftime(
        "%Y-%m-%d %H:%M:%S")
    chosen.append(row)
    folder = pathlib.Path(root) / row["filename_hr"]
    write_wfdb(folder.parent, folder.name, f"HR0{ecg_id}", lead_names=PTBXL_LEADS)
  _write_csv(os.path.join(root, "ptbxl_database.csv"), columns, chosen)
  # The release leaves the first column (the statement code) unnamed.
  with open(FIXTURES / "labels" / "ptbxl_scp_statements.csv", encoding="utf-8") as f:
    text = f.read()
  assert text.startswith("abbreviation,")
  with open(os.path.join(root, "scp_statements.csv"), "w", encoding="utf-8") as f:
    f.write(text[len("abbreviation"):])
  return {int(r["ecg_id"]): r for r in chosen}


@dataclasses.dataclass
class MimicEcgStudy:
  subject_id: str
  study_id: str
  source: str  # fixture ECG
  time: str  # ecg_time
  statements: tuple[str, ...]  # the real diagnoses of the fixture record, written as machine statements

  @property
  def path(self) -> str:
    return f"files/p{self.subject_id[:4]}/p{self.subject_id}/s{self.study_id}/{self.study_id}"


DEFAULT_ECG_STUDIES = (
    MimicEcgStudy("10000032", "40689238", "E07500", "2180-07-23 08:44:00",
                  ("Sinus bradycardia", "Left atrial enlargement")),
    MimicEcgStudy("10000032", "44458630", "E07502", "2180-07-24 09:54:00", ("Sinus tachycardia",)),
    MimicEcgStudy("10000764", "41111111", "E07506", "2132-10-14 23:31:00", ("Sinus rhythm",)),
    MimicEcgStudy("10001234", "42222222", "E07509", "2145-01-02 11:00:00",
                  ("Sinus bradycardia", "Right bundle branch block")),
)
MM_COLUMNS = (["subject_id", "study_id", "cart_id", "ecg_time"] + [f"report_{i}" for i in range(18)]
              + ["bandwidth", "filtering", "rr_interval", "p_onset", "p_end", "qrs_onset", "qrs_end", "t_end",
                 "p_axis", "qrs_axis", "t_axis"])


def build_mimic_ecg(root, studies=DEFAULT_ECG_STUDIES) -> None:
  """MIMIC-IV-ECG: record_list.csv, machine_measurements.csv, files/pNNNN/pSUBJECT/sSTUDY/STUDY.hea/.dat
  (200 units/mV, leads in MIMIC's order I II III aVR aVF aVL V1-V6)."""
  records, measurements = [], []
  for s in studies:
    folder = pathlib.Path(root) / s.path
    write_wfdb(folder.parent, folder.name, s.source, lead_names=MIMIC_ECG_LEADS, gain=200.0,
               base=datetime.datetime.strptime(s.time, "%Y-%m-%d %H:%M:%S"),
               comments=[f"<subject_id>: {s.subject_id}"])
    records.append({"subject_id": s.subject_id, "study_id": s.study_id, "file_name": s.study_id,
                    "ecg_time": s.time, "path": s.path})
    row = {"subject_id": s.subject_id, "study_id": s.study_id, "cart_id": "6848296", "ecg_time": s.time,
           "bandwidth": "0.005-150Hz", "filtering": "60 Hz notch Baseline filter", "rr_interval": "659"}
    row.update({f"report_{i}": text for i, text in enumerate(s.statements)})
    measurements.append(row)
  _write_csv(os.path.join(root, "record_list.csv"), ["subject_id", "study_id", "file_name", "ecg_time", "path"],
             records)
  _write_csv(os.path.join(root, "machine_measurements.csv"), MM_COLUMNS, measurements)


# ------------------------------------------------------------------------------------------------------------
# CXR
# ------------------------------------------------------------------------------------------------------------


def fixture_image(name: str, fmt: str = "JPEG") -> bytes:
  image = Image.open(FIXTURES / "cxr" / name).convert("L")
  out = io.BytesIO()
  image.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return out.getvalue()


def mimic_report(row: dict[str, str]) -> str:
  """An IU report laid out like a MIMIC-CXR report file (headers, blank lines, lines wrapped at 76)."""
  def block(text):
    return "\n".join(" " + line for line in textwrap.wrap(text, 76)) if text.strip() else ""
  parts = ["                                 FINAL REPORT",
           " EXAMINATION:  CHEST (PA AND LAT)", " ",
           f" INDICATION:  {row['indication']}", " ",
           f" COMPARISON:  {row['comparison']}", " "]
  if row["findings"].strip():
    parts += [" FINDINGS:", " ", block(row["findings"]), " "]
  if row["impression"].strip():
    parts += [" IMPRESSION:", " ", block(row["impression"])]
  return "\n".join(parts) + "\n"


@dataclasses.dataclass
class MimicCxrStudy:
  subject_id: str
  study_id: str
  images: tuple[tuple[str, str, str], ...]  # (dicom_id, ViewPosition, fixture image)
  date: str  # StudyDate YYYYMMDD
  time: str  # StudyTime HHMMSS.fff
  split: str  # official split: train / validate / test
  report_uid: str  # IU report used as this study's report
  chexpert: dict[str, str] | None  # label cells; None: no row in the chexpert table


DEFAULT_CXR_STUDIES = (
    MimicCxrStudy("10000032", "50414267",
                  (("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "PA", CXR_IMAGES[0]),
                   ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "LATERAL", CXR_IMAGES[1])),
                  "21800723", "083000.000", "train", "2",
                  {"Cardiomegaly": "1.0", "Lung Opacity": "-1.0", "Pleural Effusion": "0.0"}),
    MimicCxrStudy("10000032", "53189527",
                  (("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "AP", CXR_IMAGES[2]),),
                  "21800801", "73512.5", "train", "1", {"No Finding": "1.0"}),
    MimicCxrStudy("10000980", "54321000",
                  (("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "PA", CXR_IMAGES[3]),
                   ("0a0a0a0a-11111111-22222222-33333333-44444444", "AP", CXR_IMAGES[0])),
                  "21890606", "101010", "validate", "5", None),
)
CHEXPERT_COLUMNS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                    "Pneumonia", "Pneumothorax", "Support Devices")
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")
_VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}


def build_mimic_cxr(root, studies=DEFAULT_CXR_STUDIES, reports_root=None) -> None:
  """MIMIC-CXR-JPG (gzipped tables, files/pXX/pSUBJECT/sSTUDY/DICOM.jpg) plus MIMIC-CXR report files
  (reports_root/files/pXX/pSUBJECT/sSTUDY.txt; default root)."""
  reports_root = reports_root or root
  iu = iu_reports()
  metadata, splits, labels = [], [], []
  for s in studies:
    subject_dir = f"files/p{s.subject_id[:2]}/p{s.subject_id}"
    for dicom, view, image in s.images:
      data = fixture_image(image)
      path = pathlib.Path(root) / subject_dir / f"s{s.study_id}" / f"{dicom}.jpg"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(data)
      width, height = Image.open(io.BytesIO(data)).size
      metadata.append({"dicom_id": dicom, "subject_id": s.subject_id, "study_id": s.study_id,
                       "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                       "Rows": str(height), "Columns": str(width), "StudyDate": s.date, "StudyTime": s.time,
                       "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                       "ViewCodeSequence_CodeMeaning": _VIEW_MEANING[view],
                       "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
      splits.append({"dicom_id": dicom, "study_id": s.study_id, "subject_id": s.subject_id, "split": s.split})
    if s.chexpert is not None:
      labels.append({"subject_id": s.subject_id, "study_id": s.study_id, **s.chexpert})
    report = pathlib.Path(reports_root) / subject_dir / f"s{s.study_id}.txt"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(mimic_report(iu[s.report_uid]), encoding="utf-8")
  _write_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz"), METADATA_COLUMNS, metadata, gz=True)
  _write_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"), ["dicom_id", "study_id", "subject_id", "split"],
             splits, gz=True)
  _write_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"), ["subject_id", "study_id", *CHEXPERT_COLUMNS],
             labels, gz=True)


# ------------------------------------------------------------------------------------------------------------
# CPSC2018, CheXpert, Open-i
# ------------------------------------------------------------------------------------------------------------

# Recording -> (fixture ECG, CPSC classes read off the fixture's real SNOMED Dx codes)
CPSC_RECORDS = {"A0001": ("E07506", (1,)), "A0002": ("E07509", (5,)), "A0003": ("JS20003", (6, 7))}
CPSC_ORIGINAL_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def build_cpsc2018(root, records=CPSC_RECORDS, original: bool = False) -> None:
  """REFERENCE.csv + TrainingSet1/A000N.*: the fixture CinC .hea/.mat renamed (WFDB form), or with `original`
  the original release's form, A000N.mat alone holding a MATLAB struct ECG {sex, age, data [12, samples] in mV,
  rows in the release's lead order}."""
  from scipy import io as scipy_io  # pylint: disable=import-outside-toplevel
  folder = pathlib.Path(root) / "TrainingSet1"
  folder.mkdir(parents=True, exist_ok=True)
  rows = []
  for name, (source, classes) in records.items():
    if original:
      record = wfdb.rdrecord(str(ECG_DIR / source))
      position = {n.lower(): i for i, n in enumerate(record.sig_name)}
      data = record.p_signal[:, [position[n.lower()] for n in CPSC_ORIGINAL_LEADS]].T
      scipy_io.savemat(folder / f"{name}.mat", {"ECG": {"sex": "Male", "age": 60.0, "data": data}})
    else:
      header = (ECG_DIR / f"{source}.hea").read_text()
      (folder / f"{name}.hea").write_text(header.replace(source, name))
      shutil.copyfile(ECG_DIR / f"{source}.mat", folder / f"{name}.mat")
    rows.append({"Recording": name, **{c: str(v) for c, v in zip(
        ("First_label", "Second_label", "Third_label"), classes)}})
  _write_csv(os.path.join(root, "REFERENCE.csv"), ["Recording", "First_label", "Second_label", "Third_label"], rows)


CHEXPERT_TRAIN_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
                          "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                          "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                          "Pleural Other", "Fracture", "Support Devices")
FIVE = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def chexpert_rows() -> list[dict[str, str]]:
  """Label rows: 3 eligible per class (one with blanks for the other four) and 4 that must never be chosen."""
  rows, patient = [], 0

  def add(cells, view="Frontal"):
    nonlocal patient
    patient += 1
    side = "frontal" if view == "Frontal" else "lateral"
    rows.append({"Path": f"CheXpert-v1.0-small/train/patient{patient:05d}/study1/view1_{side}.jpg", "Sex": "Male",
                 "Age": "60", "Frontal/Lateral": view, "AP/PA": "AP" if view == "Frontal" else "", **cells})

  for name in FIVE:
    for k in range(3):
      others = {} if k == 2 else {o: "0.0" for o in FIVE if o != name}
      add({name: "1.0", "Support Devices": "1.0", **others})
  add({"Edema": "1.0", "Cardiomegaly": "1.0"})  # two of the five
  add({"Atelectasis": "1.0", "Edema": "-1.0"})  # uncertain on another of the five
  add({"Cardiomegaly": "1.0"}, view="Lateral")  # lateral
  add({"Consolidation": "-1.0", "No Finding": ""})  # uncertain only
  return rows


def build_chexpert(root) -> str:
  """root/CheXpert-v1.0-small/{train.csv, train/patientNNNNN/study1/view1_*.jpg}; returns the release folder."""
  release = os.path.join(root, "CheXpert-v1.0-small")
  rows = chexpert_rows()
  for k, row in enumerate(rows):
    path = pathlib.Path(root) / row["Path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fixture_image(CXR_IMAGES[k % len(CXR_IMAGES)]))
  _write_csv(os.path.join(release, "train.csv"), CHEXPERT_TRAIN_COLUMNS, rows)
  return release


OPENI_UIDS = ("1", "2", "3", "4", "5", "6")


def openi_frontal_name(uid: str) -> str:
  return f"{uid}_IM-{int(uid):04d}-1001.dcm.png"


def build_openi_csv(root, uids=OPENI_UIDS, lateral_only=("3",)) -> None:
  """indiana_reports.csv (the real rows, verbatim), indiana_projections.csv, images/images_normalized/*.png."""
  iu = iu_reports()
  folder = pathlib.Path(root) / "images" / "images_normalized"
  folder.mkdir(parents=True, exist_ok=True)
  projections = []
  for k, uid in enumerate(uids):
    names = [] if uid in lateral_only else [(openi_frontal_name(uid), "Frontal")]
    names.append((f"{uid}_IM-{int(uid):04d}-2001.dcm.png", "Lateral"))
    for j, (name, projection) in enumerate(names):
      (folder / name).write_bytes(fixture_image(CXR_IMAGES[(k + j) % len(CXR_IMAGES)], "PNG"))
      projections.append({"uid": uid, "filename": name, "projection": projection})
  columns = ("uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression")
  _write_csv(os.path.join(root, "indiana_reports.csv"), columns, [iu[u] for u in uids])
  _write_csv(os.path.join(root, "indiana_projections.csv"), ("uid", "filename", "projection"), projections)


def _openi_xml(uid: str, row: dict[str, str], image_ids) -> str:
  def esc(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
  abstract = "\n".join(f'        <AbstractText Label="{label}">{esc(row[key])}</AbstractText>'
                       for label, key in (("COMPARISON", "comparison"), ("INDICATION", "indication"),
                                          ("FINDINGS", "findings"), ("IMPRESSION", "impression")))
  images = "\n".join(f'  <parentImage id="{i}">\n    <figureId>F{k + 1}</figureId>\n    <caption>{esc(row["image"])}'
                     f'</caption>\n    <panel type="single">\n      <url>/hadoop/storage/radiology/extract/{i}.jpg'
                     f'</url>\n    </panel>\n  </parentImage>' for k, i in enumerate(image_ids))
  return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
  <meta type="rr"/>
  <uId id="CXR{uid}"/>
  <pmcId id="{uid}"/>
  <docSource>CXR</docSource>
  <IUXRId id="{uid}"/>
  <licenseType>open-access</licenseType>
  <licenseURL>http://creativecommons.org/licenses/by-nc-nd/4.0/</licenseURL>
  <ccLicense>byncnd</ccLicense>
  <articleType>XR</articleType>
  <publisher>Indiana University</publisher>
  <title>Indiana University Chest X-ray Collection</title>
  <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
    <Article PubModel="Electronic">
      <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
      <Abstract>
{abstract}
      </Abstract>
    </Article>
  </MedlineCitation>
  <MeSH>
    <major>{esc(row["MeSH"])}</major>
  </MeSH>
{images}
</eCitation>
"""


def build_openi_xml(root, uids=OPENI_UIDS) -> dict[str, str]:
  """ecgen-radiology/N.xml + NLMCXR_png/CXRN_...png; returns uid -> the first parentImage id."""
  iu = iu_reports()
  (pathlib.Path(root) / "ecgen-radiology").mkdir(parents=True, exist_ok=True)
  (pathlib.Path(root) / "NLMCXR_png").mkdir(parents=True, exist_ok=True)
  first = {}
  for k, uid in enumerate(uids):
    ids = [f"CXR{uid}_1_IM-{int(uid):04d}-{n}" for n in ("3001", "4001")]
    for j, image_id in enumerate(ids):
      (pathlib.Path(root) / "NLMCXR_png" / f"{image_id}.png").write_bytes(
          fixture_image(CXR_IMAGES[(k + j) % len(CXR_IMAGES)], "PNG"))
    (pathlib.Path(root) / "ecgen-radiology" / f"{uid}.xml").write_text(_openi_xml(uid, iu[uid], ids),
                                                                       encoding="utf-8")
    first[uid] = ids[0]
  return first


# ------------------------------------------------------------------------------------------------------------
# Reading converted output back through the training pipeline
# ------------------------------------------------------------------------------------------------------------


def read_converted(out) -> dict:
  """encounter_id -> Encounter of every record of every split, indexed with `pipeline.index_split` (CRCs and
  dataset_info counts checked) and decoded; each record's model inputs are decoded too (the modality's codec with
  its default spec, as the training pipeline does).

  Also checks what dataset_info.json must state: the schema version, source, licence and citation, a label-name
  list per modality, and per-split counts that match the records read."""
  from medbind_jax.data import codecs, pipeline, schema, tfrecord  # pylint: disable=import-outside-toplevel
  info = schema.read_dataset_info(str(out))
  assert info["schema_version"] == schema.SCHEMA_VERSION
  assert all(info[key].strip() for key in ("name", "source", "licence", "citation"))
  assert info["modalities"] and all(isinstance(info[f"{m}_label_names"], list) for m in info["modalities"])
  reader = tfrecord.RecordReader()
  records = {}
  for split in schema.SPLITS:
    index = pipeline.index_split(str(out), split, progress=False)
    counts = info["splits"][split]
    assert counts["num_examples"] == len(index.records)
    for modality in ("cxr", "ecg"):  # a modality the dataset does not declare has no count and no records
      assert counts.get(f"num_{modality}", 0) == len(index.pool(modality))
    assert counts["num_linked"] == sum(r.linked for r in index.records)
    for meta in index.records:
      enc = schema.decode_encounter(reader.read(meta.ref))
      assert enc.split == split and enc.dataset == info["name"] and enc.encounter_id == meta.encounter_id
      assert set(enc.parts) <= set(info["modalities"])
      for modality, part in enc.parts.items():
        codec = codecs.get(modality)
        spec = codec.make_spec(None)
        assert len(part.labels) == len(schema.label_names(info, modality))
        assert codec.preprocess(part.data, spec, None, enc.encounter_id).shape == codec.example_input(spec).shape
      records[enc.encounter_id] = enc
  return records


CANONICAL_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def expected_ecg_mv(record_path, rate: float | None = None, num_samples: int | None = None) -> np.ndarray:
  """wfdb's reading of a source record in millivolts, leads reordered by name into I..V6, resampled with
  scipy's polyphase filter and cropped like the converters document."""
  from fractions import Fraction  # pylint: disable=import-outside-toplevel
  from scipy import signal  # pylint: disable=import-outside-toplevel
  record = wfdb.rdrecord(str(record_path))
  position = {n.lower(): i for i, n in enumerate(record.sig_name)}
  values = record.p_signal[:, [position[n.lower()] for n in CANONICAL_LEADS]]
  if rate is not None and rate != record.fs:
    ratio = Fraction(rate / record.fs).limit_denominator(1000)
    values = signal.resample_poly(values, ratio.numerator, ratio.denominator, axis=0)
  return values[:num_samples] if num_samples else values


def assert_ecg_matches(enc, expected_mv: np.ndarray) -> None:
  """Stored samples / gain equal `expected_mv` within the documented bound 0.5 / gain (+ float32 rounding)."""
  ecg = enc.part("ecg").data
  assert tuple(ecg.leads) == CANONICAL_LEADS
  stored = ecg.signal_mv()
  assert stored.shape == expected_mv.shape
  bound = 0.5 / np.asarray(ecg.gain, np.float64) + 1e-6
  assert np.all(bound < 1e-3)  # below 1 uV for these records
  error = np.abs(stored.astype(np.float64) - expected_mv)
  assert np.all(error <= bound), f"max error {error.max()} mV > bound {bound.min()}"
