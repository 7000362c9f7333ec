"""Converter robustness (data_prep/runner.py): every bad-input case is logged with its reason while the run completes,
the exit code follows --max-error-rate, a re-run after an interruption redoes only the missing shards and gives the
same bytes, worker processes give the same bytes as one process; plus the shared ECG / image / text helpers
(data_prep/ecg_io.py, cxr_io.py, report_text.py)."""

import csv
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import wfdb

import real_layouts as L
from data_prep import (chexpert5x200, cli, cpsc2018, cxr_io, ecg_io, mimic, mimic_cxr, mimic_ecg, openi, ptbxl,
                       report_text, runner)
from data_prep.errors import RecordError
from medbind_jax.data import schema

REPO = pathlib.Path(__file__).resolve().parents[1]
BAD = "06001"  # the PTB-XL record each ECG case damages (train split)


def _files(directory) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(pathlib.Path(directory).iterdir()) if p.is_file()}


def _errors(out) -> list[tuple[str, str]]:
  lines = (pathlib.Path(out) / runner.ERRORS_FILE).read_text().splitlines()
  return [(e["record_id"], e["kind"]) for e in map(json.loads, lines)]


def _reasons(out) -> list[str]:
  lines = (pathlib.Path(out) / runner.ERRORS_FILE).read_text().splitlines()
  return [e["reason"] for e in map(json.loads, lines)]


# ------------------------------------------------------------------------------------------------------------
# Bad ECG records (PTB-XL layout)
# ------------------------------------------------------------------------------------------------------------


def _record(src, ecg_id=BAD) -> pathlib.Path:
  return src / "records500" / "06000" / f"{ecg_id}_hr"


def _edit_header(src, old, new):
  path = _record(src).with_suffix(".hea")
  path.write_text(path.read_text().replace(old, new))


def _rewrite_signal(src, change):
  """Rewrites the bad record from its fixture with `change(signal_mv)` applied (source lead order)."""
  signal_mv = wfdb.rdrecord(str(L.ECG_DIR / "HR06001")).p_signal.copy()
  change(signal_mv)
  record = _record(src)
  L.write_wfdb(record.parent, record.name, "HR06001", lead_names=L.PTBXL_LEADS, signal_mv=signal_mv)


def _blank_report(src):
  path = src / "ptbxl_database.csv"
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    if row["ecg_id"] == str(int(BAD)):
      row["report"] = "  "
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def _truncate(path, size):
  with open(path, "r+b") as f:
    f.truncate(size)


def _flip_bytes(path):
  data = bytearray(path.read_bytes())
  data[5000:5010] = bytes(b ^ 0x55 for b in data[5000:5010])
  path.write_bytes(bytes(data))


def _convert_ptbxl(src, out) -> int:
  return ptbxl.main(["--src", str(src), "--out", str(out), "--workers", "1", "--no-progress",
                     "--max-error-rate", "0.5"])


# case -> (damage, error kind, a piece of the logged reason that names what is wrong)
ECG_CASES = {
    "missing .dat": (lambda src: _record(src).with_suffix(".dat").unlink(), "missing file", "06001_hr.dat"),
    "missing record": (lambda src: [_record(src).with_suffix(s).unlink() for s in (".dat", ".hea")],
                       "missing file", "06001_hr.hea"),
    "truncated .dat": (lambda src: _truncate(_record(src).with_suffix(".dat"), 50000), "truncated signal file",
                       "has 50000 bytes, the header needs 120000"),
    "damaged .dat": (lambda src: _flip_bytes(_record(src).with_suffix(".dat")), "checksum mismatch",
                     "damaged signal file"),
    "non-finite samples": (lambda src: _rewrite_signal(src, lambda x: x.__setitem__((slice(100, 120), 4), np.nan)),
                           "non-finite samples", "20 in leads ['aVL']"),  # source column 4 is AVL
    "flat lead": (lambda src: _rewrite_signal(src, lambda x: x.__setitem__((slice(None), 7), 0.0)), "flat leads",
                  "['V2']"),
    "missing lead": (lambda src: _edit_header(src, " V6\n", " V7\n"), "missing leads", "['V6']"),
    "lead named twice": (lambda src: _edit_header(src, " V6\n", " v5\n"), "duplicate lead", "V5 appears twice"),
    "empty report": (_blank_report, "empty report", "blank `report` column"),
}


@pytest.mark.parametrize("case", sorted(ECG_CASES))
def test_a_bad_ecg_record_is_logged_and_the_rest_converted(case, tmp_path, capsys):
  src, out = tmp_path / "src", tmp_path / "out"
  L.build_ptbxl(src)
  damage, kind, reason = ECG_CASES[case]
  damage(src)
  assert _convert_ptbxl(src, out) == 0
  assert _errors(out) == [(BAD, kind)]
  assert reason in _reasons(out)[0]
  assert sorted(L.read_converted(out)) == ["06000", "06002"]
  info = json.loads((out / schema.DATASET_INFO).read_text())
  assert info["errors"]["num_errors"] == 1 and info["errors"]["by_kind"] == {kind: 1}
  assert info["errors"]["error_rate"] == pytest.approx(1 / 3)
  summary = capsys.readouterr()
  assert f"error: {BAD}: {kind}" in summary.err and "errors: 1 (33.33%" in summary.out


def test_a_lead_stored_inverted_converts_to_the_true_lead_and_is_marked(tmp_path):
  # The bad record's aVR column holds -aVR (the Cabrera display's inverted lead) and its header names it so.
  src, out = tmp_path / "src", tmp_path / "out"
  L.build_ptbxl(src)
  _rewrite_signal(src, lambda x: x.__setitem__((slice(None), 3), -x[:, 3]))  # source column 3 is AVR
  _edit_header(src, " AVR\n", " -AVR\n")
  assert wfdb.rdheader(str(_record(src))).sig_name[3] == "-AVR"
  assert _convert_ptbxl(src, out) == 0
  assert not (out / runner.ERRORS_FILE).read_text().strip()
  records = L.read_converted(out)
  # The stored aVR is the true one (the fixture's), every lead within the stated int16 bound.
  L.assert_ecg_matches(records[BAD], L.expected_ecg_mv(L.ECG_DIR / "HR06001"))
  np.testing.assert_array_equal(records[BAD].extras[ecg_io.INVERTED_LEADS], [0, 0, 0, 1] + [0] * 8)
  assert ecg_io.INVERTED_LEADS not in records["06000"].extras  # records without an inverted lead: no mark
  assert f"extra/{ecg_io.INVERTED_LEADS}" in json.loads((out / schema.DATASET_INFO).read_text())["ecg_storage"]


def test_a_renamed_lead_is_logged_naming_the_missing_lead_and_the_unrecognised_name(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  L.build_ptbxl(src)
  _edit_header(src, " V6\n", " V7\n")
  assert _convert_ptbxl(src, out) == 0
  assert _errors(out) == [(BAD, "missing leads")]
  (reason,) = _reasons(out)
  assert "missing leads: ['V6']" in reason and "unrecognised lead names ['V7']" in reason, reason


def test_the_exit_code_is_non_zero_above_the_error_rate_limit_yet_the_output_is_complete(tmp_path):
  src = tmp_path / "src"
  L.build_ptbxl(src)
  _truncate(_record(src).with_suffix(".dat"), 100)
  args = ["--src", str(src), "--workers", "1", "--no-progress"]
  assert ptbxl.main(args + ["--out", str(tmp_path / "a"), "--max-error-rate", "0.34"]) == 0  # 1/3 = 0.333
  assert ptbxl.main(args + ["--out", str(tmp_path / "b"), "--max-error-rate", "0.2"]) == 1
  assert sorted(L.read_converted(tmp_path / "b")) == ["06000", "06002"]
  assert _errors(tmp_path / "b") == [(BAD, "truncated signal file")]


# ------------------------------------------------------------------------------------------------------------
# Bad images and reports (Open-i and MIMIC layouts)
# ------------------------------------------------------------------------------------------------------------

IMAGE_DIR = pathlib.Path("images") / "images_normalized"
IMAGE_CASES = {
    "garbage image": (lambda src: (src / IMAGE_DIR / L.openi_frontal_name("2")).write_bytes(b"not a png" * 50),
                      "unreadable image", "cannot identify image file"),
    "truncated image": (lambda src: _truncate(src / IMAGE_DIR / L.openi_frontal_name("2"), 600),
                        "unreadable image", L.openi_frontal_name("2")),
    "missing image": (lambda src: (src / IMAGE_DIR / L.openi_frontal_name("2")).unlink(), "missing file",
                      L.openi_frontal_name("2")),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_a_bad_image_is_logged_and_the_rest_converted(case, tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  L.build_openi_csv(src, uids=("1", "2", "5"), lateral_only=())
  damage, kind, reason = IMAGE_CASES[case]
  damage(src)
  assert openi.main(["--src", str(src), "--out", str(out), "--workers", "1", "--no-progress",
                     "--max-error-rate", "0.5"]) == 0
  assert _errors(out) == [("2", kind)]
  assert reason in _reasons(out)[0]
  assert sorted(L.read_converted(out)) == ["1", "5"]


def test_an_unreadable_mimic_cxr_jpeg_is_logged(tmp_path):
  src = tmp_path / "src"
  L.build_mimic_cxr(src)
  image = src / "files/p10/p10000032/s53189527/2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab.jpg"
  _truncate(image, 400)
  code = mimic_cxr.main(["--src", str(src), "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
  assert code == 1  # 1 of 3 studies > the default 5 %
  assert _errors(tmp_path / "out") == [("s53189527", "unreadable image")]
  assert image.name in _reasons(tmp_path / "out")[0]
  assert sorted(L.read_converted(tmp_path / "out")) == ["s50414267", "s54321000"]


def test_an_empty_report_is_logged(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  L.build_openi_csv(src, uids=("1", "16", "5"), lateral_only=())  # IU report 16 has neither findings nor impression
  assert openi.main(["--src", str(src), "--out", str(out), "--workers", "1", "--no-progress"]) == 1  # 1/3 > 5%
  assert _errors(out) == [("16", "empty report")]
  assert sorted(L.read_converted(out)) == ["1", "5"]


def test_mimic_cxr_missing_or_sectionless_reports_are_logged(tmp_path):
  src = tmp_path / "src"
  L.build_mimic_cxr(src)
  (src / "files/p10/p10000032/s53189527.txt").unlink()
  (src / "files/p10/p10000980/s54321000.txt").write_text("                 FINAL REPORT\n CHEST RADIOGRAPH\n")
  summary = mimic_cxr.convert(str(src), str(tmp_path / "out"), cli.Options(workers=1, progress=False,
                                                                                max_error_rate=1.0))
  assert [(e["record_id"], e["kind"]) for e in summary.errors] == [("s53189527", "missing file"),
                                                                   ("s54321000", "empty report")]
  assert sorted(L.read_converted(tmp_path / "out")) == ["s50414267"]


def test_mimic_ecg_study_without_statements_is_logged(tmp_path):
  src = tmp_path / "src"
  studies = L.DEFAULT_ECG_STUDIES[:2] + (L.MimicEcgStudy("10000764", "41111111", "E07506", "2132-10-14 23:31:00", ()),)
  L.build_mimic_ecg(src, studies)
  summary = mimic_ecg.convert(str(src), str(tmp_path / "out"), cli.Options(workers=1, progress=False))
  assert [(e["record_id"], e["kind"]) for e in summary.errors] == [("s41111111", "empty report")]
  assert summary.exit_code == 1 and summary.num_written == 2


# ------------------------------------------------------------------------------------------------------------
# Resume, determinism, processes
# ------------------------------------------------------------------------------------------------------------


def test_a_rerun_after_an_interruption_redoes_only_the_missing_shards_byte_identically(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  L.build_ptbxl(src)
  _truncate(_record(src, "06002").with_suffix(".dat"), 100)  # its shard is kept empty, its error must persist
  options = cli.Options(shard_size=1, workers=1, progress=False, max_error_rate=0.5)
  first = ptbxl.convert(str(src), str(out), options)
  assert sorted(first.shards_written) == ["test.tfrecord-00000-of-00001", "train.tfrecord-00000-of-00002",
                                          "train.tfrecord-00001-of-00002"]
  expected = _files(out)
  kept = out / "train.tfrecord-00001-of-00002"
  kept_stat = kept.stat()
  # Interrupted: one finished shard lost, another left unfinished as a stray .tmp, the end-of-run files not written.
  (out / "train.tfrecord-00000-of-00002").unlink()
  os.replace(out / "test.tfrecord-00000-of-00001", out / "test.tfrecord-00000-of-00001.tmp")
  _truncate(out / "test.tfrecord-00000-of-00001.tmp", 1000)
  for name in (schema.DATASET_INFO, runner.ERRORS_FILE):
    (out / name).unlink()
  second = ptbxl.convert(str(src), str(out), options)
  assert second.shards_reused == ["train.tfrecord-00001-of-00002"]
  assert sorted(second.shards_written) == ["test.tfrecord-00000-of-00001", "train.tfrecord-00000-of-00002"]
  assert _files(out) == expected
  assert kept.stat().st_mtime_ns == kept_stat.st_mtime_ns and kept.stat().st_ino == kept_stat.st_ino
  assert _errors(out) == [("06002", "truncated signal file")]


def test_other_options_refuse_to_mix_with_a_previous_run_unless_overwrite(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  L.build_ptbxl(src)
  ptbxl.convert(str(src), str(out), cli.Options(shard_size=1, workers=1, progress=False))
  with pytest.raises(FileExistsError, match="--overwrite"):
    ptbxl.convert(str(src), str(out), cli.Options(shard_size=2, workers=1, progress=False))
  ptbxl.convert(str(src), str(out), cli.Options(shard_size=2, workers=1, progress=False, overwrite=True))
  assert sorted(p.name for p in out.iterdir() if ".tfrecord-" in p.name) == [
      "test.tfrecord-00000-of-00001", "train.tfrecord-00000-of-00001"]


def test_the_cli_with_two_worker_processes_writes_the_same_bytes_as_one_process(tmp_path):
  src = tmp_path / "src"
  L.build_ptbxl(src)
  _blank_report(src)
  options = cli.Options(shard_size=1, workers=1, progress=False, max_error_rate=0.5)
  ptbxl.convert(str(src), str(tmp_path / "one"), options)
  result = subprocess.run(
      [sys.executable, "-m", "data_prep.ptbxl", "--src", str(src), "--out", str(tmp_path / "two"), "--workers", "2",
       "--shard-size", "1", "--max-error-rate", "0.5", "--no-progress"],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert "errors: 1" in result.stdout
  assert _files(tmp_path / "two") == _files(tmp_path / "one")


CONVERTERS = (chexpert5x200, cpsc2018, mimic, mimic_cxr, mimic_ecg, openi, ptbxl)


@pytest.mark.parametrize("module", CONVERTERS, ids=lambda m: m.__name__)
def test_every_converter_has_the_common_command_line(module, capsys):
  with pytest.raises(SystemExit) as exit_info:
    module.main(["--help"])
  assert exit_info.value.code == 0
  usage = capsys.readouterr().out
  for option in ("--src", "--out", "--workers", "--shard-size", "--max-error-rate", "--no-progress",
                 "--overwrite"):
    assert option in usage, option
  assert ("--sampling-rate" in usage) == (module in (cpsc2018, mimic, mimic_ecg, ptbxl))
  assert ("--image-size" in usage) == (module in (chexpert5x200, mimic, mimic_cxr, openi))


def _cli_sources(name, root) -> tuple[list[str], int]:
  """(the converter's arguments for a miniature tree under root, records it must write)."""
  if name == "chexpert5x200":
    return ["--src", L.build_chexpert(root), "--per-class", "1"], 5
  if name == "cpsc2018":
    L.build_cpsc2018(root)
    return ["--src", str(root)], len(L.CPSC_RECORDS)
  if name == "mimic_ecg":
    L.build_mimic_ecg(root)
    return ["--src", str(root)], len(L.DEFAULT_ECG_STUDIES)
  L.build_mimic_cxr(root / "cxr")
  L.build_mimic_ecg(root / "ecg")
  return ["--src", str(root / "cxr"), "--ecg-src", str(root / "ecg"), "--window-hours", "1"], 6


@pytest.mark.parametrize("name", ["chexpert5x200", "cpsc2018", "mimic", "mimic_ecg"])
def test_converters_run_from_their_command_line(name, tmp_path):
  args, count = _cli_sources(name, tmp_path / "src")
  module = {m.__name__.split(".")[-1]: m for m in CONVERTERS}[name]
  assert module.main(args + ["--out", str(tmp_path / "out"), "--workers", "1", "--shard-size", "2",
                             "--no-progress"]) == 0
  records = L.read_converted(tmp_path / "out")
  assert len(records) == count
  info = json.loads((tmp_path / "out" / schema.DATASET_INFO).read_text())
  assert info["conversion_options"]["shard_size"] == 2
  assert all(s["num_examples"] <= 2 for split in info["splits"].values() for s in split["shards"])


# ------------------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------------------


def test_quantize_never_clips_and_meets_the_stated_bound():
  rng = np.random.default_rng(0)
  peaks = np.array([0.01, 1.0, 5.0, 16.0, 32.0, 45.0])
  signal_mv = rng.uniform(-1, 1, (3000, peaks.size)) * peaks
  signal_mv[17] = peaks  # each lead reaches its peak
  samples, gain = ecg_io.quantize_ecg(signal_mv)
  assert samples.dtype == np.int16 and gain.dtype == np.float32
  assert np.all(np.abs(samples.astype(np.int32)).max(axis=0) >= 32766)  # full int16 range used
  error = np.abs(samples / gain.astype(np.float64) - signal_mv).max(axis=0)
  assert np.all(error <= 0.5 / gain + 1e-9)
  assert np.all(error[peaks <= 32.7] <= 0.5e-3)  # <= 0.5 uV within +-32.7 mV


def test_leads_are_matched_by_name_with_aliases():
  names = ["V6", "avr", "Lead_I", "AVL", "ii", "III", "aVF", "V1", "v2", "V-3", "V4", "V5", "vx"]
  order, signs = ecg_io.match_leads(names)
  assert [names[i] for i in order] == ["Lead_I", "ii", "III", "avr", "AVL", "aVF", "V1", "v2", "V-3", "V4", "V5",
                                       "V6"]
  assert signs == [1] * 12
  with pytest.raises(RecordError, match="missing leads.*V6"):
    ecg_io.match_leads(names[1:])
  with pytest.raises(RecordError, match="duplicate lead"):
    ecg_io.match_leads(names + ["AVR"])
  with pytest.raises(RecordError, match=r"duplicate lead: aVR appears twice \(as \['avr', '-AVR'\]\)"):
    ecg_io.match_leads(names + ["-AVR"])  # a lead given signed and unsigned


def test_report_sections_of_a_mimic_style_report():
  report = ("                 FINAL REPORT\n EXAMINATION:  CHEST (PORTABLE AP)\n\n INDICATION:  ___ with fever\n\n"
            " FINDINGS AND IMPRESSION: \n Heart size is normal.  No\n effusion.\n\n NOTIFICATION:  Discussed with"
            " Dr. ___.\n")
  assert report_text.findings_impression(report) == ("Heart size is normal. No effusion.", "")
  assert report_text.cxr_report_text(*report_text.findings_impression(report)) == "Heart size is normal. No effusion."
  sections = report_text.report_sections(" FINDINGS:\n A\n b.\n IMPRESSION:\n  C.\n")
  assert sections == {"FINDINGS": "A b.", "IMPRESSION": "C."}
  with pytest.raises(RecordError, match="empty report"):
    report_text.cxr_report_text(" ", "")


def test_statements_join():
  assert report_text.join_statements(["Sinus rhythm", "", "  Normal ECG.", None, "Borderline ECG"]) == \
      "Sinus rhythm. Normal ECG. Borderline ECG."


def test_sixteen_bit_images_are_stored_as_8_bit_png():
  arr = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 13)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  stored = Image.open(io.BytesIO(cxr_io.prepare_image(buf.getvalue(), 512)))
  assert stored.mode == "L" and stored.size == (64, 48)
  assert np.asarray(stored).min() == 0 and np.asarray(stored).max() == 255
  with pytest.raises(RecordError, match="image too small"):
    cxr_io.prepare_image(_tiny_png(), 512)


def _tiny_png() -> bytes:
  buf = io.BytesIO()
  Image.new("L", (16, 16)).save(buf, format="PNG")
  return buf.getvalue()
