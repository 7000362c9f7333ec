"""Tests of the built-in synthetic clinical world (data_prep/synthetic_world.py) on tiny worlds.

The world is read back through the project's own reader (`tfrecord.iter_records` + `schema.decode_encounter`), and
its physiology is checked by measuring the generated signals (R peaks, lead relations, silhouette width), not by
trusting the generator's bookkeeping.
"""

import dataclasses
import hashlib
import io
import json
import os

import numpy as np
from PIL import Image
import pytest
from scipy import ndimage, signal

from configs import medbind
from data_prep import synthetic_world as sw
from medbind_jax.data import codecs, schema, tfrecord

TINY = sw.WorldParams(num_patients=40, num_shards=(3, 1, 1))


def _shard_files(directory) -> list[str]:
  return sorted(f for f in os.listdir(directory) if ".tfrecord-" in f)


def _read_world(directory) -> dict[str, list[schema.Encounter]]:
  """Records per shard file, decoded."""
  return {f: [schema.decode_encounter(data) for _, data in tfrecord.iter_records(os.path.join(directory, f))]
          for f in _shard_files(directory)}


def _file_bytes(directory) -> dict[str, bytes]:
  with os.scandir(directory) as entries:
    return {e.name: open(e.path, "rb").read() for e in entries if e.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  directory = tmp_path_factory.mktemp("world")
  info = sw.generate_world(directory, TINY, workers=1, progress=False)
  return directory, info, _read_world(directory)


@pytest.fixture(scope="module")
def records(world):
  return [enc for shard in world[2].values() for enc in shard]


# ---------------------------------------------------------------------------------------------------------------------
# Determinism and the cache
# ---------------------------------------------------------------------------------------------------------------------


def test_same_params_give_identical_bytes_whatever_the_worker_count(world, tmp_path):
  directory, _, _ = world
  sw.generate_world(tmp_path, TINY, workers=2, progress=False)
  expected = _file_bytes(directory)
  assert set(expected) == set(_file_bytes(tmp_path))
  for name, data in _file_bytes(tmp_path).items():
    assert data == expected[name], f"{name} differs between workers=1 and workers=2"


def test_another_seed_gives_another_world(tmp_path):
  small = sw.WorldParams(num_patients=6, num_shards=(1, 1, 1))
  sw.generate_world(tmp_path / "a", small, workers=1, progress=False)
  sw.generate_world(tmp_path / "b", dataclasses.replace(small, seed=1), workers=1, progress=False)
  shards_a, shards_b = _read_world(tmp_path / "a"), _read_world(tmp_path / "b")
  images_a = {e.part("cxr").data for encs in shards_a.values() for e in encs if e.has("cxr")}
  images_b = {e.part("cxr").data for encs in shards_b.values() for e in encs if e.has("cxr")}
  assert images_a and images_b and not images_a & images_b
  assert sw.fingerprint(small) != sw.fingerprint(dataclasses.replace(small, seed=1))


def test_ensure_world_reuses_repairs_and_regenerates(tmp_path):
  params = sw.WorldParams(num_patients=8, num_shards=(2, 1, 1))
  info = sw.ensure_world(tmp_path, params, workers=1, progress=False)
  (tmp_path / "notes.txt").write_text("not part of the world")
  snapshot = _file_bytes(tmp_path)
  mtimes = {f: os.stat(tmp_path / f).st_mtime_ns for f in snapshot}

  assert sw.ensure_world(tmp_path, params, workers=1, progress=False) == info
  assert {f: os.stat(tmp_path / f).st_mtime_ns for f in snapshot} == mtimes, "a reused world must not be rewritten"

  # A missing shard means an incomplete world: regenerated, identically.
  os.remove(tmp_path / info["splits"]["train"]["shards"][0]["file"])
  sw.ensure_world(tmp_path, params, workers=1, progress=False)
  assert _file_bytes(tmp_path) == snapshot

  # Other parameters (here also another shard layout): the stale shards go, unrelated files stay.
  changed = dataclasses.replace(params, seed=3, num_shards=(1, 1, 1))
  new_info = sw.ensure_world(tmp_path, changed, workers=1, progress=False)
  assert new_info["fingerprint"] == sw.fingerprint(changed) != info["fingerprint"]
  listed = sorted(s["file"] for split in new_info["splits"].values() for s in split["shards"])
  assert _shard_files(tmp_path) == listed
  assert (tmp_path / "notes.txt").read_text() == "not part of the world"


def test_ensure_world_refuses_a_directory_of_another_dataset(tmp_path):
  (tmp_path / schema.DATASET_INFO).write_text(json.dumps({"name": "mimic_cxr"}))
  with pytest.raises(ValueError, match="not a synthetic world"):
    sw.ensure_world(tmp_path, sw.WorldParams(num_patients=2), workers=1, progress=False)


def _fingerprint_without_ecg_store_rate(params: sw.WorldParams) -> str:
  """The fingerprint as computed before `ecg_store_rate` existed: the same recipe over every other field."""
  fields = dataclasses.asdict(params)
  del fields["ecg_store_rate"]
  canonical = json.dumps({"generator_version": sw.GENERATOR_VERSION, "schema_version": schema.SCHEMA_VERSION,
                          "params": fields}, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def test_ecg_store_rate_at_its_default_keeps_existing_fingerprints(world):
  # Unset, the field stays out of the fingerprint and the recorded params: worlds generated before it existed are
  # still reused, not regenerated.
  assert sw.WorldParams().ecg_store_rate == 0 and sw.WorldParams().ecg_rate_stored == 500
  for params in (sw.WorldParams(), TINY, sw.WorldParams(seed=3, num_patients=10, ecg_sampling_rate=250)):
    assert sw.fingerprint(params) == _fingerprint_without_ecg_store_rate(params)
  assert "ecg_store_rate" not in world[1]["params"] and "12-lead 500 Hz ECG" in world[1]["description"]
  # Set, it is part of the cache key.
  stored = {sw.fingerprint(dataclasses.replace(TINY, ecg_store_rate=rate)) for rate in (100, 250)}
  assert len(stored) == 2 and sw.fingerprint(TINY) not in stored
  with pytest.raises(ValueError, match="ecg_store_rate"):
    sw.WorldParams(ecg_store_rate=-100)


def test_ecgs_stored_at_the_training_rate_give_the_same_model_inputs(tmp_path):
  config = medbind.get_config()
  # The default config stores the world's ECGs at its training rate (as `train.prepare_data` builds the params).
  params = sw.WorldParams(**{k: v for k, v in config.data.synthetic.to_dict().items() if k != "workers"})
  assert params.ecg_store_rate == config.data.ecg.sampling_rate == 100
  small = sw.WorldParams(num_patients=8, num_shards=(1, 1, 1))
  fast = dataclasses.replace(small, ecg_store_rate=params.ecg_store_rate)
  info = sw.generate_world(tmp_path / "100hz", fast, workers=1, progress=False)
  assert info["params"]["ecg_store_rate"] == 100 and "12-lead 100 Hz ECG" in info["description"]
  sw.generate_world(tmp_path / "500hz", small, workers=1, progress=False)
  at_100 = {e.encounter_id: e for encs in _read_world(tmp_path / "100hz").values() for e in encs}
  at_500 = {e.encounter_id: e for encs in _read_world(tmp_path / "500hz").values() for e in encs}
  assert at_100.keys() == at_500.keys()

  codec = codecs.get("ecg")
  spec = codec.make_spec(config.data.ecg)
  # Storing rounds the resampled signal once (0.5 / gain); the 500 Hz record's rounding (0.5 / gain per sample) goes
  # through the reader's resampling filter, whose worst-case gain is the filter's L1 norm (scipy's resample_poly
  # design for 500 -> 100 Hz: 1.78). Together at most 1.39 / gain: 1.4 uV at 1000 units per mV.
  taps = signal.firwin(2 * 10 * 5 + 1, 1 / 5, window=("kaiser", 5.0))
  bound = 0.5 / small.ecg_gain * (1.0 + np.abs(taps).sum()) + 1e-6
  num_ecgs = 0
  for key, enc in at_100.items():
    old = at_500[key]
    assert enc.parts.keys() == old.parts.keys() and enc.extras == old.extras
    if enc.has("cxr"):
      assert enc.part("cxr").data == old.part("cxr").data
    if not enc.has("ecg"):
      continue
    num_ecgs += 1
    ecg, old_ecg = enc.part("ecg").data, old.part("ecg").data
    assert ecg.sampling_rate == 100 and ecg.samples.shape == (1000, 12) and old_ecg.sampling_rate == 500
    assert enc.part("ecg").report == old.part("ecg").report
    x, x_old = (codec.preprocess(e, spec, None, key) for e in (ecg, old_ecg))
    assert x.shape == x_old.shape == (spec.num_samples, 12)
    np.testing.assert_array_less(np.abs(x - x_old), bound)
    # Training augmentation draws the same crop, gain and noise from the same RNG: equal up to the gain (<= 1.1).
    x, x_old = (codec.preprocess(e, spec, np.random.default_rng(7), key) for e in (ecg, old_ecg))
    np.testing.assert_array_less(np.abs(x - x_old), (1 + spec.amplitude_jitter) * bound)
  assert num_ecgs >= 5


# ---------------------------------------------------------------------------------------------------------------------
# Records, counts, splits, labels
# ---------------------------------------------------------------------------------------------------------------------


def test_dataset_info_counts_match_the_shards(world):
  directory, info, shards = world
  assert info == schema.read_dataset_info(directory)
  assert info["cxr_label_names"] == list(sw.CXR_LABELS) and info["ecg_label_names"] == list(sw.ECG_LABELS)
  assert info["fingerprint"] == sw.fingerprint(TINY) and info["params"]["num_patients"] == TINY.num_patients
  listed = []
  for split, split_info in info["splits"].items():
    for shard in split_info["shards"]:
      encs = shards[shard["file"]]
      listed.append(shard["file"])
      assert shard["num_examples"] == len(encs)
      assert shard["num_cxr"] == sum(e.has("cxr") for e in encs)
      assert shard["num_ecg"] == sum(e.has("ecg") for e in encs)
      assert shard["num_linked"] == sum(e.linked for e in encs)
      assert info["shard_bytes"][shard["file"]] == os.path.getsize(os.path.join(directory, shard["file"]))
    assert split_info["num_examples"] == sum(len(shards[s["file"]]) for s in split_info["shards"])
  assert sorted(listed) == sorted(shards)
  total = sum(s["num_examples"] for s in info["splits"].values())
  assert 1.5 * TINY.num_patients < total < 2.5 * TINY.num_patients  # 1-3 encounters per patient


def test_splits_are_by_patient(world):
  _, _, shards = world
  split_of_patient = {}
  encounter_ids = set()
  for name, encs in shards.items():
    for enc in encs:
      assert name.startswith(enc.split + ".")
      assert split_of_patient.setdefault(enc.patient_id, enc.split) == enc.split, f"{enc.patient_id} in two splits"
      assert enc.encounter_id not in encounter_ids
      encounter_ids.add(enc.encounter_id)
  assert len(split_of_patient) == TINY.num_patients
  assert set(split_of_patient.values()) == set(schema.SPLITS)


def test_linked_records_have_both_modalities(records):
  linked = [e for e in records if e.linked]
  assert 0.3 < len(linked) / len(records) < 0.7  # link_fraction = 0.5
  for enc in records:
    if enc.linked:
      assert enc.has("cxr") and enc.has("ecg")
      assert abs(enc.part("ecg").time - enc.part("cxr").time) <= 12 * 3600
    else:
      assert enc.has("cxr") != enc.has("ecg")


def _stored_modalities(directory) -> dict[str, set[str]]:
  """encounter_id -> the modalities with any feature (`m/...`) in the stored record, read without decoding."""
  found = {}
  for f in _shard_files(directory):
    for _, data in tfrecord.iter_records(os.path.join(directory, f)):
      feats = schema.parse_features(data)
      found[schema.feature_str(feats, "encounter_id")] = {k.split("/")[0] for k in feats if k[:4] in ("cxr/", "ecg/")}
  return found


def test_labels_are_what_the_reports_state(world, records):
  stored = _stored_modalities(world[0])
  for enc in records:
    # A modality a record lacks stores nothing (no labels, no report); decoding gives it no part.
    assert stored[enc.encounter_id] == set(enc.parts)
    # Reports threshold the continuous latent state.
    if enc.has("cxr"):
      part = enc.part("cxr")
      np.testing.assert_array_equal(part.labels, sw.label_cxr_report(part.report), err_msg=part.report)
      assert part.report.startswith("FINDINGS: ") and " IMPRESSION: " in part.report
      cxr = dict(zip(sw.CXR_LABELS, part.labels))
      assert cxr["cardiomegaly"] == (enc.extras["heart_size"][0] > sw.THRESHOLDS["cardiomegaly"])
    if enc.has("ecg"):
      part = enc.part("ecg")
      np.testing.assert_array_equal(part.labels, sw.label_ecg_report(part.report), err_msg=part.report)
      ecg = dict(zip(sw.ECG_LABELS, part.labels))
      assert ecg["lvh"] == (enc.extras["lv_mass"][0] > sw.THRESHOLDS["lvh"])


def test_report_labellers_handle_synonyms_and_negation():
  names = sw.CXR_LABELS
  def positives(text):
    return {n for n, v in zip(names, sw.label_cxr_report(text)) if v}
  assert positives("FINDINGS: The heart is not enlarged. No pleural effusion or pneumothorax. "
                   "IMPRESSION: No acute cardiopulmonary process.") == {"no_finding"}
  assert positives("FINDINGS: The cardiac silhouette is moderately enlarged. There is no pneumothorax. "
                   "IMPRESSION: Cardiomegaly.") == {"cardiomegaly"}
  assert positives("FINDINGS: Blunting of the left costophrenic angle. Airspace opacity in the right lower lobe "
                   "concerning for pneumonia. IMPRESSION: 1. Left pleural effusion. 2. Pneumonia.") == {
                       "pleural_effusion", "consolidation"}
  ecg = dict(zip(sw.ECG_LABELS, sw.label_ecg_report("Sinus rhythm. Left bundle branch block. Abnormal ECG.")))
  assert ecg["sinus_rhythm"] and ecg["lbbb"] and not ecg["normal_ecg"] and not ecg["rbbb"]
  assert sw.label_ecg_report("Sinus rhythm. Normal ECG.")[sw.ECG_LABELS.index("normal_ecg")] == 1


def test_ecg_reports_repeat_exactly(records):
  texts = [e.part("ecg").report for e in records if e.has("ecg")]
  assert len(set(texts)) < len(texts) / 2
  assert "Sinus rhythm. Normal ECG." in texts


# ---------------------------------------------------------------------------------------------------------------------
# Physiology measured from the signals
# ---------------------------------------------------------------------------------------------------------------------


def _ecgs(records):
  return [e for e in records if e.has("ecg")]


def test_ecg_format_and_einthoven_relations(records):
  for enc in _ecgs(records):
    ecg = enc.part("ecg").data
    x = ecg.samples.astype(np.int32)
    assert ecg.samples.shape == (5000, 12) and tuple(ecg.leads) == schema.LEADS_12
    assert ecg.sampling_rate == 500 and list(ecg.gain) == [1000.0] * 12
    assert np.abs(x).max() < 20000, "ECG near the int16 limit"
    assert x.std(0).min() > 10, "a lead is flat"
    lead = dict(zip(schema.LEADS_12, x.T))
    # Each lead is rounded on its own, so the relations hold to within one or two ADC units (0.001 mV each).
    assert np.abs(lead["III"] - (lead["II"] - lead["I"])).max() <= 1
    assert np.abs(2 * lead["aVR"] + lead["I"] + lead["II"]).max() <= 2
    assert np.abs(2 * lead["aVL"] - (2 * lead["I"] - lead["II"])).max() <= 2
    assert np.abs(2 * lead["aVF"] - (2 * lead["II"] - lead["I"])).max() <= 2


def _rr_intervals(samples: np.ndarray, fs: float) -> np.ndarray:
  """RR intervals (s) from a simple QRS detector: energy of the smoothed slope summed over leads."""
  slope = np.diff(ndimage.uniform_filter1d(samples.astype(np.float32), 5, axis=0), axis=0)
  energy = ndimage.uniform_filter1d((slope * slope).sum(1), int(0.04 * fs))
  peaks, _ = signal.find_peaks(energy, height=0.3 * np.percentile(energy, 99.5), distance=int(0.22 * fs))
  return np.diff(peaks) / fs


def test_rhythm_labels_match_the_measured_heart_rate(records):
  seen = set()
  for enc in _ecgs(records):
    ecg = enc.part("ecg")
    rr = _rr_intervals(ecg.data.samples, ecg.data.sampling_rate)
    rate, irregularity = 60.0 / rr.mean(), rr.std() / rr.mean()
    labels = dict(zip(sw.ECG_LABELS, ecg.labels))
    rhythm = [k for k in ("sinus_rhythm", "sinus_tachycardia", "sinus_bradycardia", "atrial_fibrillation")
              if labels[k]]
    assert len(rhythm) == 1, ecg.report
    seen.add(rhythm[0])
    msg = f"{ecg.report} measured {rate:.1f} bpm, RR variation {irregularity:.3f}"
    if rhythm[0] == "atrial_fibrillation":
      assert irregularity > 0.08, msg
    else:
      assert irregularity < 0.05, msg
      assert abs(rate - enc.extras["heart_rate"][0]) < 2.0, msg
      low, high = {"sinus_rhythm": (60, 100), "sinus_tachycardia": (100, 200),
                   "sinus_bradycardia": (20, 60)}[rhythm[0]]
      assert low < rate < high, msg
  assert seen == {"sinus_rhythm", "sinus_tachycardia", "sinus_bradycardia", "atrial_fibrillation"}, seen


def _silhouette_width(png: bytes) -> float:
  """Width (fraction of the image) of the bright central band in the heart rows: the cardiac silhouette."""
  image = np.asarray(Image.open(io.BytesIO(png)), np.float32)
  height, width = image.shape
  profile = image[int(0.6 * height):int(0.75 * height)].mean(0)
  centre = width // 2
  threshold = 0.5 * (profile[centre] + profile[int(0.1 * width):int(0.9 * width)].min())
  bright = profile > threshold
  left = centre - np.argmin(bright[centre::-1])
  right = centre + np.argmin(bright[centre:])
  return (right - left) / width


def test_cardiomegaly_widens_the_cardiac_silhouette(records):
  cxrs = [e for e in records if e.has("cxr")]
  for enc in cxrs[:3]:
    image = Image.open(io.BytesIO(enc.part("cxr").data))
    assert image.mode == "L" and image.size == (TINY.image_size, TINY.image_size)
  widths = np.array([_silhouette_width(e.part("cxr").data) for e in cxrs])
  cardiomegaly = np.array([e.part("cxr").labels[sw.CXR_LABELS.index("cardiomegaly")] for e in cxrs]) == 1
  assert cardiomegaly.sum() >= 3 and (~cardiomegaly).sum() >= 3
  assert widths[cardiomegaly].mean() > widths[~cardiomegaly].mean() + 0.05, (widths[cardiomegaly], widths.mean())
  heart_size = np.array([e.extras["heart_size"][0] for e in cxrs])
  assert np.corrcoef(widths, heart_size)[0, 1] > 0.3
