"""Renderers of the synthetic clinical world: a phantom chest X-ray and a 12-lead ECG from one `ClinicalState`.

Both renderers read the same continuous state, so a linked CXR and ECG share it: heart size widens the cardiac
silhouette and raises QRS voltage; body habitus widens the thorax and damps QRS amplitude; the heart axis tilts the
silhouette and rotates the frontal QRS vector. Neither renderer decides labels; `synthetic_world` thresholds the
state into report findings.

CXR: a PA view built as a density map (soft tissue, air-filled lungs, mediastinum, heart, ribs, diaphragm, vessel
markings) in patient coordinates X (patient's left = image right) and Y (down), then positioned, exposed, blurred and
noised. ECG: a cardiac dipole (vectorcardiogram) made of Gaussian lobes per beat, projected onto electrode lead
vectors; the 12 leads are differences of electrode potentials, so Einthoven's relations hold exactly before rounding.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage, special

# Which side a lateralised finding is on.
RIGHT, LEFT, BILATERAL = 0, 1, 2
SIDE_NAMES = ("right", "left", "bilateral")
# Consolidation sites: (name, side, vertical position in the lung from apex 0 to base 1).
LOBES = (("right upper lobe", RIGHT, 0.25), ("right middle lobe", RIGHT, 0.62), ("right lower lobe", RIGHT, 0.75),
         ("left upper lobe", LEFT, 0.3), ("left lower lobe", LEFT, 0.75))
CONDUCTIONS = ("normal", "rbbb", "lbbb")
RHYTHMS = ("sinus", "af")
ST_TERRITORIES = ("anterior", "inferior", "lateral")


@dataclasses.dataclass
class ClinicalState:
  """The latent state of one encounter, shared by its CXR and ECG. Severities are continuous, 0 = absent."""

  age: float
  habitus: float  # body build, ~1; larger = broader thorax, more tissue damping QRS voltage
  heart_axis_deg: float  # frontal QRS axis (normal about -30..90)
  hf_severity: float  # heart-failure activity of this encounter (>= 0)
  infection: float  # infection activity of this encounter (>= 0)
  heart_size: float  # cardiothoracic ratio (normal ~0.42, cardiomegaly > 0.5)
  lv_mass: float  # LV mass index (LVH > 1)
  edema: float  # 0..1
  effusion: float  # 0..1
  effusion_side: int
  consolidation: float  # 0..1
  consolidation_lobe: int  # index into LOBES
  atelectasis: float  # 0..1
  atelectasis_side: int  # RIGHT or LEFT
  pneumothorax: float  # 0..1
  pneumothorax_side: int  # RIGHT or LEFT
  rhythm: str  # one of RHYTHMS
  heart_rate: float  # mean ventricular rate, beats per minute
  pr_interval: float  # seconds (unused in AF)
  conduction: str  # one of CONDUCTIONS
  st_elevation: float  # mV in the injured territory, 0 = none
  st_territory: int  # index into ST_TERRITORIES

  @property
  def qrs_voltage(self) -> float:
    """Relative QRS amplitude: grows with LV mass and heart size, damped by a broad habitus."""
    return (0.75 + 0.35 * self.lv_mass + 2.0 * (self.heart_size - 0.42)) / self.habitus ** 2

  @property
  def qrs_duration(self) -> float:
    """Nominal QRS duration in seconds."""
    return {"normal": 0.09, "rbbb": 0.14, "lbbb": 0.155}[self.conduction]


# =====================================================================================================================
# Phantom chest X-ray
# =====================================================================================================================


def _soft_step(z: np.ndarray, width: float) -> np.ndarray:
  """A 0 -> 1 linear ramp centred on z = 0, `width` wide: an anti-aliased mask edge (cheaper than a sigmoid)."""
  return np.clip(z * (1.0 / width) + 0.5, 0.0, 1.0)


def _norm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """sqrt(a^2 + b^2) (np.hypot is several times slower on float32 images)."""
  return np.sqrt(a * a + b * b)


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
  """Zero-mean, unit-std Gaussian-filtered white noise of shape [size, size]."""
  field = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma_px, mode="wrap",
                                  truncate=3.0)
  return field / (field.std() + 1e-6)


@dataclasses.dataclass
class _ThoraxGeometry:
  """Lung geometry in patient coordinates: X in [-1, 1] (patient's left positive), Y down."""

  half_width: float  # lateral chest-wall distance at the bases
  apex_y: float
  base_y: tuple[float, float]  # lateral costophrenic level, (right, left)
  mediastinum: float  # half-width of the mediastinum next to the lungs
  shift: float  # mediastinal shift towards the patient's left (+) or right (-)
  edge: float  # mask edge width (about one pixel)

  def lateral_wall(self, y: np.ndarray) -> np.ndarray:
    """Distance of the chest wall from the midline at height y: a rounded apex widening to the base."""
    return self.half_width * np.sqrt(np.clip((y - self.apex_y) / 0.65, 0.0, 1.0))

  def lung(self, x: np.ndarray, y: np.ndarray, side: int) -> np.ndarray:
    """Soft mask of one lung (without the heart cut out)."""
    sign = 1.0 if side == LEFT else -1.0
    lateral = sign * x  # distance from the midline towards this side's chest wall
    base = self.base_y[side]
    centre = 0.5 * self.half_width
    offset = (lateral - centre) / (0.6 * self.half_width)
    dome = base - 0.17 * (1.0 - offset * offset)
    medial = self.mediastinum + sign * (-self.shift)
    return (_soft_step(self.lateral_wall(y) - lateral, self.edge) * _soft_step(lateral - medial, self.edge)
            * _soft_step(dome - y, self.edge))


def render_cxr(state: ClinicalState, rng: np.random.Generator, size: int = 128) -> np.ndarray:
  """Renders a PA phantom chest X-ray of `state`. Returns uint8 [size, size], bright = dense."""
  edge = 3.0 / size  # mask edges ramp over 1.5 pixels
  # Positioning of this study: rotation, shift and magnification.
  # (Python floats and `math` throughout: a NumPy float64 scalar would promote the float32 image arrays.)
  angle = math.radians(rng.normal(0.0, 2.5))
  shift_x, shift_y = (float(v) for v in rng.normal(0.0, 0.03, 2))
  zoom = float(rng.normal(1.0, 0.03))
  grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
  img_y, img_x = np.meshgrid(grid, grid, indexing="ij")
  cos, sin = math.cos(angle), math.sin(angle)
  x = (cos * img_x + sin * img_y - shift_x) / zoom
  y = (-sin * img_x + cos * img_y - shift_y) / zoom

  # Volume loss from atelectasis raises that side's hemidiaphragm and pulls the mediastinum towards it.
  atel_sign = 1.0 if state.atelectasis_side == LEFT else -1.0
  base = [0.47, 0.53]
  base[state.atelectasis_side] -= 0.12 * state.atelectasis
  geom = _ThoraxGeometry(half_width=0.66 * state.habitus, apex_y=-0.78, base_y=(base[0], base[1]),
                         mediastinum=0.10, shift=0.05 * state.atelectasis * atel_sign, edge=edge)
  hw = geom.half_width
  lungs = [geom.lung(x, y, RIGHT), geom.lung(x, y, LEFT)]

  # Heart: an ellipse sitting on the left hemidiaphragm, a third of it right of the midline. Its width is the
  # cardiothoracic ratio times the thoracic width; a horizontal axis (low degrees) tilts it and pushes it left.
  half_w = state.heart_size * hw
  half_h = 0.78 * half_w
  tilt = math.radians(0.5 * (state.heart_axis_deg - 50.0) - 20.0)
  cos, sin = math.cos(tilt), math.sin(tilt)
  hx = half_w / 3.0 + 0.002 * (50.0 - state.heart_axis_deg) * hw + geom.shift
  hy = geom.base_y[LEFT] - 0.14 - 0.45 * half_h
  u = (cos * (x - hx) + sin * (y - hy)) / half_w
  v = (-sin * (x - hx) + cos * (y - hy)) / half_h
  heart = _soft_step((1.0 - np.sqrt(u * u + v * v)) * half_w, edge)

  # Pneumothorax: the lung on that side collapses towards its hilum, leaving a black rim without vessel markings,
  # edged by the thin visceral pleural line.
  air_rim = pleural_line = 0.0
  if state.pneumothorax > 0:
    sign = 1.0 if state.pneumothorax_side == LEFT else -1.0
    anchor_x, anchor_y = sign * (geom.mediastinum + 0.05), 0.25
    stretch = 1.0 + 0.9 * state.pneumothorax
    collapsed = geom.lung(anchor_x + (x - anchor_x) * stretch, anchor_y + (y - anchor_y) * stretch,
                          state.pneumothorax_side)
    air_rim = lungs[state.pneumothorax_side] * (1.0 - collapsed)
    pleural_line = 4.0 * collapsed * (1.0 - collapsed) * lungs[state.pneumothorax_side]

  lung = np.clip(lungs[0] + lungs[1], 0.0, 1.0) * (1.0 - heart)
  aerated = lung * (1.0 - air_rim)  # lung that still carries vessel markings

  # Soft tissue of the body, mediastinum with spine, trachea, ribs, clavicles.
  shoulder = np.clip(-0.45 - y, 0.0, None) / 0.55
  body = _soft_step(1.0 - _norm(x / (hw + 0.17), shoulder), edge)
  medi = _soft_step(geom.mediastinum + 0.02 - np.abs(x - geom.shift), edge) * _soft_step(y + 0.95, edge)
  spine = _soft_step(0.05 - np.abs(x - geom.shift), edge)
  trachea = _soft_step(0.028 - np.abs(x - geom.shift * 0.5), edge) * _soft_step(-0.3 - y, edge) * body
  rib_phase = (y - 0.3 * x * x) / 0.125
  ribs = 0.5 + 0.5 * np.cos(2.0 * np.pi * rib_phase)
  ribs = ((ribs * ribs) ** 3 * _soft_step(geom.lateral_wall(y) + 0.04 - np.abs(x), edge)
          * _soft_step(max(geom.base_y) - y, 4 * edge))
  clavicles = _soft_step(0.03 - np.abs(y + 0.72 - 0.25 * np.abs(x) + 0.25 * 0.3), edge) * \
      _soft_step(hw * 0.9 - np.abs(x), edge) * _soft_step(np.abs(x) - 0.05, edge)

  # Vessel markings: dense near the hila, thinning to the periphery.
  hila = [(-0.17 + geom.shift, -0.05), (0.2 + geom.shift, -0.08)]
  hilar_dist = np.minimum(*[_norm(x - hxx, y - hyy) for hxx, hyy in hila])
  texture = _smooth_noise(rng, size, 1.5 * size / 128)
  # Vessels: the zero crossings of smooth noise, a network of thin curving lines.
  vessels = np.exp(texture * texture * (-1.0 / 0.35 ** 2))
  markings = np.exp(-hilar_dist / 0.3) * (0.08 + 0.06 * vessels) + 0.03 * vessels

  density = (0.50 * body + 0.08 * medi * body + 0.06 * spine * body + 0.06 * heart - 0.15 * trachea
             + 0.05 * ribs * body + 0.08 * clavicles - 0.38 * lung + aerated * markings)
  density += 0.16 * pleural_line - 0.06 * air_rim

  # Finding signatures: their size and/or density grow with the continuous severity (density with its square root,
  # so a just-reportable finding is already visible while a sub-threshold one stays faint).
  if state.effusion > 0:  # basal fluid filling the costophrenic angle, meniscus rising along the lateral wall
    sides = (RIGHT, LEFT) if state.effusion_side == BILATERAL else (state.effusion_side,)
    for side in sides:
      sign = 1.0 if side == LEFT else -1.0
      lateral = np.clip((sign * x - geom.mediastinum) / (hw - geom.mediastinum), 0.0, 1.0)
      level = geom.base_y[side] - (0.08 + 0.45 * state.effusion) - 0.12 * (0.3 + state.effusion) * lateral * lateral
      fluid = _soft_step(y - level, 1.5 * edge) * lungs[side] * (1.0 - heart)
      density += 0.38 * fluid

  if state.edema > 0:  # bilateral perihilar ("bat-wing") haze, interstitial texture and basal Kerley B lines
    haze = sum(np.exp(-0.5 * (_norm((x - hxx) / 0.22, (y - hyy - 0.05) / 0.28) ** 2)) for hxx, hyy in hila)
    lines = 0.5 + 0.5 * np.cos(2.0 * np.pi * y / 0.06)
    lines = (lines * lines) ** 2
    lines = lines * _soft_step(np.abs(x) - (geom.lateral_wall(y) - 0.16), edge) * _soft_step(y - 0.05, edge)
    density += math.sqrt(state.edema) * lung * (0.2 * haze + 0.03 + 0.025 * texture + 0.08 * lines)

  if state.consolidation > 0:  # dense, patchy lobar opacity
    _, side, height = LOBES[state.consolidation_lobe]
    sign = 1.0 if side == LEFT else -1.0
    cx = sign * (geom.mediastinum + 0.5 * (hw - geom.mediastinum))
    cy = geom.apex_y + height * (geom.base_y[side] - geom.apex_y)
    radius = 0.14 + 0.18 * state.consolidation
    blob = _soft_step(1.0 - _norm((x - cx) / (1.1 * radius), (y - cy) / radius), 0.5)
    patches = _soft_step(_smooth_noise(rng, size, 3.0 * size / 128) + 0.6, 2.0)
    density += 0.46 * math.sqrt(state.consolidation) * blob * patches * lungs[side]

  if state.atelectasis > 0:  # plate-like linear band in the lower zone (volume loss is in the geometry above)
    side = state.atelectasis_side
    cx = atel_sign * (geom.mediastinum + 0.5 * (hw - geom.mediastinum))
    cy = geom.base_y[side] - 0.32
    slope = float(rng.normal(0.0, 0.15))
    dist = np.abs((y - cy) - slope * (x - cx)) / np.hypot(1.0, slope)
    band = _soft_step(0.025 + 0.02 * state.atelectasis - dist, edge) * _soft_step(0.26 - np.abs(x - cx), 2 * edge)
    density += 0.4 * math.sqrt(state.atelectasis) * band * lungs[side]

  # Exposure: contrast, brightness and gamma vary per study; then detector blur and quantum noise.
  image = np.clip(density * rng.uniform(1.45, 1.75) + rng.normal(0.0, 0.03), 0.0, 1.0) ** rng.uniform(0.8, 1.25)
  image = ndimage.gaussian_filter(image, rng.uniform(0.4, 0.8) * size / 128, truncate=3.0)
  image = image + rng.uniform(0.01, 0.03) * rng.standard_normal(image.shape, dtype=np.float32)
  return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


# =====================================================================================================================
# 12-lead ECG
# =====================================================================================================================

_SQRT3 = np.sqrt(3.0)
# Electrode lead vectors, coordinates (x: patient's left, y: inferior, z: anterior). The limb electrodes sit on
# Einthoven's triangle (RA -150 deg, LA -30 deg, LL +90 deg in the frontal plane), scaled so that lead I = dipole x.
_LIMB = np.array([[-_SQRT3 / 2, -0.5, 0.0], [_SQRT3 / 2, -0.5, 0.0], [0.0, 1.0, 0.0]]) / _SQRT3
# Precordial electrodes: directions in the transverse plane from the left (0 deg) towards anterior (90 deg), with a
# proximity gain (the chest electrodes are close to the heart and read larger voltages).
_PRECORDIAL_DEG = np.array([120.0, 95.0, 75.0, 55.0, 30.0, 5.0])
_PRECORDIAL_GAIN = np.array([1.3, 1.9, 2.0, 1.9, 1.6, 1.25])
_PRECORDIAL = _PRECORDIAL_GAIN[:, None] * np.stack(
    [np.cos(np.deg2rad(_PRECORDIAL_DEG)), np.full(6, 0.1), np.sin(np.deg2rad(_PRECORDIAL_DEG))], axis=1)
_ELECTRODES = np.concatenate([_LIMB, _PRECORDIAL])  # [9, 3]: RA, LA, LL, V1..V6
# Directions of ST-segment injury currents per territory (they point towards the injured wall).
_ST_DIRECTIONS = {"anterior": (-0.25, 0.0, 1.0), "inferior": (0.0, 1.0, 0.15), "lateral": (1.0, -0.35, -0.1)}


def _unit(*v: float) -> np.ndarray:
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v)


def _frontal(deg: float, z: float) -> np.ndarray:
  """A unit vector at frontal angle `deg` (0 = patient's left, 90 = inferior) with anterior component z."""
  rad = np.deg2rad(deg)
  return _unit(np.cos(rad), np.sin(rad), z)


def _beat_templates(state: ClinicalState, rr: float, fs: float) -> tuple[np.ndarray, np.ndarray, int]:
  """Dipole templates of one beat. Returns (p_wave [3, Lp], qrst [3, Lq], p_offset), p_offset = samples from the
  P template's start to QRS onset; the QRS-T template starts at QRS onset."""
  # Each lobe: (amplitude mV, unit direction, centre s, width s). The QRS-T timeline is relative to QRS onset.
  axis = state.heart_axis_deg
  volt = state.qrs_voltage
  main_dir = _frontal(axis, -0.45 - 0.15 * max(0.0, state.lv_mass - 1.0))
  t_centre = 0.07 + 0.25 * np.sqrt(rr)
  lvh_strain = float(np.clip(state.lv_mass - 1.0, 0.0, 1.0))
  lobes = []
  if state.conduction == "lbbb":  # septum activated left-to-right: no septal q; broad, notched leftward R
    lbbb_dir = _frontal(axis - 15.0, -0.75)
    lobes += [(0.45 * volt, _unit(0.7, 0.2, -0.5), 0.025, 0.014), (1.1 * volt, lbbb_dir, 0.065, 0.018),
              (1.15 * volt, lbbb_dir, 0.115, 0.02)]
    t_dir, t_amp = -lbbb_dir, 0.35
    lobes.append((0.22 * volt, -lbbb_dir, 0.17 + 0.45 * (t_centre - 0.17), 0.06))  # discordant ST shift
  else:
    lobes += [(0.22, _unit(-0.5, 0.1, 0.85), 0.012, 0.006), (1.35 * volt, main_dir, 0.042, 0.011),
              (0.32 * volt, _unit(-0.35, -0.6, -0.5), 0.068, 0.01)]
    t_dir = _unit(*(main_dir + np.array([0.0, 0.0, 0.55])))
    t_amp = 0.3 + 0.05 * volt
    if state.conduction == "rbbb":  # late, slow right-ventricular activation: R' in V1, broad S in I and V6
      late = _unit(-0.7, 0.05, 0.75)
      lobes.append((0.75, late, 0.105, 0.018))
      t_dir = _unit(*(t_dir - 0.8 * late))
    if lvh_strain > 0:  # strain: ST depression and T inversion opposite the dominant LV forces
      t_dir = _unit(*((1.0 - 1.6 * lvh_strain) * t_dir - 0.5 * lvh_strain * main_dir))
      lobes.append((0.12 * lvh_strain * volt, -main_dir, 0.5 * (0.1 + t_centre), 0.06))
  lobes.append((t_amp, t_dir, t_centre, 0.045 + 0.02 * np.sqrt(rr)))

  qrst_len = int(round((t_centre + 0.25) * fs))
  t = np.arange(qrst_len) / fs
  amp = np.array([a for a, _, _, _ in lobes])
  dirs = np.stack([d for _, d, _, _ in lobes], axis=1)  # [3, K]
  centres = np.array([c for _, _, c, _ in lobes])
  widths = np.array([w for _, _, _, w in lobes])
  shapes = amp[:, None] * np.exp(-0.5 * ((t[None, :] - centres[:, None]) / widths[:, None]) ** 2)  # [K, Lq]
  qrst = dirs @ shapes
  if state.st_elevation > 0:  # injury current: a plateau from the J point into the (hyperacute) T wave
    st_dir = _unit(*_ST_DIRECTIONS[ST_TERRITORIES[state.st_territory]])
    j_point = state.qrs_duration
    plateau = special.expit((t - j_point) / 0.006) * special.expit((t_centre + 0.06 - t) / 0.03)
    qrst += state.st_elevation * st_dir[:, None] * plateau[None, :]

  if state.rhythm == "af":
    return np.zeros((3, 0)), qrst, 0
  p_len = int(round(0.13 * fs))
  tp = np.arange(p_len) / fs
  p_wave = (0.14 * _frontal(55.0, 0.25)[:, None] * np.exp(-0.5 * ((tp - 0.045) / 0.018) ** 2)
            + 0.06 * _unit(0.45, 0.25, -0.85)[:, None] * np.exp(-0.5 * ((tp - 0.075) / 0.015) ** 2))
  # P starts so that its onset lies PR before QRS onset (P onset ~ 2 widths before its first lobe's peak).
  p_offset = int(round((state.pr_interval + 0.01) * fs))
  return p_wave, qrst, p_offset


def _beat_onsets(state: ClinicalState, rng: np.random.Generator, seconds: float) -> np.ndarray:
  """QRS onset times in seconds covering [0, seconds] (the first may start before 0)."""
  mean_rr = 60.0 / state.heart_rate
  count = int(np.ceil(seconds / mean_rr * 2.0)) + 4
  if state.rhythm == "af":  # irregularly irregular ventricular response
    sigma = 0.2
    rr = mean_rr * rng.lognormal(-0.5 * sigma ** 2, sigma, count)
    rr = np.maximum(rr, 0.28)
  else:  # sinus with mild respiratory sinus arrhythmia
    phase = rng.uniform(0.0, 2.0 * np.pi)
    resp = 2.0 * np.pi * rng.uniform(0.2, 0.3) * mean_rr
    rr = mean_rr * (1.0 + 0.025 * np.sin(phase + resp * np.arange(count)) + rng.normal(0.0, 0.004, count))
  onsets = -rng.uniform(0.0, mean_rr) + np.concatenate([[0.0], np.cumsum(rr)])
  return onsets[onsets < seconds + 0.05]


def _sinusoids(rng: np.random.Generator, t: np.ndarray, freqs: np.ndarray) -> np.ndarray:
  """sin(2 pi f t + random phase) for each frequency: [len(freqs), len(t)]."""
  return np.sin(2.0 * np.pi * freqs[:, None] * t[None, :] + rng.uniform(0.0, 2.0 * np.pi, (len(freqs), 1)))


def synthesize_ecg(state: ClinicalState, rng: np.random.Generator, fs: float = 500.0,
                   seconds: float = 10.0) -> np.ndarray:
  """Synthesises a 12-lead ECG of `state`. Returns float32 [num_samples, 12] in mV, leads in LEADS_12 order."""
  n = int(round(fs * seconds))
  mean_rr = 60.0 / state.heart_rate
  p_wave, qrst, p_offset = _beat_templates(state, mean_rr, fs)
  pad = max(p_offset, 1)
  dipole = np.zeros((3, pad + n + int(0.1 * fs) + qrst.shape[1]))
  onsets = _beat_onsets(state, rng, seconds)
  resp_phase = rng.uniform(0.0, 2.0 * np.pi)
  scales = 1.0 + 0.05 * np.sin(resp_phase + 2.0 * np.pi * 0.25 * onsets)  # respiratory amplitude modulation
  for onset, scale in zip(np.rint(onsets * fs).astype(int) + pad, scales):
    if onset >= 0:
      dipole[:, onset:onset + qrst.shape[1]] += scale * qrst
    p_start = onset - p_offset
    if p_wave.shape[1] and p_start >= 0:
      dipole[:, p_start:p_start + p_wave.shape[1]] += p_wave
  dipole = dipole[:, pad:pad + n]
  t = np.arange(n) / fs
  if state.rhythm == "af":  # fibrillatory waves, 4-8 Hz, largest in V1 and the inferior leads
    f_wave = _sinusoids(rng, t, rng.uniform(4.5, 7.5, 3)).T @ rng.uniform(0.015, 0.04, 3)
    dipole += _unit(-0.3, 0.5, 0.8)[:, None] * f_wave[None, :]

  # Electrode potentials plus baseline wander (each electrode a random mix of three slow drifts, e.g. breathing and
  # electrode-skin changes) and white noise; the leads are differences of electrode potentials.
  wander = rng.uniform(-0.06, 0.06, (9, 3)) @ _sinusoids(rng, t, rng.uniform(0.05, 0.4, 3))
  noise = rng.uniform(0.004, 0.015) * rng.standard_normal((9, n), dtype=np.float32)
  pot = (_ELECTRODES @ dipole + wander).astype(np.float32) + noise  # [9, n]
  ra, la, ll, chest = pot[0], pot[1], pot[2], pot[3:]
  wilson = (ra + la + ll) / 3.0
  leads = np.stack([la - ra, ll - ra, ll - la, ra - (la + ll) / 2, la - (ra + ll) / 2, ll - (ra + la) / 2,
                    *(chest - wilson)], axis=1)
  return leads


def quantize_ecg(leads_mv: np.ndarray, gain: float) -> np.ndarray:
  """mV -> int16 ADC units (`gain` units per mV). Raises instead of clipping a value out of range."""
  adc = np.rint(leads_mv * gain)
  peak = np.abs(adc).max()
  if peak > np.iinfo(np.int16).max:
    raise ValueError(f"ECG of {peak / gain:.1f} mV does not fit int16 at gain {gain}")
  return adc.astype(np.int16)
