"""The built-in synthetic clinical world: patients -> encounters -> phantom CXR + report, 12-lead ECG + statement.

    python -m data_prep.synthetic_world --out data/synthetic_world [--seed 0] [--num_patients 3000] [--workers 2] \
        [--ecg_store_rate 100]

Each patient has latent factors (age, body habitus, heart axis, heart-failure and infection propensities, LV
remodelling, conduction disease); each encounter perturbs them into a `ClinicalState` of continuous severities that
drives both renderers (`synthetic_phantoms`). Reports state only thresholded findings (with an optional coarse
severity word), so a linked CXR and ECG share information (heart size, HF activity, habitus) that their texts do not.
Labels are exactly what the reports state; `label_cxr_report` / `label_ecg_report` recover them from the text alone.

Output: TFRecord shards in the project schema (`medbind_jax.data.schema`), each with its index
(`medbind_jax.data.shard_index`), plus `dataset_info.json`, split by patient, byte-identical for the same
`WorldParams` whatever the number of worker processes: every patient draws from its own RNG seeded by (seed, patient
index), and patients are assigned to shards by index. ECGs are synthesised at `ecg_sampling_rate` (500 Hz) and, with
`ecg_store_rate`, resampled once here to the rate training reads them at, so the input pipeline need not resample
every record on every read.

Outcomes (generator version 2). Each encounter also carries two outcome labels and the patient facts a prompt
states, in the record's extras (`extra/<name>`, float lists of one value), drawn from a random stream of their own,
seeded by (seed, patient index, OUTCOME_STREAM): every image, ECG, report, label, time and latent severity of version
1 is unchanged, byte for byte, for the same parameters (tests/test_outcomes.py keeps a digest of version 1's).

  sex_male             0 / 1, Bernoulli(0.5), per patient
  comorbidity_count    Poisson(exp(-0.1 + 0.03 (age - 55) + 0.3 hf_propensity + 0.4 remodelling)), capped at 9,
                       per patient (chronic disease burden, correlated with age and the latent cardiac factors)
  age                  (already a latent field of version 1) years, per patient

  in-hospital mortality   P = sigmoid(-4.06 + 0.025 (age - 65) + 0.15 comorbidity_count + 0.2 sex_male
                              + 3 edema + 3 consolidation + 1.5 effusion + 0.04 (heart_rate - 80) + 8 st_elevation
                              + 0.3 af)
  30-day readmission      P = sigmoid(-2.18 + 0.01 (age - 65) + 0.15 comorbidity_count + 0.4 hf_severity
                              + 8 (heart_size - 0.45) + 0.6 max(lv_mass - 0.8, 0) + 0.4 af + 1.0 effusion),
                          defined for survivors only (-1 for an in-hospital death, as MIMIC's readmission cohorts
                          leave deaths out)

The severities are the continuous latent state the CXR and ECG render (edema, consolidation and effusion extent,
heart size, LV mass, heart rate, ST elevation in mV), of which the reports state only thresholded findings and,
60% of the time, a coarse severity word; age, sex and comorbidity count are what a prompt's patient facts say. The
intercepts give MIMIC-like prevalences: measured on the default world (seed 0, 3,000 patients: 5,995 encounters,
3,010 linked), 10.3% mortality and 17.2% readmission among the survivors (linked encounters: 10.8% and 17.1%;
docs/prompt_tuning.md). With the true risk as the score the AUROC ceiling is 0.90 (mortality) and 0.75
(readmission); a logistic regression on the facts alone reaches about 0.76 / 0.72, on the facts and the reports'
thresholded findings 0.90 / 0.76 (16,000 latent encounters, 70/30 split). Labels are drawn per encounter from
its own state and are not reconciled with the patient's timeline (a patient whose encounter 1 ends in death keeps
the later encounters version 1 generated): they are outcome analogues for prompt tuning, not a simulation of
follow-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import queue as queue_lib
import re
import time
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image
import tqdm

from data_prep import synthetic_phantoms as phantoms
from medbind_jax import paths
from medbind_jax.data import codecs, preprocess, schema
from medbind_jax.data.shard_index import ShardWriter, remove_index

# Bump whenever the generator's output changes for the same parameters: it is part of the cache fingerprint.
GENERATOR_VERSION = "2"  # 2: outcome labels and patient facts in the extras (module docstring)
DATASET_NAME = "synthetic_world"
CXR_LABELS = ("cardiomegaly", "pleural_effusion", "edema", "consolidation", "atelectasis", "pneumothorax",
              "no_finding")
ECG_LABELS = ("sinus_rhythm", "sinus_tachycardia", "sinus_bradycardia", "atrial_fibrillation", "lvh", "rbbb", "lbbb",
              "st_elevation", "first_degree_av_block", "normal_ecg")
# A finding is reported when its continuous severity exceeds this threshold (cardiomegaly: cardiothoracic ratio;
# LVH: LV mass index; ST elevation: mV). Below it the image or waveform may still show a faint sign.
THRESHOLDS = {"cardiomegaly": 0.5, "pleural_effusion": 0.12, "edema": 0.15, "consolidation": 0.15, "atelectasis": 0.15,
              "pneumothorax": 0.2, "lvh": 1.0, "st_elevation": 0.1, "first_degree_av_block": 0.2}
TACHYCARDIA_BPM, BRADYCARDIA_BPM = 100.0, 60.0
# The outcomes' random stream: the third entry of the per-patient seed (the first two are the world's seed and the
# patient index, the version-1 stream), so drawing outcomes consumes nothing from the stream the renderers use.
OUTCOME_STREAM = 1
# Encounter-level outcome labels (extras `outcome_<name>`: 1 event, 0 none, -1 not applicable) and their risks
# (extras `risk_<name>`: the probability the label was drawn with); patient facts a prompt may state (extras).
OUTCOMES = ("in_hospital_mortality", "readmission_30d")
PATIENT_FACTS = ("age", "sex_male", "comorbidity_count")
NOT_APPLICABLE = -1.0  # readmission of an encounter that ended in death
_EPOCH_START = 1609459200.0  # 2021-01-01 UTC: encounter times are spread over the following years
_DAY = 86400.0


@dataclasses.dataclass(frozen=True)
class WorldParams:
  """Everything that determines the generated world (and so its cache fingerprint). Defaults: the CPU demo."""

  seed: int = 0
  num_patients: int = 3000  # 1-3 encounters each: about 6000 encounters
  max_encounters_per_patient: int = 3
  link_fraction: float = 0.5  # share of encounters with both a CXR and an ECG (linked)
  cxr_only_fraction: float = 0.5  # of the unlinked encounters, the share that are CXR-only (the rest ECG-only)
  image_size: int = 128
  ecg_sampling_rate: int = 500  # the rate ECGs are synthesised at
  ecg_seconds: float = 10.0
  # The rate ECGs are stored at: resampled from ecg_sampling_rate once, at generation, as the input pipeline would at
  # every read (set it to the training rate, config.data.ecg.sampling_rate). 0: stored at ecg_sampling_rate.
  ecg_store_rate: int = 0
  ecg_gain: float = 1000.0  # ADC units per mV
  split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test (by patient)
  num_shards: tuple[int, int, int] = (8, 2, 2)  # train, val, test

  def __post_init__(self):
    if self.num_patients < 1 or self.max_encounters_per_patient < 1:
      raise ValueError("num_patients and max_encounters_per_patient must be >= 1")
    if not (0.0 <= self.link_fraction <= 1.0 and 0.0 <= self.cxr_only_fraction <= 1.0):
      raise ValueError("link_fraction and cxr_only_fraction must lie in [0, 1]")
    if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 or abs(sum(self.split_fractions) - 1) > 1e-6:
      raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {self.split_fractions}")
    if len(self.num_shards) != 3 or min(self.num_shards) < 1:
      raise ValueError(f"num_shards must be 3 positive counts (train, val, test), got {self.num_shards}")
    if self.image_size < 32:
      raise ValueError(f"image_size must be >= 32, got {self.image_size}")
    if self.ecg_sampling_rate <= 0 or self.ecg_store_rate < 0:
      raise ValueError(f"ecg_sampling_rate must be positive and ecg_store_rate non-negative (0: the sampling rate), "
                       f"got {self.ecg_sampling_rate} and {self.ecg_store_rate}")

  @property
  def ecg_rate_stored(self) -> int:
    """The sampling rate of the stored ECGs (Hz)."""
    return self.ecg_store_rate or self.ecg_sampling_rate


# Fields added after worlds were first generated, with the default that reproduces the earlier output. At that
# default a field is left out of the fingerprint and the recorded params, so existing generated worlds stay valid
# (same fingerprint, reused) and a world generated now is byte-identical to one generated before the field existed.
_LATER_FIELD_DEFAULTS = {"ecg_store_rate": 0}


def canonical_params(params: WorldParams) -> dict:
  """`params` as a dict, less the later-added fields at their backward-compatible default."""
  return {k: v for k, v in dataclasses.asdict(params).items()
          if not (k in _LATER_FIELD_DEFAULTS and v == _LATER_FIELD_DEFAULTS[k])}


def fingerprint(params: WorldParams) -> str:
  """sha256 of the generator version and the canonical JSON of `params`: the cache key of a generated world."""
  canonical = json.dumps({"generator_version": GENERATOR_VERSION, "schema_version": schema.SCHEMA_VERSION,
                          "params": canonical_params(params)}, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# =====================================================================================================================
# Latent model: patient factors -> encounter states
# =====================================================================================================================


@dataclasses.dataclass
class _Patient:
  age: float
  habitus: float
  heart_axis_deg: float
  hf_propensity: float  # mean heart-failure activity (may be negative: quiescent)
  infection_propensity: float
  remodelling: float  # hypertensive LV remodelling (>= 0)
  heart_size_offset: float
  af_logit: float
  conduction: str
  pr_interval: float
  resting_rate: float


def _sample_patient(rng: np.random.Generator) -> _Patient:
  age = rng.uniform(20.0, 92.0)
  habitus = float(np.clip(rng.normal(1.0, 0.08), 0.82, 1.18))
  # A slender build hangs the heart vertically (higher axis); a broad one lays it horizontally.
  heart_axis = float(np.clip(rng.normal(50.0 + 130.0 * (1.0 - habitus), 16.0), -30.0, 95.0))
  conduction = rng.choice(phantoms.CONDUCTIONS, p=(0.9, 0.06, 0.04))
  av_block = rng.random() < 0.03 + 0.001 * (age - 20.0)
  pr = rng.uniform(0.22, 0.30) if av_block else float(np.clip(rng.normal(0.155 + 0.0004 * (age - 55.0), 0.015),
                                                               0.12, 0.19))
  rate = rng.normal(74.0, 7.0) - (18.0 if rng.random() < 0.1 else 0.0)  # some run slow (fitness, beta-blockers)
  return _Patient(
      age=age, habitus=habitus, heart_axis_deg=heart_axis,
      hf_propensity=rng.normal(-0.2 + 0.03 * (age - 55.0), 0.9),
      infection_propensity=rng.normal(-0.1, 0.6),
      remodelling=max(0.0, rng.normal(-0.3 + 0.015 * (age - 55.0), 0.6)),
      heart_size_offset=rng.normal(0.0, 0.02),
      af_logit=rng.normal(-3.2 + 0.05 * (age - 55.0), 0.8),
      conduction=str(conduction), pr_interval=pr, resting_rate=rate)


def _away_from(value: float, edges: Sequence[float], margin: float) -> float:
  """Moves `value` out of the band `edge +- margin` (to the nearer side), so a label never hinges on a hair."""
  for edge in edges:
    if abs(value - edge) < margin:
      return edge + math.copysign(margin, value - edge)
  return value


def _sample_state(patient: _Patient, rng: np.random.Generator) -> phantoms.ClinicalState:
  """One encounter: the patient's factors plus this encounter's fluctuation."""
  hf = max(0.0, patient.hf_propensity + rng.normal(0.0, 0.4))
  infection = max(0.0, patient.infection_propensity + rng.normal(0.0, 0.8))
  heart_size = 0.43 + 0.07 * hf + 0.03 * patient.remodelling + patient.heart_size_offset + rng.normal(0.0, 0.006)
  heart_size = _away_from(heart_size, [THRESHOLDS["cardiomegaly"]], 0.006)
  lv_mass = max(0.0, 0.35 + 5.0 * (heart_size - 0.42) + 0.8 * patient.remodelling + rng.normal(0.0, 0.1))
  lv_mass = _away_from(lv_mass, [THRESHOLDS["lvh"]], 0.05)

  def severity(z: float, name: str) -> float:
    """Clips a latent drive to [0, 1] and keeps it off the reporting threshold."""
    value = float(np.clip(z, 0.0, 1.0))
    return _away_from(value, [THRESHOLDS[name]], 0.03) if value > 0 else 0.0

  edema = severity(0.5 * (hf - 0.8) + rng.normal(0.0, 0.08), "edema")
  effusion = severity(0.4 * (hf - 0.6) + 0.25 * (infection - 0.8) + rng.normal(0.0, 0.1), "pleural_effusion")
  consolidation = severity(0.45 * (infection - 0.6) + rng.normal(0.0, 0.1), "consolidation")
  atelectasis = severity(0.3 * (infection - 0.4) + 0.15 * (hf - 0.8) + rng.normal(0.0, 0.12), "atelectasis")
  pneumothorax = severity(rng.uniform(0.1, 1.0), "pneumothorax") if rng.random() < 0.05 else 0.0

  af = rng.random() < 1.0 / (1.0 + math.exp(-(patient.af_logit + 1.0 * hf)))
  if af:
    rate = float(np.clip(rng.normal(82.0 + 14.0 * infection + 5.0 * hf, 12.0), 50.0, 150.0))
  else:
    rate = float(np.clip(patient.resting_rate + 22.0 * infection + 5.0 * hf + rng.normal(0.0, 5.0), 40.0, 150.0))
    rate = _away_from(rate, [BRADYCARDIA_BPM, TACHYCARDIA_BPM], 3.0)
  st_elevation = rng.uniform(0.12, 0.45) if rng.random() < 0.03 + 0.02 * min(hf, 2.0) else 0.0
  return phantoms.ClinicalState(
      age=patient.age, habitus=patient.habitus, heart_axis_deg=patient.heart_axis_deg, hf_severity=hf,
      infection=infection, heart_size=heart_size, lv_mass=lv_mass, edema=edema, effusion=effusion,
      effusion_side=int(rng.choice(3, p=(0.4, 0.25, 0.35))), consolidation=consolidation,
      consolidation_lobe=int(rng.integers(len(phantoms.LOBES))), atelectasis=atelectasis,
      atelectasis_side=int(rng.integers(2)), pneumothorax=pneumothorax, pneumothorax_side=int(rng.integers(2)),
      rhythm="af" if af else "sinus", heart_rate=rate,
      pr_interval=_away_from(patient.pr_interval + rng.normal(0.0, 0.004), [THRESHOLDS["first_degree_av_block"]],
                             0.008),
      conduction=patient.conduction, st_elevation=st_elevation,
      st_territory=int(rng.integers(len(phantoms.ST_TERRITORIES))))


def state_findings(state: phantoms.ClinicalState) -> tuple[dict[str, bool], dict[str, bool]]:
  """The thresholded (CXR, ECG) findings of a state: what the reports will state."""
  cxr = {"cardiomegaly": state.heart_size > THRESHOLDS["cardiomegaly"],
         "pleural_effusion": state.effusion > THRESHOLDS["pleural_effusion"],
         "edema": state.edema > THRESHOLDS["edema"],
         "consolidation": state.consolidation > THRESHOLDS["consolidation"],
         "atelectasis": state.atelectasis > THRESHOLDS["atelectasis"],
         "pneumothorax": state.pneumothorax > THRESHOLDS["pneumothorax"]}
  cxr["no_finding"] = not any(cxr.values())
  sinus = state.rhythm == "sinus"
  ecg = {"sinus_rhythm": sinus and BRADYCARDIA_BPM <= state.heart_rate <= TACHYCARDIA_BPM,
         "sinus_tachycardia": sinus and state.heart_rate > TACHYCARDIA_BPM,
         "sinus_bradycardia": sinus and state.heart_rate < BRADYCARDIA_BPM,
         "atrial_fibrillation": not sinus,
         "lvh": state.lv_mass > THRESHOLDS["lvh"],
         "rbbb": state.conduction == "rbbb",
         "lbbb": state.conduction == "lbbb",
         "st_elevation": state.st_elevation > THRESHOLDS["st_elevation"],
         "first_degree_av_block": sinus and state.pr_interval > THRESHOLDS["first_degree_av_block"]}
  ecg["normal_ecg"] = ecg["sinus_rhythm"] and not any(ecg[k] for k in ECG_LABELS[3:-1])
  return cxr, ecg


# =====================================================================================================================
# Reports
# =====================================================================================================================

_SEVERITY = ("mild", "moderate", "severe")
_SEVERITY_ADVERB = ("mildly", "moderately", "markedly")
_SIZE = ("small", "moderate", "large")


def _grade(value: float, cuts: tuple[float, float]) -> int:
  return int(value > cuts[0]) + int(value > cuts[1])


def _cap(text: str) -> str:
  return text[:1].upper() + text[1:]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))]


def _sentence(rng: np.random.Generator, options: Sequence[str]) -> str:
  return _cap(_pick(rng, options))


def _positive_cxr_phrases(state: phantoms.ClinicalState, rng: np.random.Generator) -> dict[str, tuple[str, str]]:
  """(findings sentence, impression phrase) per positive CXR finding; severity words appear at random."""
  say_grade = lambda: rng.random() < 0.6  # pylint: disable=unnecessary-lambda-assignment
  found, _ = state_findings(state)
  out = {}
  if found["cardiomegaly"]:
    g = _grade(state.heart_size, (0.55, 0.6))
    sev, adv = (_SEVERITY[g] + " ", _SEVERITY_ADVERB[g] + " ") if say_grade() else ("", "")
    out["cardiomegaly"] = (
        _sentence(rng, [f"{sev}cardiomegaly.", f"The cardiac silhouette is {adv}enlarged.", "Enlarged cardiac "
                        "silhouette.", f"The heart is {adv}enlarged.", f"There is {sev}cardiomegaly."]),
        _pick(rng, [f"{sev}cardiomegaly", "enlarged cardiac silhouette"]))
  if found["pleural_effusion"]:
    size = _SIZE[_grade(state.effusion, (0.4, 0.7))] + " " if say_grade() else ""
    if state.effusion_side == phantoms.BILATERAL:
      effusion = f"{size}bilateral pleural effusions"
      sentence = _pick(rng, [f"{effusion}.", f"There are {effusion}.",
                             f"{size}bilateral pleural effusions with blunting of the costophrenic angles."])
    else:
      side = phantoms.SIDE_NAMES[state.effusion_side]
      effusion = f"{size}{side} pleural effusion"
      sentence = _pick(rng, [f"{effusion}.", f"There is a {effusion}.",
                             f"Blunting of the {side} costophrenic angle consistent with a {size}pleural effusion.",
                             f"{size}layering {side} pleural fluid."])
    out["pleural_effusion"] = (_cap(sentence), effusion)
  if found["edema"]:
    sev = _SEVERITY[_grade(state.edema, (0.4, 0.7))] + " " if say_grade() else ""
    out["edema"] = (
        _sentence(rng, [f"{sev}pulmonary edema.", f"Findings consistent with {sev}pulmonary edema.",
                        f"There is {sev}interstitial edema.",
                        "Perihilar haziness and interstitial markings consistent with pulmonary edema.",
                        f"Pulmonary vascular congestion with {sev}edema."]),
        _pick(rng, [f"{sev}pulmonary edema", f"{sev}interstitial edema"]))
  if found["consolidation"]:
    sev = _SEVERITY[_grade(state.consolidation, (0.4, 0.7))] + " " if say_grade() else ""
    lobe = phantoms.LOBES[state.consolidation_lobe][0]
    out["consolidation"] = (
        _sentence(rng, [f"{sev}consolidation in the {lobe}.", f"Focal airspace opacity in the {lobe} concerning "
                        "for pneumonia.", f"{lobe} consolidation.", f"There is {sev}consolidation of the {lobe}."]),
        _pick(rng, [f"{lobe} consolidation", f"{lobe} pneumonia", f"airspace opacity in the {lobe}"]))
  if found["atelectasis"]:
    sev = _SEVERITY[_grade(state.atelectasis, (0.4, 0.7))] + " " if say_grade() else ""
    side = phantoms.SIDE_NAMES[state.atelectasis_side]
    out["atelectasis"] = (
        _sentence(rng, [f"{sev}{side} basilar atelectasis.", f"Plate-like atelectasis at the {side} base.",
                        f"{sev}{side} lower lobe atelectasis with volume loss.",
                        f"Linear opacity at the {side} base compatible with atelectasis."]),
        f"{sev}{side} basilar atelectasis")
  if found["pneumothorax"]:
    size = _SIZE[_grade(state.pneumothorax, (0.45, 0.75))] + " " if say_grade() else ""
    side = phantoms.SIDE_NAMES[state.pneumothorax_side]
    out["pneumothorax"] = (
        _sentence(rng, [f"{size}{side} apical pneumothorax.", f"There is a {size}{side} pneumothorax.",
                        f"{size}{side} pneumothorax with a visible pleural line."]),
        f"{size}{side} pneumothorax")
  return out


_NEGATIVE_CXR = {
    "cardiomegaly": ("Heart size is normal.", "The cardiac silhouette is within normal limits.", "Normal heart size.",
                     "No cardiomegaly.", "The heart is not enlarged."),
    "pleural_effusion": ("No pleural effusion.", "There is no pleural effusion.", "The costophrenic angles are sharp."),
    "edema": ("No pulmonary edema.", "There is no evidence of pulmonary edema.", "Pulmonary vasculature is normal."),
    "consolidation": ("No focal consolidation.", "The lungs are clear without consolidation.",
                      "No airspace opacity to suggest pneumonia."),
    "atelectasis": ("No atelectasis.", "No evidence of atelectasis."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."),
}
_GROUPED_NEGATIVES = (
    (("pleural_effusion", "pneumothorax"), "No pleural effusion or pneumothorax."),
    (("consolidation", "pleural_effusion", "pneumothorax"),
     "No focal consolidation, pleural effusion, or pneumothorax."),
    (("consolidation", "pleural_effusion", "pneumothorax"), "The lungs are clear. No effusion or pneumothorax."),
)
_FILLER_CXR = ("The mediastinal contours are normal.", "Hilar contours are unremarkable.",
               "No acute osseous abnormality.", "The visualized osseous structures are intact.",
               "Mediastinal and hilar contours are within normal limits.")
_NORMAL_IMPRESSION = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                      "Normal chest radiograph.", "No acute intrathoracic process.")


def cxr_report(state: phantoms.ClinicalState, rng: np.random.Generator) -> str:
  """A radiology-style 'FINDINGS: ... IMPRESSION: ...' report of the thresholded CXR findings."""
  positives = _positive_cxr_phrases(state, rng)
  absent = [k for k in CXR_LABELS[:-1] if k not in positives]
  sentences = [sentence for sentence, _ in positives.values()]
  # Negations: sometimes one grouped sentence, then a random subset of the remaining absent findings.
  grouped = [g for g in _GROUPED_NEGATIVES if all(k in absent for k in g[0])]
  if grouped and rng.random() < 0.5:
    keys, sentence = grouped[int(rng.integers(len(grouped)))]
    sentences.append(sentence)
    absent = [k for k in absent if k not in keys]
  for key in absent:
    if rng.random() < (0.8 if key in ("cardiomegaly", "pneumothorax", "pleural_effusion") else 0.35):
      sentences.append(_pick(rng, _NEGATIVE_CXR[key]))
  sentences += [s for s in _FILLER_CXR if rng.random() < 0.25]
  order = rng.permutation(len(sentences))
  findings = " ".join(sentences[i] for i in order)
  if positives:
    phrases = [impression for _, impression in positives.values()]
    phrases = [phrases[i] for i in rng.permutation(len(phrases))] if rng.random() < 0.5 else phrases
    if len(phrases) > 1 and rng.random() < 0.4:
      impression = " ".join(f"{i + 1}. {_cap(p)}." for i, p in enumerate(phrases))
    else:
      impression = _cap(", ".join(phrases[:-1]) + (" and " if len(phrases) > 1 else "") + phrases[-1]) + "."
    if "pneumothorax" not in positives and rng.random() < 0.3:
      impression += " No pneumothorax."
  else:
    impression = _pick(rng, _NORMAL_IMPRESSION)
  return f"FINDINGS: {findings} IMPRESSION: {impression}"


def ecg_report(state: phantoms.ClinicalState) -> str:
  """A terse machine-read ECG statement in a fixed order (so identical findings give identical texts)."""
  _, found = state_findings(state)
  statements = []
  if found["atrial_fibrillation"]:
    statements.append("Atrial fibrillation with rapid ventricular response" if state.heart_rate > 110
                      else "Atrial fibrillation")
  else:
    statements.append("Sinus tachycardia" if found["sinus_tachycardia"] else
                      "Sinus bradycardia" if found["sinus_bradycardia"] else "Sinus rhythm")
  if found["first_degree_av_block"]:
    statements.append("1st degree A-V block")
  if found["rbbb"]:
    statements.append("Right bundle branch block")
  if found["lbbb"]:
    statements.append("Left bundle branch block")
  if found["lvh"]:
    statements.append("Left ventricular hypertrophy with repolarization abnormality" if state.lv_mass > 1.5
                      else "Left ventricular hypertrophy")
  if found["st_elevation"]:
    territory = phantoms.ST_TERRITORIES[state.st_territory]
    statements.append(f"ST elevation, consider {territory} injury or acute infarct")
  if found["normal_ecg"]:
    statements.append("Normal ECG")
  elif any(found[k] for k in ECG_LABELS[3:-1]):
    statements.append("Abnormal ECG")
  else:  # only the rate is off
    statements.append("Borderline ECG")
  return ". ".join(statements) + "."


# ---------------------------------------------------------------------------------------------------------------------
# Rule-based labellers: read the text only (synonyms + negation), never the generator's state.
# ---------------------------------------------------------------------------------------------------------------------

_CXR_TERMS = {
    "cardiomegaly": r"cardiomegaly|enlarged cardiac silhouette|(?:heart|cardiac silhouette)\b[^.]*\benlarged",
    "pleural_effusion": r"effusion|pleural fluid|blunting of the (?:\w+ )?costophrenic",
    "edema": r"edema|vascular congestion",
    "consolidation": r"consolidation|airspace (?:opacity|opacities|disease)|pneumonia",
    "atelectasis": r"atelecta|volume loss",
    "pneumothorax": r"pneumothora",
}
_NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of|absence of)\b")
_ECG_TERMS = {
    "sinus_rhythm": r"\bsinus rhythm\b",
    "sinus_tachycardia": r"\bsinus tachycardia\b",
    "sinus_bradycardia": r"\bsinus bradycardia\b",
    "atrial_fibrillation": r"\batrial fibrillation\b",
    "lvh": r"\bleft ventricular hypertrophy\b",
    "rbbb": r"\bright bundle branch block\b",
    "lbbb": r"\bleft bundle branch block\b",
    "st_elevation": r"\bst elevation\b",
    "first_degree_av_block": r"\b(?:1st|first) degree a-?v block\b",
    "normal_ecg": r"(?<![a-z])normal ecg\b",
}


def label_cxr_report(text: str) -> np.ndarray:
  """CXR labels (float32, in CXR_LABELS order) from report text: a finding is positive when one of its terms occurs
  in a sentence with no negation cue before the term's end ("No effusion.", "The heart is not enlarged.")."""
  labels = dict.fromkeys(CXR_LABELS, 0.0)
  for sentence in re.split(r"(?<=\.)\s+|:", text.lower()):
    for name, pattern in _CXR_TERMS.items():
      for match in re.finditer(pattern, sentence):
        if not _NEGATION.search(sentence, 0, match.end()):
          labels[name] = 1.0
  labels["no_finding"] = float(not any(labels[k] for k in CXR_LABELS[:-1]))
  return np.array([labels[k] for k in CXR_LABELS], np.float32)


def label_ecg_report(text: str) -> np.ndarray:
  """ECG labels (float32, in ECG_LABELS order) from a machine-read statement."""
  text = text.lower()
  return np.array([float(bool(re.search(_ECG_TERMS[k], text))) for k in ECG_LABELS], np.float32)


# =====================================================================================================================
# Records
# =====================================================================================================================


def _extras(state: phantoms.ClinicalState) -> dict[str, list[float]]:
  """The continuous latent state (and categorical choices as indices) for later analysis."""
  values = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  values["rhythm"] = phantoms.RHYTHMS.index(state.rhythm)
  values["conduction"] = phantoms.CONDUCTIONS.index(state.conduction)
  values["qrs_voltage"] = state.qrs_voltage
  values["qrs_duration"] = state.qrs_duration
  return {k: [float(v)] for k, v in values.items()}


def _ecg_to_store_rate(leads_mv: np.ndarray, params: WorldParams) -> np.ndarray:
  """Synthesised leads (mV [T, 12] at `ecg_sampling_rate`) -> `ecg_seconds` of them at `ecg_rate_stored`, resampled
  by the reader's own code (`preprocess.preprocess_ecg`, without augmentation): what the input pipeline computes from
  a record stored at the synthesis rate, without that record's int16 rounding (the stored record rounds once, after
  resampling)."""
  rate = params.ecg_rate_stored
  if rate == params.ecg_sampling_rate:
    return leads_mv
  spec = preprocess.EcgSpec(sampling_rate=float(rate), num_samples=int(round(rate * params.ecg_seconds)),
                            leads=schema.LEADS_12, scale_mv=1.0)
  return preprocess.preprocess_ecg(leads_mv, float(params.ecg_sampling_rate), spec, name="synthetic ECG")


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


# =====================================================================================================================
# Outcomes and patient facts (version 2; their own random stream)
# =====================================================================================================================


def _sigmoid(z: float) -> float:
  return 1.0 / (1.0 + math.exp(-z))


def patient_facts(patient: _Patient, rng: np.random.Generator) -> dict[str, float]:
  """Sex and comorbidity count of a patient, drawn from the outcome stream `rng` (module docstring)."""
  male = float(rng.random() < 0.5)
  rate = math.exp(-0.1 + 0.03 * (patient.age - 55.0) + 0.3 * patient.hf_propensity + 0.4 * patient.remodelling)
  return {"sex_male": male, "comorbidity_count": float(min(int(rng.poisson(rate)), 9))}


def outcome_risks(state: phantoms.ClinicalState, facts: dict[str, float]) -> dict[str, float]:
  """P(in-hospital death) and P(30-day readmission | survived) of an encounter (the formulas of the docstring)."""
  af = float(state.rhythm == "af")
  mortality = _sigmoid(-4.06 + 0.025 * (state.age - 65.0) + 0.15 * facts["comorbidity_count"] + 0.2 * facts["sex_male"]
                       + 3.0 * state.edema + 3.0 * state.consolidation + 1.5 * state.effusion
                       + 0.04 * (state.heart_rate - 80.0) + 8.0 * state.st_elevation + 0.3 * af)
  readmission = _sigmoid(-2.18 + 0.01 * (state.age - 65.0) + 0.15 * facts["comorbidity_count"]
                         + 0.4 * state.hf_severity + 8.0 * (state.heart_size - 0.45)
                         + 0.6 * max(state.lv_mass - 0.8, 0.0) + 0.4 * af + 1.0 * state.effusion)
  return {"in_hospital_mortality": mortality, "readmission_30d": readmission}


def draw_outcomes(state: phantoms.ClinicalState, facts: dict[str, float],
                  rng: np.random.Generator) -> dict[str, float]:
  """The encounter's outcome labels and risks as extras (`outcome_<name>`, `risk_<name>`). Both uniforms are
  drawn whatever the first outcome, so every encounter consumes the same share of the outcome stream."""
  risks = outcome_risks(state, facts)
  u_death, u_readmission = rng.random(), rng.random()
  died = u_death < risks["in_hospital_mortality"]
  readmitted = NOT_APPLICABLE if died else float(u_readmission < risks["readmission_30d"])
  return {"outcome_in_hospital_mortality": float(died), "outcome_readmission_30d": readmitted,
          **{f"risk_{name}": risk for name, risk in risks.items()}}


def patient_split(params: WorldParams, patient_index: int) -> str:
  """The patient's split, from a hash of (seed, patient index): stable when num_patients changes."""
  digest = hashlib.sha256(f"{DATASET_NAME}/{params.seed}/{patient_index}".encode()).digest()
  u = int.from_bytes(digest[:8], "little") / 2.0 ** 64
  train, val, _ = params.split_fractions
  return "train" if u < train else "val" if u < train + val else "test"


def patient_encounters(params: WorldParams, patient_index: int) -> Iterator[schema.Encounter]:
  """Generates one patient's encounters (1..max each), in time order, from the patient's own RNG."""
  rng = np.random.default_rng([params.seed, patient_index])
  outcome_rng = np.random.default_rng([params.seed, patient_index, OUTCOME_STREAM])
  split = patient_split(params, patient_index)
  patient = _sample_patient(rng)
  facts = patient_facts(patient, outcome_rng)
  patient_id = f"syn-p{patient_index:06d}"
  t = _EPOCH_START + rng.uniform(0.0, 3 * 365 * _DAY)
  for k in range(int(rng.integers(1, params.max_encounters_per_patient + 1))):
    t += 0.0 if k == 0 else rng.uniform(20.0, 400.0) * _DAY
    state = _sample_state(patient, rng)
    cxr_found, ecg_found = state_findings(state)
    linked = rng.random() < params.link_fraction
    take_cxr = linked or rng.random() < params.cxr_only_fraction
    take_ecg = linked or not take_cxr
    parts = {}
    if take_cxr:
      image = _png(phantoms.render_cxr(state, rng, params.image_size))
      parts["cxr"] = schema.Part(data=image, report=cxr_report(state, rng),
                                 labels=[float(cxr_found[k]) for k in CXR_LABELS], study_id=f"{patient_id}-cxr{k}",
                                 time=t)
    if take_ecg:
      leads = _ecg_to_store_rate(phantoms.synthesize_ecg(state, rng, params.ecg_sampling_rate, params.ecg_seconds),
                                 params)
      ecg = codecs.EcgData(samples=phantoms.quantize_ecg(leads, params.ecg_gain),
                           gain=[params.ecg_gain] * len(schema.LEADS_12), leads=schema.LEADS_12,
                           sampling_rate=float(params.ecg_rate_stored))
      ecg_time = t + (rng.uniform(-12.0, 12.0) * 3600.0 if linked else 0.0)  # a linked ECG: within 12 h of its CXR
      parts["ecg"] = schema.Part(data=ecg, report=ecg_report(state), labels=[float(ecg_found[k]) for k in ECG_LABELS],
                                 study_id=f"{patient_id}-ecg{k}", time=ecg_time)
    yield schema.Encounter(encounter_id=f"{patient_id}-e{k}", patient_id=patient_id, split=split,
                           dataset=DATASET_NAME, linked=linked, parts=parts,
                           extras={**_extras(state), **{k: [v] for k, v in facts.items()},
                                   **{k: [v] for k, v in draw_outcomes(state, facts, outcome_rng).items()}})


# =====================================================================================================================
# Shards and the cache
# =====================================================================================================================


@dataclasses.dataclass(frozen=True)
class _ShardTask:
  params: WorldParams
  out_dir: str
  split: str
  index: int
  count: int
  patients: tuple[int, ...]


def _shard_tasks(params: WorldParams, out_dir: str) -> list[_ShardTask]:
  """Patients go to their split's shards round-robin in index order; largest shards first (better packing)."""
  by_split: dict[str, list[int]] = {s: [] for s in schema.SPLITS}
  for i in range(params.num_patients):
    by_split[patient_split(params, i)].append(i)
  tasks = []
  for split, count in zip(schema.SPLITS, params.num_shards):
    for index in range(count):
      tasks.append(_ShardTask(params, out_dir, split, index, count, tuple(by_split[split][index::count])))
  return sorted(tasks, key=lambda t: -len(t.patients))


def _write_shard(task: _ShardTask, on_patient: Callable[[], None]) -> tuple[str, schema.ShardStats, int]:
  name = schema.shard_name(task.split, task.index, task.count)
  path = paths.join(task.out_dir, name)
  stats = schema.ShardStats(file=name)
  # The shard and its index (shard_index), so training starts without a scan.
  with ShardWriter(path, modalities=("cxr", "ecg")) as writer:
    for patient_index in task.patients:
      for enc in patient_encounters(task.params, patient_index):
        writer.write(schema.encode_encounter(enc))
        stats.add(enc)
      on_patient()
  stats.index = writer.index_file
  return task.split, stats, paths.file_size(path)


_worker_progress: multiprocessing.Queue | None = None


def _init_worker(progress: multiprocessing.Queue) -> None:
  global _worker_progress  # pylint: disable=global-statement
  _worker_progress = progress


def _write_shard_in_worker(task: _ShardTask) -> tuple[str, schema.ShardStats, int]:
  return _write_shard(task, lambda: _worker_progress.put(1))


def _run_tasks(tasks: list[_ShardTask], workers: int, bar: tqdm.tqdm) -> list[tuple[str, schema.ShardStats, int]]:
  if workers <= 1:
    return [_write_shard(task, lambda: bar.update(1)) for task in tasks]
  # 'spawn', not 'fork': the caller may already hold JAX/XLA threads, which do not survive a fork.
  ctx = multiprocessing.get_context("spawn")
  progress = ctx.Queue()
  with ctx.Pool(workers, initializer=_init_worker, initargs=(progress,)) as pool:
    pending = pool.map_async(_write_shard_in_worker, tasks, chunksize=1)
    while not pending.ready():
      try:
        bar.update(progress.get(timeout=0.2))
      except queue_lib.Empty:
        pass
    return pending.get()  # re-raises a worker's exception


def _check_owned(out_dir: str) -> dict | None:
  """The dataset_info in out_dir if it is a synthetic world's, None if absent; raises if it belongs to another."""
  path = paths.join(out_dir, schema.DATASET_INFO)
  if not paths.exists(path):
    return None
  info = json.loads(paths.read_text(path))
  if info.get("name") != DATASET_NAME:
    raise ValueError(f"{out_dir} holds dataset {info.get('name')!r}, not a synthetic world; choose another "
                     "output directory")
  return info


def _remove_world(out_dir: str, info: dict) -> None:
  """Removes the dataset_info and the shards (and their indexes) a previous world listed (nothing else)."""
  paths.remove(paths.join(out_dir, schema.DATASET_INFO), missing_ok=False)
  for split in info.get("splits", {}).values():
    for shard in split["shards"]:
      for path in (paths.join(out_dir, shard["file"]), paths.join(out_dir, shard["file"] + ".tmp")):
        paths.remove(path)
      remove_index(out_dir, shard)


def generate_world(out_dir: str | os.PathLike, params: WorldParams = WorldParams(), *, workers: int | None = None,
                   progress: bool = True) -> dict:
  """Generates the world into `out_dir` (shards, then dataset_info.json last) and returns the dataset_info written.

  Work is split by shard over `workers` processes (default min(2, cpu count)); the bytes do not depend on it.
  `out_dir` may be a URI (gs://...): every file goes through `medbind_jax.paths`, each worker writing its shards.
  """
  out_dir = os.fspath(out_dir)
  paths.makedirs(out_dir)
  old = _check_owned(out_dir)
  if old is not None:  # written last, so a world interrupted from here on has no info and is regenerated
    _remove_world(out_dir, old)
  workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
  tasks = _shard_tasks(params, out_dir)
  start = time.perf_counter()
  with tqdm.tqdm(total=params.num_patients, unit="patient", desc="synthetic world", disable=not progress) as bar:
    results = _run_tasks(tasks, min(workers, len(tasks)), bar)
    bar.update(params.num_patients - bar.n)
  shards = {split: [] for split in schema.SPLITS}
  for split, stats, _ in results:
    shards[split].append(stats)
  info = schema.write_dataset_info(
      out_dir, name=DATASET_NAME, shards=shards, label_names={"cxr": CXR_LABELS, "ecg": ECG_LABELS},
      source="data_prep/synthetic_world.py (generated; no real patient data)",
      licence="CC0-1.0 (synthetic data generated by this project)",
      description="Synthetic clinical world: patients with latent heart-failure / infection / anatomy factors; per "
                  "encounter a phantom PA chest X-ray with a radiology report and/or a 12-lead "
                  f"{params.ecg_rate_stored} Hz ECG with a machine-read statement. Labels are the findings the reports "
                  "state; extra/* holds the continuous latent severities shared by a linked CXR and ECG, the patient "
                  "facts and the encounter's outcome labels.",
      outcomes={name: {"extra": f"outcome_{name}", "risk": f"risk_{name}", "not_applicable": NOT_APPLICABLE}
                for name in OUTCOMES},
      patient_facts=list(PATIENT_FACTS),
      generator_version=GENERATOR_VERSION, params=canonical_params(params), fingerprint=fingerprint(params),
      shard_bytes={stats.file: size for _, stats, size in sorted(results, key=lambda r: r[1].file)},
      thresholds=THRESHOLDS)
  info = schema.read_dataset_info(out_dir)  # as JSON gives it back (lists, not tuples), like a reused world
  counts = {s: v["num_examples"] for s, v in info["splits"].items()}
  logging.info("generated synthetic world in %s: %s encounters in %.1f s", out_dir, counts,
               time.perf_counter() - start)
  return info


def ensure_world(out_dir: str | os.PathLike, params: WorldParams = WorldParams(), **kwargs) -> dict:
  """Returns the world in `out_dir` if it was generated with these params and is complete; otherwise (re)generates
  it (removing a stale world's shards first; other files are left alone). kwargs go to `generate_world`."""
  out_dir = os.fspath(out_dir)
  info = _check_owned(out_dir) if paths.as_path(out_dir).is_dir() else None
  if info is not None:
    if info.get("fingerprint") == fingerprint(params):
      sizes = info.get("shard_bytes", {})
      missing = [f for f, size in sizes.items()
                 if not paths.is_file(paths.join(out_dir, f)) or paths.file_size(paths.join(out_dir, f)) != size]
      if sizes and not missing:
        logging.info("reusing the synthetic world in %s (fingerprint %s)", out_dir, info["fingerprint"][:12])
        return info
      logging.info("synthetic world in %s is incomplete (%d shard(s) missing or resized): regenerating", out_dir,
                   len(missing))
    else:
      logging.info("synthetic world in %s has other parameters (fingerprint %s): regenerating", out_dir,
                   str(info.get("fingerprint"))[:12])
  else:
    logging.info("no synthetic world in %s: generating", out_dir)
  return generate_world(out_dir, params, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--seed", type=int, default=WorldParams.seed)
  parser.add_argument("--num_patients", type=int, default=WorldParams.num_patients)
  parser.add_argument("--link_fraction", type=float, default=WorldParams.link_fraction)
  parser.add_argument("--image_size", type=int, default=WorldParams.image_size)
  parser.add_argument("--ecg_store_rate", type=int, default=WorldParams.ecg_store_rate,
                      help="store ECGs resampled to this rate in Hz, e.g. the training rate (default: the "
                           f"synthesis rate, {WorldParams.ecg_sampling_rate} Hz)")
  parser.add_argument("--workers", type=int, default=None, help="processes (default min(2, cpu count))")
  parser.add_argument("--force", action="store_true", help="regenerate even if an identical world is present")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  params = WorldParams(seed=args.seed, num_patients=args.num_patients, link_fraction=args.link_fraction,
                       image_size=args.image_size, ecg_store_rate=args.ecg_store_rate)
  make = generate_world if args.force else ensure_world
  info = make(args.out, params, workers=args.workers)
  for split, stats in info["splits"].items():
    print(f"{split}: {stats['num_examples']} encounters ({stats['num_cxr']} CXR, {stats['num_ecg']} ECG, "
          f"{stats['num_linked']} linked)")


if __name__ == "__main__":
  main()
