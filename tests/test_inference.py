"""The inference API and the embed CLI on a tiny trained run, with the real CXR/ECG/text files of
tests/fixtures/real (see its README for provenance)."""

import glob
import json
import logging
import os
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import wfdb
from PIL import Image

from medbind_jax import embed, inference, runs, train
from medbind_jax.data import pipeline, preprocess, schema
from medbind_jax.model import MedBind, build_model
from test_train import tiny_config
from tiny_data import write_tiny_dataset

REAL = pathlib.Path(__file__).parent / "fixtures" / "real"
CXR_FILES = sorted(str(p) for p in (REAL / "cxr").glob("*.png"))
ECG_RECORDS = sorted(str(p.with_suffix("")) for p in (REAL / "ecg").glob("*.hea"))
REPORTS_CSV = str(REAL / "text" / "iu_xray_reports_uid001-030.csv")
EMPTY_FINDINGS_ROWS = (4, 17, 22, 30)  # spreadsheet rows (header = row 1) whose `findings` cell is empty
STEPS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, workdir, data_dir): 4 training steps of the tiny model (frozen random text trunk), checkpoints at
  steps 2 and 4."""
  data_dir = str(tmp_path_factory.mktemp("tiny_data"))
  write_tiny_dataset(data_dir, num_records=32, num_shards=2, splits=("train", "test"))
  config = tiny_config(data_dir, total_steps=STEPS, checkpoint_every=2)
  workdir = str(tmp_path_factory.mktemp("run"))
  # Stopping after the last step (saved as final) leaves out the retrieval evaluation, which is not under test.
  train.train_and_evaluate(config, workdir, stop_after_step=STEPS)
  return config, workdir, data_dir


@pytest.fixture(scope="module")
def embedder(run):
  return inference.Embedder.load(run[1])


def _checkpoint_params(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


def _unit_rows(x):
  assert x.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# Same numbers as training's evaluation path
# ------------------------------------------------------------------------------------------------------------------


def test_embeddings_equal_the_training_evaluation_path(run, embedder):
  config, workdir, data_dir = run
  assert embedder.step == STEPS and embedder.batch_size == config.eval.batch_size
  model, _ = build_model(config)
  params = _checkpoint_params(workdir, STEPS)
  specs = runs.data_specs(config)
  fns = runs.make_embed_fns(model, "cached", None, None, config.eval.batch_size)
  index = pipeline.index_split(data_dir, "train", progress=False)
  reader = pipeline.ExampleReader(index, specs)
  for modality in ("cxr", "ecg"):
    want, records = [], []
    for batch in pipeline.eval_batches(index, modality, config.eval.batch_size, specs[modality]):
      want.append(np.asarray(fns.inputs[modality](params, batch["inputs"]))[batch["valid"]])
      records += batch["index"][batch["valid"]].tolist()
    want = np.concatenate(want)
    parts = [reader.encounter(i).part(modality) for i in records]
    if modality == "cxr":  # the stored PNG bytes, as a user would pass a file's contents
      got = embedder.embed_cxr([part.data for part in parts])
    else:  # millivolt arrays at the stored 100 Hz: resampled to the run's 50 Hz like the training data
      assert {part.data.sampling_rate for part in parts} == {100.0} and specs["ecg"].sampling_rate == 50.0
      got = embedder.embed_ecg([part.data.signal_mv() for part in parts], sampling_rate=100.0,
                               leads=list(schema.LEADS_12))
    assert got.shape == (32, config.model.embed_dim)
    _unit_rows(got)
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=modality)

  # Text: the frozen random trunk is not in the checkpoint; training cached its output per unique report, so
  # the embedding of those reports is the head applied to that table.
  texts = sorted({r.reports["cxr"] for r in index.records} | {r.reports["ecg"] for r in index.records})
  (table_file,) = glob.glob(os.path.join(workdir, "cache", "text_features_*.npy"))
  want = np.asarray(model.apply({"params": params}, "text", np.load(table_file), method=MedBind.project))
  got = embedder.embed_text(texts)
  _unit_rows(got)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_chosen_step_is_loaded(run, embedder):
  config, workdir, _ = run
  assert runs.checkpoint_steps(workdir) == [2, 4]
  early = inference.Embedder.load(workdir, step=2)
  assert early.step == 2
  model, _ = build_model(config)
  fns = runs.make_embed_fns(model, "cached", None, None, config.eval.batch_size)
  images = np.stack([preprocess.preprocess_cxr(open(p, "rb").read(), early.specs["cxr"]) for p in CXR_FILES])
  padded = np.concatenate([images, np.zeros((config.eval.batch_size - len(images),) + images.shape[1:],
                                            np.float32)])
  want = np.asarray(fns.inputs["cxr"](_checkpoint_params(workdir, 2), padded))[:len(images)]
  np.testing.assert_allclose(early.embed_cxr(CXR_FILES), want, atol=1e-6)
  assert not np.allclose(embedder.embed_cxr(CXR_FILES), want, atol=1e-3)  # step 4 is another model
  with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 3 .*\[2, 4\]"):
    inference.Embedder.load(workdir, step=3)


# ------------------------------------------------------------------------------------------------------------------
# Input forms, resampling, lead order
# ------------------------------------------------------------------------------------------------------------------


def test_file_and_array_inputs_agree(embedder):
  from_paths = embedder.embed_cxr(CXR_FILES)
  _unit_rows(from_paths)
  encoded = [open(p, "rb").read() for p in CXR_FILES]
  pil = [Image.open(p) for p in CXR_FILES]
  uint8 = [np.asarray(Image.open(p)) for p in CXR_FILES]  # grayscale [H, W] and RGB [H, W, 3]
  unit_float = [a.astype(np.float32) / 255.0 for a in uint8]
  for form in (encoded, pil, uint8, unit_float, [pathlib.Path(p) for p in CXR_FILES]):
    np.testing.assert_allclose(embedder.embed_cxr(form), from_paths, atol=1e-6)
  assert not np.allclose(from_paths[0], from_paths[1], atol=1e-3)  # different images, different embeddings

  records = embedder.embed_ecg(ECG_RECORDS)
  _unit_rows(records)
  arrays, rates, names = [], [], []
  for path in ECG_RECORDS:
    rec = wfdb.rdrecord(path)  # wfdb's own reading, in mV
    arrays.append(rec.p_signal)
    rates.append(rec.fs)
    names.append(rec.sig_name)
  assert set(rates) == {500} and all(n == list(schema.LEADS_12) for n in names)
  np.testing.assert_allclose(embedder.embed_ecg(arrays, sampling_rate=rates), records, atol=1e-5)
  np.testing.assert_allclose(embedder.embed_ecg(np.stack(arrays), sampling_rate=500.0,
                                                leads=list(schema.LEADS_12)), records, atol=1e-5)
  np.testing.assert_allclose(embedder.embed_ecg([p + ".hea" for p in ECG_RECORDS]), records, atol=1e-6)


def _band_limited_ecg(rate: float, seconds: float = 2.0) -> np.ndarray:
  """[rate * seconds, 12] mV: a few sines per lead below 6 Hz under a sin^2 taper, sampled at `rate`.

  The taper brings the signal to 0 at both ends, where resampling pads with zeros, so the resampled signal
  matches the one sampled at the target rate to about 1e-3 mV.
  """
  t = np.arange(int(round(rate * seconds)))[:, None] / rate
  lead = np.arange(12)[None, :]
  waves = (0.8 * np.sin(2 * np.pi * 1.3 * t + lead) + 0.4 * np.sin(2 * np.pi * 3.1 * t + 0.5 * lead)
           + 0.2 * np.cos(2 * np.pi * 5.7 * t - lead))
  return (waves * np.sin(np.pi * t / seconds) ** 2).astype(np.float32)


def test_ecg_at_another_sampling_rate_is_resampled(embedder):
  assert embedder.specs["ecg"].sampling_rate == 50.0 and embedder.specs["ecg"].num_samples == 100
  native = embedder.embed_ecg([_band_limited_ecg(50.0)], sampling_rate=50.0)
  for rate in (500.0, 360.0, 257.0):  # integer and non-integer rate ratios
    resampled = embedder.embed_ecg([_band_limited_ecg(rate)], sampling_rate=rate)
    np.testing.assert_allclose(resampled, native, atol=2e-3, err_msg=str(rate))
  # Taken as 50 Hz, a 500 Hz signal is a 10x slowed-down one: a different ECG, a different embedding.
  misread = embedder.embed_ecg([_band_limited_ecg(500.0)], sampling_rate=50.0)
  assert np.abs(misread - native).max() > 0.05


def test_leads_are_matched_by_name(embedder):
  signal = wfdb.rdrecord(ECG_RECORDS[0]).p_signal
  canonical = embedder.embed_ecg([signal], sampling_rate=500.0)
  order = np.random.default_rng(0).permutation(12)
  permuted, names = signal[:, order], [schema.LEADS_12[i] for i in order]
  np.testing.assert_array_equal(embedder.embed_ecg([permuted], sampling_rate=500.0, leads=names), canonical)
  spelled = [f"Lead_{n.upper()}" if i % 2 else n.lower() for i, n in enumerate(names)]  # 'Lead_AVR', 'v1'
  np.testing.assert_array_equal(embedder.embed_ecg([permuted], sampling_rate=500.0, leads=spelled), canonical)
  # Extra leads (Frank vx/vy/vz) are left out.
  extra = np.concatenate([permuted, np.ones((len(signal), 3))], axis=1)
  np.testing.assert_array_equal(
      embedder.embed_ecg([extra], sampling_rate=500.0, leads=names + ["vx", "vy", "vz"]), canonical)
  # Without names, columns are taken in the canonical order: the permuted record is another ECG.
  assert not np.allclose(embedder.embed_ecg([permuted], sampling_rate=500.0), canonical, atol=1e-3)


def _rewritten_record(directory, name, rename=None, negate=()) -> str:
  """ECG_RECORDS[0] written as WFDB `directory/name` with leads renamed ({old: new}) and the digital samples of
  the leads in `negate` negated (exactly: the record's own ADC values)."""
  record = wfdb.rdrecord(ECG_RECORDS[0], physical=False)
  digital = record.d_signal.astype(np.int64)
  for lead in negate:
    digital[:, record.sig_name.index(lead)] *= -1
  wfdb.wrsamp(name, fs=record.fs, units=record.units, sig_name=[(rename or {}).get(n, n) for n in record.sig_name],
              d_signal=digital, fmt=["16"] * record.n_sig, adc_gain=record.adc_gain, baseline=record.baseline,
              write_dir=str(directory))
  return str(directory / name)


def test_a_lead_given_inverted_is_negated_back(embedder, tmp_path):
  # '-aVR' (the Cabrera display's inverted aVR) names a column holding -1 x aVR: the embedding is the true ECG's,
  # for an array with lead names and for a WFDB record whose header names the lead so.
  signal = wfdb.rdrecord(ECG_RECORDS[0]).p_signal
  canonical = embedder.embed_ecg([signal], sampling_rate=500.0)
  inverted = signal.copy()
  inverted[:, 3] *= -1
  names = list(schema.LEADS_12)
  names[3] = "-aVR"
  np.testing.assert_allclose(embedder.embed_ecg([inverted], sampling_rate=500.0, leads=names), canonical, atol=1e-5)
  record = _rewritten_record(tmp_path, "inverted", rename={"aVR": "-aVR"}, negate=["aVR"])
  assert wfdb.rdheader(record).sig_name[3] == "-aVR"
  np.testing.assert_allclose(embedder.embed_ecg([record]), embedder.embed_ecg([ECG_RECORDS[0]]), atol=1e-5)
  # The same samples named plain 'aVR' are another ECG (the bug this guards against stored them so).
  misread = _rewritten_record(tmp_path, "misread", negate=["aVR"])
  assert not np.allclose(embedder.embed_ecg([misread]), canonical, atol=1e-3)
  # Signed and unsigned names of one lead are a duplicate, named as such.
  with pytest.raises(inference.InputError, match=r"duplicate lead: aVR appears twice \(as \['aVR', '-aVR'\]\)"):
    embedder.embed_ecg([np.concatenate([signal, inverted[:, 3:4]], axis=1)], sampling_rate=500.0,
                       leads=list(schema.LEADS_12) + ["-aVR"])


def test_lead_and_sample_errors_name_the_leads_as_the_converters_do(embedder, tmp_path):
  # A header with V7 in place of V6: the message names the missing V6 and the unrecognised V7.
  record = _rewritten_record(tmp_path, "v7", rename={"V6": "V7"})
  with pytest.raises(inference.InputError, match=r"v7: missing leads: \['V6'\].*unrecognised lead names \['V7'\]"):
    embedder.embed_ecg([record])
  # Non-finite samples: the count and the leads, by name (columns here in MIMIC-IV-ECG's order, aVF before aVL).
  names = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]
  signal = np.zeros((100, 12), np.float32)
  signal[7:9, 4] = np.nan
  signal[3, 7] = np.inf
  with pytest.raises(inference.InputError,
                     match=r"ecg\[0\]: ECG contains non-finite samples: 3 in leads \['aVF', 'V2'\]"):
    embedder.embed_ecg([signal], sampling_rate=50.0, leads=names)


def test_each_modality_compiles_once_whatever_the_number_of_inputs(run, caplog):
  small = inference.Embedder.load(run[1], batch_size=4)
  signals = [wfdb.rdrecord(p).p_signal for p in ECG_RECORDS]
  small.embed_cxr(CXR_FILES[:3])  # the first call of each modality compiles
  small.embed_ecg(signals[:3], sampling_rate=500.0)
  small.embed_text(["a", "b", "c"])
  jax.config.update("jax_log_compiles", True)
  try:
    with caplog.at_level(logging.WARNING):
      cxr = small.embed_cxr(CXR_FILES * 3)  # 12 images: 3 batches
      ecg = small.embed_ecg(signals, sampling_rate=500.0)  # 8 records: 2 batches
      text = small.embed_text([f"report {i}" for i in range(9)])  # 3 batches, the last padded
  finally:
    jax.config.update("jax_log_compiles", False)
  compiles = [r.getMessage()[:100] for r in caplog.records if "Compiling" in r.getMessage()]
  assert not compiles, compiles
  assert cxr.shape == (12, 16) and ecg.shape == (8, 16) and text.shape == (9, 16)
  np.testing.assert_allclose(cxr[4:8], cxr[:4], atol=1e-6)  # the same images in another batch


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------------------------


def _bad_inputs(tmp_path):
  """modality -> [(bad input, keyword args, what the message must say)]."""
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"this is not an image")
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes(open(CXR_FILES[0], "rb").read()[:3000])
  empty = tmp_path / "empty.jpg"
  empty.write_bytes(b"")
  damaged = tmp_path / "damaged"  # a real record whose signal file lost its second half
  source = os.path.basename(ECG_RECORDS[0])
  (tmp_path / "damaged.hea").write_text(open(ECG_RECORDS[0] + ".hea").read().replace(source, "damaged"))
  (tmp_path / "damaged.mat").write_bytes(open(ECG_RECORDS[0] + ".mat", "rb").read()[:60000])
  nan_image = np.full((8, 8), 0.5, np.float32)
  nan_image[2, 3] = np.nan
  nan_ecg = np.zeros((100, 12), np.float32)
  nan_ecg[7, 4] = np.inf
  names_x6 = list(schema.LEADS_12[:11]) + ["X6"]
  return {
      "cxr": [
          (str(tmp_path / "missing.png"), {}, "missing.png: no such file"),
          (str(garbage), {}, "garbage.png: cannot decode image"),
          (str(truncated), {}, "truncated.png: cannot decode image"),
          (str(empty), {}, "empty.jpg: cannot decode image"),
          (b"\x89PNG\r\n\x1a\n broken", {}, r"cxr\[1\]: cannot decode image"),
          (nan_image, {}, r"cxr\[1\]: image array contains non-finite values"),
          (np.zeros((0, 5), np.uint8), {}, r"cxr\[1\]: empty image array"),
          (42, {}, r"cxr\[1\]: expected a path, encoded bytes, a PIL image or an array, got int"),
      ],
      "ecg": [
          (str(tmp_path / "missing_record"), {}, "missing_record: missing file: header"),
          (str(damaged), {}, "damaged: truncated signal file"),
          (np.zeros((100, 8)), {"sampling_rate": 50.0}, r"ecg\[1\]: 8 leads without names; expected 12"),
          (np.zeros((100, 8)), {"sampling_rate": 50.0, "leads": list(schema.LEADS_12[:8])},
           r"ecg\[1\]: missing leads: \['V3', 'V4', 'V5', 'V6'\]; the record has \['I', "),
          (np.zeros((100, 12)), {"sampling_rate": 50.0, "leads": list(schema.LEADS_12[:8])},
           r"ecg\[1\]: 12 signal columns but 8 lead names"),
          (np.zeros((100, 12)), {"sampling_rate": 50.0, "leads": names_x6},
           r"ecg\[1\]: missing leads: \['V6'\].*unrecognised lead names \['X6'\]"),
          (nan_ecg, {"sampling_rate": 50.0}, r"ecg\[1\]: ECG contains non-finite samples"),
          (np.zeros((100, 12)), {}, r"ecg\[1\]: an ECG array needs its sampling rate"),
          (np.zeros((100, 12)), {"sampling_rate": 0.0}, r"ecg\[1\]: sampling rate must be positive"),
          (np.zeros((0, 12)), {"sampling_rate": 50.0}, r"ecg\[1\]: ECG has no samples"),
          (np.zeros(100), {"sampling_rate": 50.0}, r"ecg\[1\]: expected an ECG array \[num_samples, num_leads\]"),
      ],
      "text": [
          ("", {}, r"text\[1\]: empty text"),
          ("  \n\t ", {}, r"text\[1\]: empty text"),
          (None, {}, r"text\[1\]: expected a string, got NoneType"),
      ],
  }


def test_each_bad_input_raises_naming_it(embedder, tmp_path):
  # Each bad input comes second, after a good one (an ECG record path: its header gives its rate and leads).
  good = {"cxr": CXR_FILES[0], "ecg": ECG_RECORDS[0], "text": "sinus rhythm"}
  method = {"cxr": embedder.embed_cxr, "ecg": embedder.embed_ecg, "text": embedder.embed_text}
  for modality, cases in _bad_inputs(tmp_path).items():
    for bad, kwargs, message in cases:
      with pytest.raises(inference.InputError, match=message) as err:
        method[modality]([good[modality], bad], **kwargs)
      assert isinstance(err.value, inference.BadInputs) and len(err.value.errors) == 1, (modality, message)
      assert str(err.value).startswith(f"1 of 2 {modality} inputs cannot be embedded"), str(err.value)


def test_a_batch_names_every_bad_input_or_skips_them_when_asked(embedder, tmp_path):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"not a png")
  # 20 inputs over two batches of 16, bad ones in both.
  inputs = CXR_FILES * 5
  inputs[2], inputs[9], inputs[17] = str(bad), str(tmp_path / "gone.png"), np.zeros((0, 0))
  with pytest.raises(inference.BadInputs) as err:
    embedder.embed_cxr(inputs)
  assert [str(e).split(":")[0] for e in err.value.errors] == [str(bad), str(tmp_path / "gone.png"), "cxr[17]"]
  assert str(err.value).startswith("3 of 20 cxr inputs")

  result = embedder.embed("cxr", inputs, skip_bad=True)
  assert result.kept.tolist() == [i for i in range(20) if i not in (2, 9, 17)] and len(result.errors) == 3
  want = embedder.embed_cxr([inputs[i] for i in result.kept])
  np.testing.assert_allclose(result.embeddings, want, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def folders(tmp_path):
  """A copy of the real fixture files: CXR images in a nested folder, WFDB records, a CSV and a text file."""
  cxr, ecg = tmp_path / "cxr", tmp_path / "ecg"
  (cxr / "nih").mkdir(parents=True)
  for path in CXR_FILES:
    shutil.copy(path, cxr / ("nih" if "nih_" in path else "") / os.path.basename(path))
  ecg.mkdir()
  for record in ECG_RECORDS:
    for suffix in (".hea", ".mat"):
      shutil.copy(record + suffix, ecg)
  lines = tmp_path / "queries.txt"
  lines.write_text("Cardiomegaly.\n\nSinus rhythm. Normal ECG.\n   \nAtrial fibrillation.\n")
  return tmp_path


def _cli(capsys, *argv):
  code = embed.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_cli_index_and_query_round_trip_on_real_files(run, embedder, folders, capsys):
  workdir = run[1]
  out = folders / "index.npz"
  args = ["index", "--workdir", workdir, "--cxr", folders / "cxr", "--ecg", folders / "ecg", "--text", REPORTS_CSV,
          folders / "queries.txt", "--text-column", "findings", "--out", out, "--no-progress"]
  code, _, err = _cli(capsys, *args)
  assert code == 1 and not out.exists()
  for row in EMPTY_FINDINGS_ROWS:  # every empty report is named, with its file and row
    assert f"{REPORTS_CSV}:row {row}: empty text" in err
  assert "4 of 33 text inputs cannot be embedded" in err

  code, stdout, err = _cli(capsys, *args, "--skip-bad")
  assert code == 0, err
  assert "skipped 4 bad text input(s) of 33" in err
  assert "29 text" in stdout and "4 cxr" in stdout and "8 ecg" in stdout
  index = embed.load_index(str(out))
  assert index.info["step"] == STEPS and index.embeddings.shape == (41, 16)
  is_cxr, is_ecg, is_text = (index.modality == m for m in ("cxr", "ecg", "text"))
  assert sorted(index.ids[is_cxr]) == ["nih/nih_00000001_000", "nih/nih_00027426_000", "tbx11k_h0001",
                                       "tbx11k_tb0005"]
  assert sorted(index.ids[is_ecg]) == sorted(os.path.basename(r) for r in ECG_RECORDS)
  assert list(index.texts[is_text][-3:]) == ["Cardiomegaly.", "Sinus rhythm. Normal ECG.", "Atrial fibrillation."]
  assert list(index.ids[is_text][-3:]) == [f"{folders / 'queries.txt'}:{n}" for n in (1, 3, 5)]
  np.testing.assert_allclose(index.embeddings[is_cxr], embedder.embed_cxr(list(index.sources[is_cxr])), atol=1e-6)
  np.testing.assert_allclose(index.embeddings[is_ecg], embedder.embed_ecg(list(index.sources[is_ecg])), atol=1e-6)
  np.testing.assert_allclose(index.embeddings[is_text], embedder.embed_text(list(index.texts[is_text])),
                             atol=1e-6)

  # An image query finds itself first among the images, with a cosine of 1.
  query = folders / "cxr" / "tbx11k_h0001.png"
  code, stdout, err = _cli(capsys, "query", "--index", out, "--workdir", workdir, "--cxr", query, "--k", 3,
                           "--json", "--no-progress")
  assert code == 0, err
  answer = json.loads(stdout)
  assert set(answer["results"]) == {"cxr", "ecg", "text"}
  for hits in answer["results"].values():
    scores = [h["score"] for h in hits]
    assert len(hits) == 3 and scores == sorted(scores, reverse=True) and [h["rank"] for h in hits] == [1, 2, 3]
  assert answer["results"]["cxr"][0]["id"] == "tbx11k_h0001"
  assert answer["results"]["cxr"][0]["score"] == pytest.approx(1.0, abs=1e-5)
  query_emb = embedder.embed_cxr([query])[0]
  all_text = index.embeddings[is_text] @ query_emb
  assert answer["results"]["text"][0]["score"] == pytest.approx(float(all_text.max()), abs=1e-5)

  # A text query, one target, the readable form.
  code, stdout, err = _cli(capsys, "query", "--index", out, "--workdir", workdir, "--text", "Atrial fibrillation.",
                           "--target", "text", "--k", 2, "--no-progress")
  assert code == 0, err
  assert [line for line in stdout.splitlines() if line.startswith("top")] == ["top 2 text of 29:"]
  assert '+1.0000  ' in stdout and '"Atrial fibrillation."' in stdout.splitlines()[3]

  # An ECG record query; a bad query fails with status 1 and says why.
  code, stdout, err = _cli(capsys, "query", "--index", out, "--workdir", workdir, "--ecg",
                           folders / "ecg" / "HR06000", "--target", "ecg", "--json", "--no-progress")
  assert code == 0, err
  assert json.loads(stdout)["results"]["ecg"][0]["id"] == "HR06000"
  code, _, err = _cli(capsys, "query", "--index", out, "--workdir", workdir, "--text", " ", "--no-progress")
  assert code == 1 and "--text  : empty text" in err


def test_cli_names_a_corrupt_image_or_skips_it(run, folders, capsys):
  (folders / "cxr" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  out = folders / "index.safetensors"
  args = ["index", "--workdir", run[1], "--cxr", folders / "cxr", "--out", out, "--no-progress"]
  code, _, err = _cli(capsys, *args)
  assert code == 1 and f"{folders / 'cxr' / 'corrupt.jpg'}: cannot decode image" in err and not out.exists()
  code, _, err = _cli(capsys, *args, "--skip-bad")
  assert code == 0 and "skipped 1 bad cxr input(s) of 5" in err
  index = embed.load_index(str(out))  # the safetensors form
  assert len(index) == 4 and "corrupt" not in " ".join(index.ids)
  assert _cli(capsys, "index", "--workdir", run[1], "--ecg", folders / "cxr", "--out", out)[0] == 1  # no records


def test_index_files_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  index = embed.Index(embeddings=rng.normal(size=(3, 4)).astype(np.float32), ids=np.array(["a", "b/c", "d:2"]),
                      modality=np.array(["cxr", "ecg", "text"]), sources=np.array(["/x/a.png", "/y/b/c", "d:2"]),
                      texts=np.array(["", "", "Ünïcode report, with \"quotes\""]), info={"step": 7, "embed_dim": 4})
  for name in ("i.npz", "i.safetensors"):
    embed.save_index(str(tmp_path / name), index)
    back = embed.load_index(str(tmp_path / name))
    np.testing.assert_array_equal(back.embeddings, index.embeddings)
    for field in embed.INDEX_FIELDS + ("info",):
      assert np.all(getattr(back, field) == getattr(index, field)), (name, field)
