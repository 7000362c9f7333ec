"""The synthetic world's outcome labels and patient facts (generator version 2, data_prep/synthetic_world.py).

They come from a random stream of their own, so everything version 1 generated is unchanged: version 1's images,
ECGs, reports, labels, times and latent state, kept in tests/fixtures/synthetic_world_v1.npz (written by
`tests/synthetic_v1.py` with the version-1 code, commit e3c5e06), must still come out of today's generator.
Prevalences are measured on the generator's own first encounters.
"""

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from data_prep import synthetic_phantoms as phantoms
from data_prep import synthetic_world as sw
from medbind_jax.data import schema, tfrecord
from medbind_jax.evaluators import metrics

from synthetic_v1 import V1_FIXTURE, V1_PARAMS, v1_arrays, v1_differences


def test_version_1_outputs_are_unchanged():
  assert sw.GENERATOR_VERSION == "2"
  with np.load(V1_FIXTURE) as f:
    want = dict(f)
  assert len(want) > 100
  assert v1_differences(v1_arrays(V1_PARAMS), want) == []
  # The comparison finds a real change: another seed's world differs in far more than rounding.
  assert len(v1_differences(v1_arrays(dataclasses.replace(V1_PARAMS, seed=1)), want)) > 20


def _first_encounter(params: sw.WorldParams, patient_index: int):
  """(state, facts, outcomes) of a patient's first encounter, drawn as `patient_encounters` draws them, without
  rendering (nothing is rendered before the first state)."""
  rng = np.random.default_rng([params.seed, patient_index])
  outcome_rng = np.random.default_rng([params.seed, patient_index, sw.OUTCOME_STREAM])
  patient = sw._sample_patient(rng)  # pylint: disable=protected-access
  facts = sw.patient_facts(patient, outcome_rng)
  rng.uniform(), rng.integers(1, params.max_encounters_per_patient + 1)  # start time, encounter count
  state = sw._sample_state(patient, rng)  # pylint: disable=protected-access
  return state, facts, sw.draw_outcomes(state, facts, outcome_rng)


def test_first_encounters_drawn_here_are_the_generators():
  params = dataclasses.replace(V1_PARAMS, num_patients=4)
  for patient in range(params.num_patients):
    enc = next(sw.patient_encounters(params, patient))
    state, facts, outcomes = _first_encounter(params, patient)
    assert enc.extras["heart_size"] == [state.heart_size]
    assert {k: enc.extras[k] for k in (*facts, *outcomes)} == {k: [v] for k, v in {**facts, **outcomes}.items()}


def test_outcome_prevalences_are_mimic_like():
  params = sw.WorldParams()
  drawn = [_first_encounter(params, p) for p in range(4000)]
  died = np.array([o["outcome_in_hospital_mortality"] for _, _, o in drawn])
  readmitted = np.array([o["outcome_readmission_30d"] for _, _, o in drawn])
  assert set(np.unique(died)) == {0.0, 1.0}
  assert np.all((readmitted == sw.NOT_APPLICABLE) == (died == 1.0)), "readmission is defined for survivors only"
  survivors = readmitted[died == 0]
  # Stated in the module docstring: about 10% and 15-20% (std of these estimates: ~0.5 points).
  assert 0.08 < died.mean() < 0.125, died.mean()
  assert 0.15 < survivors.mean() < 0.20, survivors.mean()
  # The labels follow their risks, which grow with the severities the images and ECGs show.
  risk = np.array([o["risk_in_hospital_mortality"] for _, _, o in drawn])
  assert metrics.auroc(died, risk) > 0.8
  st = np.array([s.st_elevation for s, _, _ in drawn])
  assert died[st > 0].mean() > 2 * died[st == 0].mean()
  comorbidities = np.array([f["comorbidity_count"] for _, f, _ in drawn])
  assert comorbidities.min() == 0 and comorbidities.max() <= 9 and 0.8 < comorbidities.mean() < 2.5


def _state_from_extras(extras) -> phantoms.ClinicalState:
  values = {f.name: float(extras[f.name][0]) for f in dataclasses.fields(phantoms.ClinicalState)}
  values["rhythm"] = phantoms.RHYTHMS[int(values["rhythm"])]
  values["conduction"] = phantoms.CONDUCTIONS[int(values["conduction"])]
  for key in ("effusion_side", "consolidation_lobe", "atelectasis_side", "pneumothorax_side", "st_territory"):
    values[key] = int(values[key])
  return phantoms.ClinicalState(**values)


def test_written_records_carry_facts_and_outcomes_of_their_own_state(tmp_path):
  params = sw.WorldParams(num_patients=30, image_size=32, ecg_sampling_rate=100, ecg_seconds=2.0,
                          num_shards=(1, 1, 1))
  info = sw.generate_world(tmp_path, params, workers=1, progress=False)
  assert info["generator_version"] == "2" and info["patient_facts"] == list(sw.PATIENT_FACTS)
  assert set(info["outcomes"]) == set(sw.OUTCOMES)
  assert json.loads((tmp_path / schema.DATASET_INFO).read_text())["outcomes"] == info["outcomes"]
  records = [schema.decode_encounter(data) for split in info["splits"].values() for shard in split["shards"]
             for _, data in tfrecord.iter_records(tmp_path / shard["file"])]
  assert len(records) > 40
  for enc in records:
    facts = {k: float(enc.extras[k][0]) for k in sw.PATIENT_FACTS}
    risks = sw.outcome_risks(_state_from_extras(enc.extras), facts)
    for name in sw.OUTCOMES:
      np.testing.assert_allclose(enc.extras[f"risk_{name}"][0], risks[name], rtol=1e-5, atol=1e-6)
      assert enc.extras[f"outcome_{name}"][0] in (0.0, 1.0, sw.NOT_APPLICABLE)
    assert facts["sex_male"] in (0.0, 1.0)
  # A patient's facts are the patient's, not the encounter's.
  by_patient = {}
  for enc in records:
    facts = tuple(float(enc.extras[k][0]) for k in sw.PATIENT_FACTS)
    assert by_patient.setdefault(enc.patient_id, facts) == facts


def test_the_version_bump_changes_the_cache_key():
  canonical = json.dumps({"generator_version": "1", "schema_version": schema.SCHEMA_VERSION,
                          "params": sw.canonical_params(V1_PARAMS)}, sort_keys=True, separators=(",", ":"))
  assert sw.fingerprint(V1_PARAMS) != hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize("name", sw.OUTCOMES)
def test_outcome_risk_rises_with_what_the_images_and_ecgs_show(name):
  state, facts, _ = _first_encounter(sw.WorldParams(), 0)
  base = sw.outcome_risks(state, facts)[name]
  sicker = dataclasses.replace(state, effusion=min(1.0, state.effusion + 0.3), rhythm="af")
  assert sw.outcome_risks(sicker, facts)[name] > base
  assert sw.outcome_risks(state, {**facts, "comorbidity_count": facts["comorbidity_count"] + 3})[name] > base

