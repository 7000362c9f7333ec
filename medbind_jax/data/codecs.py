"""Modality codecs: everything the data side knows about one modality, registered by name.

A codec turns a modality's payload into record features and back (`encode` / `decode`), builds its
preprocessing spec from `config.data.<name>` (`make_spec`), turns a payload into one model input with optional
augmentation (`preprocess`), gives an input of the right shape for initialisation (`example_input`), and reads
what users hand the inference API and CLI (`input_loader`, `find_inputs`). The record's report text, label
vector, study id and time are common to every modality (`schema.Part`), and a dataset's label names are its
`dataset_info.json` `{name}_label_names`.

The pipeline, the trainer, the evaluators and the inference API iterate over codecs; nothing else in the
package branches on a modality's name. Adding a modality is `register(MyCodec())` plus a tower config and
edges (README, "Adding a modality").
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from medbind_jax import paths
from medbind_jax.data import preprocess, schema
from medbind_jax.data.preprocess import InputError

TEXT = "text"  # the anchor modality: embedded from each record's report fields, not from a codec payload
_CODECS: dict[str, Codec] = {}

InputLoader = Callable[[Any, str, int], np.ndarray]  # (user input, its name in messages, position) -> model input


class Codec:
  """Base class of a modality codec; subclasses set `name` and override what their modality needs."""

  name: str = ""
  inputs_help: str = ""  # what `find_inputs` looks for, for messages ("images (*.png, *.jpg, *.jpeg)")

  def encode(self, data: Any, name: str) -> dict[str, Any]:
    """Payload -> {feature key without the 'name/' prefix: tf Feature}; raises ValueError naming `name`."""
    raise NotImplementedError

  def decode(self, feats: Mapping[str, Any], prefix: str) -> Any | None:
    """Record features -> payload, or None when the record does not have this modality."""
    raise NotImplementedError

  def make_spec(self, config: Mapping[str, Any] | None) -> Any:
    """Preprocessing settings from `config.data.<name>` (None: defaults)."""
    return None

  def preprocess(self, data: Any, spec: Any, rng: np.random.Generator | None, name: str) -> np.ndarray:
    """Payload -> one float32 model input; with `rng`, training augmentation (deterministic given rng)."""
    raise NotImplementedError

  def example_input(self, spec: Any) -> np.ndarray:
    """A zero model input of one example (shapes for init and padding)."""
    raise NotImplementedError

  def input_loader(self, spec: Any, count: int, **options) -> InputLoader:
    """For the inference API: a function reading one user input (path, bytes, array...) into a model input,
    raising InputError naming it. `options` are the call's modality-specific keywords."""
    if options:
      raise TypeError(f"{self.name} inputs take no options, got {sorted(options)}")
    return lambda item, name, i: self.preprocess(item, spec, None, name)

  def find_inputs(self, folder: str) -> list[str]:
    """Input paths under `folder` for the embed CLI's index command, sorted."""
    raise NotImplementedError(f"the {self.name} codec cannot find inputs in folders")

  def input_id(self, path: str, folder: str) -> str:
    """A found input's id in an index: its path relative to `folder`."""
    return os.path.relpath(path, folder)


def register(codec: Codec) -> Codec:
  """Makes `codec` the codec of modality `codec.name` (re-registering the same class replaces it)."""
  if not codec.name or codec.name == TEXT or "/" in codec.name:
    raise ValueError(f"a codec needs a name other than {TEXT!r} and without '/', got {codec.name!r}")
  old = _CODECS.get(codec.name)
  if old is not None and type(old) is not type(codec):
    raise ValueError(f"modality {codec.name!r} already has codec {type(old).__name__}")
  _CODECS[codec.name] = codec
  return codec


def get(name: str) -> Codec:
  if name not in _CODECS:
    raise ValueError(f"no codec for modality {name!r}; registered: {names()} (and {TEXT!r}, the reports)")
  return _CODECS[name]


def names() -> list[str]:
  """Registered modality names, sorted."""
  return sorted(_CODECS)


def read_file_bytes(path, name: str) -> bytes:
  """A user input file's bytes (a local path or a URI, through `medbind_jax.paths`)."""
  try:
    return paths.read_bytes(path)
  except FileNotFoundError as err:
    raise InputError(f"{name}: no such file") from err
  except OSError as err:
    raise InputError(f"{name}: cannot read file ({err})") from err


def is_path(x) -> bool:
  return isinstance(x, (str, os.PathLike))


# ----------------------------------------------------------------------------------------------------------------
# CXR
# ----------------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class CxrCodec(Codec):
  """Chest X-rays: payload = encoded PNG/JPEG bytes (feature `cxr/image`)."""

  name = "cxr"
  inputs_help = "images (*.png, *.jpg, *.jpeg)"

  def encode(self, data: bytes, name: str) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray)) or not data:
      raise ValueError(f"{name}: a CXR payload is non-empty encoded image bytes")
    return {"image": schema.bytes_feature(bytes(data))}

  def decode(self, feats, prefix: str) -> bytes | None:
    values = feats[prefix + "image"].bytes_list.value if prefix + "image" in feats else ()
    return values[0] if values and values[0] else None

  def make_spec(self, config) -> preprocess.CxrSpec:
    if not config:
      return preprocess.CxrSpec()
    return preprocess.CxrSpec(image_size=config["image_size"], channels=config["channels"], mean=config["mean"],
                              std=config["std"], crop_scale=tuple(config["crop_scale"]), jitter=config["jitter"])

  def preprocess(self, data, spec, rng, name):
    return preprocess.preprocess_cxr(data, spec, rng, name=name)

  def example_input(self, spec) -> np.ndarray:
    return np.zeros((spec.image_size, spec.image_size, spec.channels), np.float32)

  def input_loader(self, spec, count: int, **options) -> InputLoader:
    super().input_loader(spec, count, **options)  # no options
    return lambda image, name, i: self.preprocess(_checked_image(image, name), spec, None, name)

  def find_inputs(self, folder: str) -> list[str]:
    return sorted(p for p in paths.list_files(folder) if os.path.basename(p).lower().endswith(IMAGE_SUFFIXES))

  def input_id(self, path: str, folder: str) -> str:
    return os.path.splitext(os.path.relpath(path, folder))[0]


def _checked_image(image, name: str):
  """A user's CXR input as bytes, a PIL image or an array, with every problem named."""
  if is_path(image):
    return read_file_bytes(image, name)
  if isinstance(image, (bytes, bytearray, memoryview)):
    if not bytes(image):
      raise InputError(f"{name}: empty image bytes")
    return bytes(image)
  if isinstance(image, np.ndarray):
    if image.size == 0:
      raise InputError(f"{name}: empty image array of shape {image.shape}")
    if not np.issubdtype(image.dtype, np.number) and image.dtype != bool:
      raise InputError(f"{name}: image array of dtype {image.dtype}; expected numbers")
    if image.dtype != np.uint8 and not np.all(np.isfinite(image)):
      raise InputError(f"{name}: image array contains non-finite values")
    return image
  if isinstance(image, Image.Image):
    return image
  raise InputError(f"{name}: expected a path, encoded bytes, a PIL image or an array, got {type(image).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# ECG
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EcgData:
  """A stored ECG: int16 `samples` [num_samples, num_leads], `gain` per lead (ADC units per mV: value_mV =
  sample / gain), lead names and sampling rate in Hz."""

  samples: np.ndarray
  gain: Sequence[float]
  leads: Sequence[str] = schema.LEADS_12
  sampling_rate: float = 0.0

  def signal_mv(self, name: str = "ecg") -> np.ndarray:
    """The samples in millivolts, float32 [num_samples, num_leads]."""
    gain = np.asarray(self.gain, np.float32)
    if np.any(gain == 0):
      raise InputError(f"{name}: ECG gain of zero")
    return self.samples.astype(np.float32) / gain


class EcgCodec(Codec):
  """12-lead ECGs: payload = `EcgData` (features `ecg/samples`, `gain`, `leads`, `sampling_rate`,
  `num_samples`). Inference reads WFDB records or arrays in mV."""

  name = "ecg"
  inputs_help = "WFDB records (one per *.hea)"

  def encode(self, data: EcgData, name: str) -> dict[str, Any]:
    samples = np.asarray(data.samples)
    if samples.dtype != np.int16 or samples.ndim != 2 or samples.size == 0:
      raise ValueError(f"{name}: ECG samples must be non-empty int16 [num_samples, num_leads], "
                       f"got {samples.dtype} {samples.shape}")
    if len(data.leads) != samples.shape[1] or len(data.gain) != samples.shape[1]:
      raise ValueError(f"{name}: {samples.shape[1]} ECG columns but {len(data.leads)} lead names and "
                       f"{len(data.gain)} gains")
    if not data.sampling_rate > 0:
      raise ValueError(f"{name}: the ECG sampling rate must be positive")
    return {"samples": schema.bytes_feature(samples.astype("<i2", copy=False).tobytes()),
            "gain": schema.floats_feature(data.gain), "leads": schema.bytes_feature(*data.leads),
            "sampling_rate": schema.floats_feature([data.sampling_rate]),
            "num_samples": schema.ints_feature([samples.shape[0]])}

  def decode(self, feats, prefix: str) -> EcgData | None:
    raw = feats[prefix + "samples"].bytes_list.value if prefix + "samples" in feats else ()
    if not raw or not raw[0]:
      return None
    leads = tuple(v.decode("utf-8") for v in feats[prefix + "leads"].bytes_list.value)
    return EcgData(samples=np.frombuffer(raw[0], dtype="<i2").reshape(-1, len(leads)),
                   gain=np.asarray(feats[prefix + "gain"].float_list.value, np.float32), leads=leads,
                   sampling_rate=feats[prefix + "sampling_rate"].float_list.value[0])

  def make_spec(self, config) -> preprocess.EcgSpec:
    if not config:
      return preprocess.EcgSpec()
    return preprocess.EcgSpec(sampling_rate=config["sampling_rate"], num_samples=config["num_samples"],
                              scale_mv=config["scale_mv"], amplitude_jitter=config["amplitude_jitter"],
                              noise_mv=config["noise_mv"])

  def preprocess(self, data: EcgData, spec, rng, name):
    return preprocess.preprocess_ecg(data.signal_mv(name), data.sampling_rate, spec, data.leads, rng, name=name)

  def example_input(self, spec) -> np.ndarray:
    return np.zeros((spec.num_samples, len(spec.leads)), np.float32)

  def input_loader(self, spec, count: int, *, sampling_rate=None, leads=None) -> InputLoader:
    """Each input: a WFDB record path (without extension; its header gives rate and leads) or an array
    [T, num_leads] in mV, which needs `sampling_rate` (one for all or one per input) and, unless its columns are
    the 12 leads in `schema.LEADS_12` order, `leads` (one list of names for all arrays)."""
    if sampling_rate is not None and not np.isscalar(sampling_rate) and len(sampling_rate) != count:
      raise ValueError(f"{len(sampling_rate)} sampling rates for {count} ECG records")
    if leads is not None and (isinstance(leads, str) or not all(isinstance(lead, str) for lead in leads)):
      raise ValueError(f"leads must be a list of lead names shared by all arrays, got {leads!r}")
    return lambda record, name, i: self._load(
        record, name, sampling_rate if sampling_rate is None or np.isscalar(sampling_rate) else sampling_rate[i],
        leads, spec)

  def _load(self, record, name: str, sampling_rate, leads, spec) -> np.ndarray:
    if is_path(record):
      signal_mv, sampling_rate, leads = read_wfdb_record(record)
    else:
      if sampling_rate is None:
        raise InputError(f"{name}: an ECG array needs its sampling rate (sampling_rate=..., in Hz)")
      signal_mv = np.asarray(record)
      if not np.issubdtype(signal_mv.dtype, np.number):
        raise InputError(f"{name}: ECG array of dtype {signal_mv.dtype}; expected numbers in millivolts")
    if signal_mv.ndim != 2:
      raise InputError(f"{name}: expected an ECG array [num_samples, num_leads], got shape {signal_mv.shape}")
    if signal_mv.shape[0] == 0:
      raise InputError(f"{name}: ECG has no samples")
    # Leads matched by name (`preprocess.canonical_leads`, the package's one rule: `leads.match_leads`), an
    # inverted lead ('-aVR') negated back; non-finite samples named by lead and count, as the converters do.
    return preprocess.preprocess_ecg(signal_mv, float(sampling_rate), spec, leads, name=name)

  def find_inputs(self, folder: str) -> list[str]:
    return sorted(p[:-len(".hea")] for p in paths.list_files(folder) if p.endswith(".hea"))


def read_wfdb_record(record_path) -> tuple[np.ndarray, float, list[str]]:
  """(signal in mV [T, leads], sampling rate in Hz, lead names as the header gives them: an inverted lead keeps its
  '-aVR', which `leads.match_leads` reads as -1 x aVR) of a WFDB record (path without extension; a trailing '.hea'
  is accepted). InputError naming the record when it is missing or damaged. Local files only: wfdb reads the
  header and signal files by local path."""
  from data_prep import ecg_io  # pylint: disable=import-outside-toplevel  (pulls in wfdb)
  record_path = os.fspath(record_path)
  if not paths.is_local(record_path):
    raise InputError(f"{record_path}: WFDB records are read from local files (wfdb); copy the record first")
  if record_path.endswith(".hea"):
    record_path = record_path[:-len(".hea")]
  try:
    ecg = ecg_io.read_wfdb(record_path)
  except ecg_io.RecordError as err:
    raise InputError(f"{record_path}: {err}") from err
  return ecg.signal_mv, ecg.sampling_rate, ecg.leads


register(CxrCodec())
register(EcgCodec())
