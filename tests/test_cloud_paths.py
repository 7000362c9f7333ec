"""Every file through etils.epath: convert -> train -> resume -> eval with every path under gs://, on an in-memory
GCS (`fake_gcs`: fsspec for epath, a GCS JSON API endpoint for TensorStore, which writes orbax's checkpoint arrays),
checking the outputs land there, equal to what a local run writes, and that nothing lands on the local disk.

Each test runs from an empty working directory: a gs:// path handled by plain `os` / `open` would show up there as
a folder named `gs:`.
"""

import json
import os

import numpy as np
import pytest

import fake_gcs
import real_layouts as L
from data_prep import cli, openi, ptbxl
from data_prep import synthetic_world as sw
from medbind_jax import embed, paths, runs, train
from medbind_jax.data import pipeline, schema, tfrecord
from tiny_config import tiny_config
from tiny_data import write_tiny_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = cli.Options(shard_size=2, workers=1, progress=False)


@pytest.fixture(scope="module")
def server():
  s = fake_gcs.FakeGcsServer()
  yield s
  s.stop()


@pytest.fixture
def gcs(monkeypatch, server, tmp_path):
  """The in-memory gs:// for one test, run from an empty working directory that must stay empty."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with fake_gcs.fake_gcs(monkeypatch, server) as fs:
    yield fs
  assert os.listdir(cwd) == [], "something was written relative to the working directory"
  for root in (REPO, str(tmp_path)):
    for directory, dirs, _ in os.walk(root):
      dirs[:] = [d for d in dirs if d not in (".git", ".venv", "__pycache__")]
      assert "gs:" not in dirs, f"a local folder named gs: in {directory}"


def _tree(root: str) -> dict[str, bytes]:
  """name relative to `root` -> bytes, of every file under `root` (local or gs://)."""
  return {os.path.relpath(p, root) if paths.is_local(root) else p[len(root) + 1:]: paths.read_bytes(p)
          for p in paths.list_files(root)}


def test_converters_write_and_read_gs_paths_like_local_ones(gcs, tmp_path):
  # PTB-XL: a local source (wfdb reads local files) converted into gs://, and the same into a local folder.
  src = tmp_path / "ptbxl_src"
  L.build_ptbxl(src)
  local, remote = str(tmp_path / "ptbxl_out"), "gs://bucket/ptbxl"
  ptbxl.convert(str(src), local, OPTIONS)
  summary = ptbxl.convert(str(src), remote, OPTIONS)
  assert summary.exit_code == 0
  want, got = _tree(local), _tree(remote)
  assert sorted(got) == sorted(want) and got == want  # byte for byte: shards, indexes, dataset_info, logs
  assert any(".index-" in name for name in got) and schema.DATASET_INFO in got
  assert not any(".tmp" in name for name in got)
  assert L.read_converted(remote).keys() == L.read_converted(local).keys()  # read back through the pipeline

  # Resume: a re-run keeps every finished shard (and writes the same bytes).
  ptbxl.convert(str(src), remote, OPTIONS)
  assert _tree(remote) == want

  # Open-i (xml layout): the source itself under gs://, as CXR sources may be (tables, XML, images via epath).
  openi_src = tmp_path / "openi_src"
  L.build_openi_xml(openi_src)
  for name, data in _tree(str(openi_src)).items():
    paths.as_path(f"gs://bucket/openi_src/{name}").write_bytes(data)
  openi.convert(str(openi_src), str(tmp_path / "openi_out"), cli.Options(shard_size=4, workers=1, progress=False))
  openi.convert("gs://bucket/openi_src", "gs://bucket/openi", cli.Options(shard_size=4, workers=1, progress=False))
  want, got = _tree(str(tmp_path / "openi_out")), _tree("gs://bucket/openi")
  info_want, info_got = (json.loads(t.pop(schema.DATASET_INFO)) for t in (want, got))
  assert got == want
  assert {k: v for k, v in info_got.items() if k != "fingerprint"} == \
      {k: v for k, v in info_want.items() if k != "fingerprint"}


def test_synthetic_world_and_embedding_index_on_gs(gcs):
  params = sw.WorldParams(num_patients=6, num_shards=(1, 1, 1))
  info = sw.ensure_world("gs://bucket/world", params, workers=1, progress=False)
  names = {k.rsplit("/", 1)[1] for k in gcs.files() if k.startswith("gs://bucket/world/")}
  assert schema.DATASET_INFO in names and {s["file"] for v in info["splits"].values() for s in v["shards"]} < names
  assert sum(".index-" in n for n in names) == 3
  stored = gcs.files()
  assert sw.ensure_world("gs://bucket/world", params, workers=1, progress=False) == info  # reused, not rewritten
  assert gcs.files() == stored
  index = pipeline.index_split("gs://bucket/world", "train", progress=False)
  assert len(index.records) == info["splits"]["train"]["num_examples"]
  assert pipeline.ExampleReader(index, {"cxr": None}).encounter(0).encounter_id == index.records[0].encounter_id

  rng = np.random.default_rng(0)
  entries = embed.Index(embeddings=rng.normal(size=(3, 4)).astype(np.float32), ids=np.asarray(["a", "b", "c"]),
                        modality=np.asarray(["cxr", "ecg", "text"]), sources=np.asarray(["x", "y", "z:1"]),
                        texts=np.asarray(["", "", "some text"]), info={"workdir": "gs://bucket/run", "step": 2})
  for name in ("index.npz", "index.safetensors"):
    embed.save_index(f"gs://bucket/{name}", entries)
    back = embed.load_index(f"gs://bucket/{name}")
    np.testing.assert_array_equal(back.embeddings, entries.embeddings)
    assert back.info == entries.info and list(back.texts) == list(entries.texts)


def test_train_resume_and_evaluate_with_every_path_on_gs(gcs, server):
  write_tiny_dataset("gs://bucket/data", num_records=32, num_shards=2, splits=("train", "test"))
  workdir = "gs://bucket/run"
  config = tiny_config("gs://bucket/data", cache_dir="gs://bucket/cache", keep_checkpoints=2)
  calls = len(server.calls)

  # Pre-empted after step 3 (last checkpoint: step 2), then restarted with the same command.
  assert train.train_and_evaluate(config, workdir, stop_after_step=3) is None
  assert runs.checkpoint_steps(workdir) == [2]
  assert any(method == "POST" for method, _ in server.calls[calls:]), "TensorStore wrote no array to the fake GCS"
  assert not server.unhandled
  results = train.train_and_evaluate(config, workdir)
  assert runs.checkpoint_steps(workdir) == [4, 6]  # keep_checkpoints=2: orbax deleted step 2 on gs:// too

  files = gcs.files()
  run = {k[len(workdir) + 1:] for k in files if k.startswith(workdir + "/")}
  assert {"config.json", "metrics.jsonl", "metrics.json", "text_trunk.json", "eval/metrics.json",
          "eval/report.md"} <= run
  events = [n for n in run if n.startswith("tensorboard/events.out.tfevents")]
  assert len(events) == 2  # one per run, each a readable TFRecord file of events
  assert all(len(list(tfrecord.iter_records(f"{workdir}/{n}"))) > 6 for n in events)
  assert any(n.startswith("checkpoints/6/state/") for n in run)
  assert any(n.startswith("checkpoints/6/data/") for n in run)
  assert any(k.startswith("gs://bucket/cache/text_features_") and k.endswith(".npy") for k in files)
  assert sum(".index-" in k for k in files if k.startswith("gs://bucket/data/")) == 4  # written on first use
  assert all(s.get("index") for v in schema.read_dataset_info("gs://bucket/data")["splits"].values()
             for s in v["shards"])
  rows = [json.loads(line) for line in files[f"{workdir}/metrics.jsonl"].decode().splitlines()]
  train_steps = [row["step"] for row in rows if "loss" in row]
  assert train_steps == list(range(1, 7))  # resume truncated nothing it needed and logged no step twice
  assert json.loads(files[f"{workdir}/metrics.json"]) == {k: v for k, v in results.items() if k != "step"}

  # --mode=eval: the latest checkpoint again, from the run's own config.json.
  evaluated = train.evaluate_checkpoint(config, workdir)
  assert evaluated == results
  params, step = runs.restore_params(workdir)
  assert step == 6 and "text" in params["heads"]
  assert not server.unhandled, server.unhandled  # every call TensorStore made is one the fake implements
