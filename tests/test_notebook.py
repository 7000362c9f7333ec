"""The Colab notebook (notebooks/medbind_colab.ipynb) runs end to end in a Jupyter kernel, as a user would run it
outside Colab: no install, this repository, CPU, tiny settings through its MEDBIND_NB_* parameters. Checked: no
cell fails, the run fits the time limit, and the outputs are the run's own: the evaluation tables hold the numbers
of the workdir's metrics.json, the displayed plots are the workdir's PNG files byte for byte, and each text query
printed 5 ranked test records of the searched modality with their own reports, by descending cosine similarity."""

import base64
import json
import os
import pathlib
import re
import time

import nbformat
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from medbind_jax.data import schema, tfrecord

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "medbind_colab.ipynb"
KERNEL = "medbind-notebook-test"
STEPS, BATCH_SIZE = 6, 16
WALL_LIMIT_S = 600  # a hang guard: the suite runs two test processes on 2 cores, so the notebook shares them
QUERY_HEADER = re.compile(r'^Query ".+" -> top (?P<k>\d+) of (?P<n>\d+) test (?P<modality>[A-Z]+)s \((?P<label>\w+): '
                          r"(?P<hits>\d) of the top \d, (?P<percent>\d+)% of all \d+; AUROC of the scores "
                          r"(?P<auroc>nan|\d\.\d{3})\)$", re.M)
RESULT_LINE = re.compile(r"^  (\d+)\. ([+-]\d\.\d{4})  (\S+)  \[(\S+)\]  (.*)$")


def _kernel_manager(tmp_path):
  """A kernel running this interpreter (this venv), whatever `python3` kernelspecs the machine has elsewhere."""
  kernels = tmp_path / "kernels"
  write_kernel_spec(kernels / KERNEL)  # kernel.json whose argv starts with sys.executable
  return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


def _kernel_env(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("MEDBIND_")}  # only the parameters set here
  # One CPU device, as on a CPU runtime (the pytest process's 8 fake devices are its own).
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
  env.update(JAX_PLATFORMS="cpu", MEDBIND_REPO=str(ROOT), MEDBIND_NB_STEPS=str(STEPS), MEDBIND_NB_PATIENTS="60",
             MEDBIND_NB_BATCH_SIZE=str(BATCH_SIZE), MEDBIND_NB_MODEL_SIZE="tiny",
             MEDBIND_NB_WORKDIR=str(tmp_path / "workdir"), MEDBIND_NB_DATA_DIR=str(tmp_path / "world"))
  return env


def _outputs(nb):
  return [(i, out) for i, cell in enumerate(nb.cells) if cell.cell_type == "code" for out in cell.get("outputs", [])]


def _text(out):
  if out.output_type == "stream":
    return out.text
  return out.get("data", {}).get("text/markdown", "") + out.get("data", {}).get("text/plain", "")


def _test_records(data_dir):
  info = schema.read_dataset_info(data_dir)
  return {enc.encounter_id: enc for shard in info["splits"]["test"]["shards"]
          for enc in (schema.decode_encounter(data) for _, data in tfrecord.iter_records(data_dir / shard["file"]))}


def test_notebook_runs_end_to_end_and_shows_the_runs_results(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert not _outputs(nb) and all(cell.get("execution_count") is None for cell in nb.cells), \
      "the notebook is stored with its outputs cleared"
  assert any("parameters" in cell.metadata.get("tags", ()) for cell in nb.cells)
  client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=WALL_LIMIT_S,
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  start = time.perf_counter()
  client.execute(env=_kernel_env(tmp_path))  # raises CellExecutionError naming the cell that failed
  wall = time.perf_counter() - start
  assert wall < WALL_LIMIT_S, f"the notebook took {wall:.0f} s"
  outputs = _outputs(nb)
  assert not [out for _, out in outputs if out.output_type == "error"]
  printed = "".join(_text(out) for _, out in outputs)

  # Outside Colab nothing is installed; the tiny parameters reached the run through the environment.
  assert "Not in Colab" in printed and f"repository: {ROOT}" in printed
  assert "backend: cpu" in printed
  assert f"{STEPS} steps at batch {BATCH_SIZE}" in printed and "world of 60 patients" in printed
  workdir, data_dir = tmp_path / "workdir", tmp_path / "world"
  metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert metrics["step"] == STEPS

  # The evaluation tables: every summary row is the workdir's metrics.json value; the retrieval table is there.
  tables = [out.data["text/markdown"] for _, out in outputs if "text/markdown" in out.get("data", {})
            and "| metric | value |" in out.data["text/markdown"]]
  assert len(tables) == 1 and "| direction |" in tables[0] and "R@1 (chance)" in tables[0]
  rows = [row for row in re.findall(r"^\| ([\w/@.-]+) \| (\S+) \|$", tables[0], re.M) if row != ("metric", "value")]
  assert len(rows) >= 6 and any(name.startswith("retrieval/") for name, _ in rows)
  for name, value in rows:
    assert value == f"{metrics[name]:.4g}", name

  # The two evaluation plots, displayed as the trainer wrote them; other figures (loss curve, thumbnails) too.
  images = [base64.b64decode(out.data["image/png"]) for _, out in outputs if "image/png" in out.get("data", {})]
  for name in ("embedding_map.png", "few_shot_curves.png"):
    assert (workdir / "eval" / name).read_bytes() in images, name
  assert len(images) >= 4

  # Each query: 5 ranked records of the searched modality (CXRs and ECGs both searched), each with its own report and
  # label mark, the header's counts those of the test split.
  records = _test_records(data_dir)
  info = schema.read_dataset_info(data_dir)
  headers = list(QUERY_HEADER.finditer(printed))
  assert {h.group("modality") for h in headers} == {"CXR", "ECG"}, printed
  for header in headers:
    modality, label = header.group("modality").lower(), header.group("label")
    names = schema.label_names(info, modality)
    gallery = [r for r in records.values() if r.has(modality)]
    assert header.group("k") == "5" and int(header.group("n")) == len(gallery)
    base = sum(r.part(modality).labels[names.index(label)] == 1 for r in gallery) / len(gallery)
    assert header.group("percent") == f"{100 * base:.0f}"
    assert header.group("auroc") == "nan" or 0 <= float(header.group("auroc")) <= 1
    hits = [RESULT_LINE.match(line) for line in printed[header.end():].splitlines()[1:6]]
    assert all(hits), printed[header.end():][:2000]
    ranks, scores, ids = [int(h.group(1)) for h in hits], [float(h.group(2)) for h in hits], [h.group(3) for h in hits]
    assert ranks == [1, 2, 3, 4, 5] and len(set(ids)) == 5
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    for hit, encounter_id in zip(hits, ids):
      part = records[encounter_id].part(modality)
      assert hit.group(5) == part.report
      assert hit.group(4) == (label if part.labels[names.index(label)] == 1 else "-")
    assert int(header.group("hits")) == sum(hit.group(4) == label for hit in hits)
