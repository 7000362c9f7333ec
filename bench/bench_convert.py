"""PTB-XL-style conversion throughput (data_prep/ptbxl.py) with 1 and 2 worker processes.

  python bench/bench_convert.py                  # 400 records
  python bench/bench_convert.py --records 2000 --workers 1,2    (or python -m bench.bench_convert ...)

Builds a PTB-XL tree in a temporary folder (ptbxl_database.csv, scp_statements.csv, records500/...) whose records
are copies of the real PTB-XL fixture ECG tests/fixtures/real/ecg/HR06000 (500 Hz, 10 s, 12 leads), converts it
with default options (500 Hz, 5000 samples, shards of 1000), and prints records/s of the whole run. The wall time
includes planning, shard writing and, with workers > 1, starting the 'spawn' worker processes (a few seconds on
the 2-core machines, each re-imports the project).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import pathlib
import shutil
import sys
import tempfile

import wfdb

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from data_prep import cli, ptbxl  # pylint: disable=wrong-import-position

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "real"
PTBXL_LEADS = ["I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def build_tree(root: pathlib.Path, num_records: int) -> None:
  """A PTB-XL layout of `num_records` copies of the fixture record HR06000 (ecg_id 1..N)."""
  with open(FIXTURES / "ecg" / "ptbxl_database_rows_6000-6002.csv", newline="") as f:
    template = next(csv.DictReader(f))
  source = wfdb.rdrecord(str(FIXTURES / "ecg" / "HR06000"), physical=False)
  position = {n.lower(): i for i, n in enumerate(source.sig_name)}
  digital = source.d_signal[:, [position[n.lower()] for n in PTBXL_LEADS]]
  template_dir = root / "template"
  template_dir.mkdir(parents=True)
  wfdb.wrsamp("template", fs=500, units=["mV"] * 12, sig_name=PTBXL_LEADS, d_signal=digital, fmt=["16"] * 12,
              adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(template_dir))
  header = (template_dir / "template.hea").read_text()
  rows = []
  for ecg_id in range(1, num_records + 1):
    name = f"{ecg_id:05d}_hr"
    folder = root / "records500" / f"{ecg_id // 1000 * 1000:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template_dir / "template.dat", folder / f"{name}.dat")
    (folder / f"{name}.hea").write_text(header.replace("template", name))
    rows.append({**template, "ecg_id": str(ecg_id), "strat_fold": str(ecg_id % 10 + 1),
                 "recording_date": "1991-04-14 13:47:00",
                 "filename_hr": f"records500/{ecg_id // 1000 * 1000:05d}/{name}",
                 "filename_lr": f"records100/{ecg_id // 1000 * 1000:05d}/{ecg_id:05d}_lr"})
  with open(root / "ptbxl_database.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(template), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
  text = (FIXTURES / "labels" / "ptbxl_scp_statements.csv").read_text()
  (root / "scp_statements.csv").write_text(text[len("abbreviation"):])  # first column unnamed, as released


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--records", type=int, default=400)
  parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
    src = pathlib.Path(tmp) / "ptbxl"
    build_tree(src, args.records)
    print(f"PTB-XL-style tree: {args.records} records (500 Hz, 10 s, 12 leads), cpu count {os.cpu_count()}")
    for workers in (int(w) for w in args.workers.split(",")):
      out = pathlib.Path(tmp) / f"out{workers}"
      with contextlib.redirect_stdout(io.StringIO()):  # the converter's own summary
        summary = ptbxl.convert(str(src), str(out), cli.Options(workers=workers, progress=False))
      assert summary.num_written == args.records and not summary.errors
      print(f"workers={workers}: {summary.num_written / summary.seconds:7.1f} records/s "
            f"({summary.seconds:.2f} s wall, incl. worker start-up)", flush=True)


if __name__ == "__main__":
  main()
