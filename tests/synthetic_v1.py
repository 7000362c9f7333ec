"""Version 1 of the synthetic world (data_prep/synthetic_world.py before the outcome labels), as arrays, and the
comparison of today's generator against them (tests/test_outcomes.py). Imports only what version 1 had, so the
fixture can be re-written from a checkout of that code:

  PYTHONPATH=<checkout of e3c5e06> python tests/synthetic_v1.py    # writes tests/fixtures/synthetic_world_v1.npz
"""

import io
import os

import numpy as np
from PIL import Image

from data_prep import synthetic_world as sw

# The latent fields version 1 stored in each record's extras.
V1_EXTRAS = ("age", "atelectasis", "atelectasis_side", "conduction", "consolidation", "consolidation_lobe", "edema",
             "effusion", "effusion_side", "habitus", "heart_axis_deg", "heart_rate", "heart_size", "hf_severity",
             "infection", "lv_mass", "pneumothorax", "pneumothorax_side", "pr_interval", "qrs_duration", "qrs_voltage",
             "rhythm", "st_elevation", "st_territory")
V1_PARAMS = sw.WorldParams(num_patients=12, image_size=32, ecg_sampling_rate=100, ecg_seconds=2.0)
V1_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "synthetic_world_v1.npz")


def v1_arrays(params: sw.WorldParams) -> dict[str, np.ndarray]:
  """Every encounter's version-1 outputs by name `<encounter id>/<modality>/<field>` (report, labels, time, the
  decoded CXR pixels or the ECG samples) and `<encounter id>/extras` (V1_EXTRAS' values in that order)."""
  out = {}
  for patient in range(params.num_patients):
    for enc in sw.patient_encounters(params, patient):
      for modality, part in enc.parts.items():
        key = f"{enc.encounter_id}/{modality}"
        out[f"{key}/report"] = np.asarray(part.report)
        out[f"{key}/labels"] = np.asarray(part.labels, np.float32)
        out[f"{key}/time"] = np.asarray(part.time, np.float64)
        out[f"{key}/data"] = (np.asarray(Image.open(io.BytesIO(part.data))) if modality == "cxr"
                              else np.asarray(part.data.samples, np.float32))
      out[f"{enc.encounter_id}/extras"] = np.concatenate(
          [np.asarray(enc.extras[k], np.float64).ravel() for k in V1_EXTRAS])
  return out


def v1_differences(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> list[str]:
  """What differs beyond floating-point rounding. The fixture was written on one CPU; on another, NumPy's
  vectorised transcendental functions may round differently in the last bit (the very same version-1 code gives
  different sha256 digests of its output on two of this project's machines), which can move a float32 sample by
  an ulp or a rendered pixel across a rounding boundary. Texts, labels and ids must match exactly."""
  problems = [f"{key}: only in one of the two" for key in sorted(set(got) ^ set(want))]
  for key in sorted(set(got) & set(want)):
    g, w = got[key], want[key]
    if g.shape != w.shape or g.dtype != w.dtype:
      problems.append(f"{key}: {g.dtype}{g.shape} vs {w.dtype}{w.shape}")
    elif key.endswith(("/report", "/labels")):
      if not np.array_equal(g, w):
        problems.append(f"{key}: {g} vs {w}")
    elif w.dtype == np.uint8:  # CXR pixels: at most one grey level, on at most 1% of them
      diff = np.abs(g.astype(np.int16) - w.astype(np.int16))
      if diff.max() > 1 or (diff > 0).mean() > 0.01:
        problems.append(f"{key}: max pixel difference {diff.max()}, {(diff > 0).mean():.1%} of pixels differ")
    elif key.endswith("/time"):  # seconds since the epoch (~1.6e9): a relative bound would allow minutes
      if abs(float(g) - float(w)) > 1e-3:
        problems.append(f"{key}: {float(g)!r} vs {float(w)!r}")
    elif not np.allclose(g, w, rtol=1e-6, atol=1e-6):
      problems.append(f"{key}: max abs difference {np.max(np.abs(g.astype(np.float64) - w)):.3g}")
  return problems


if __name__ == "__main__":
  np.savez_compressed(V1_FIXTURE, **v1_arrays(V1_PARAMS))
  print(f"wrote {V1_FIXTURE} with data_prep.synthetic_world version {sw.GENERATOR_VERSION}")
