"""Loads a trained MEDBind run and embeds CXR images, ECG records and texts into its shared space.

  from medbind_jax import inference
  embedder = inference.Embedder.load("workdirs/medbind")           # latest checkpoint; step=N for another
  cxr_emb = embedder.embed_cxr(["a.png", "b.jpg"])                 # float32 [2, d] unit vectors
  ecg_emb = embedder.embed_ecg(["ptbxl/HR06000"])                  # WFDB records: paths without extension
  ecg_emb = embedder.embed_ecg([signal_mv], sampling_rate=500.0, leads=lead_names)  # arrays [T, leads], mV
  text_emb = embedder.embed_text(["Sinus rhythm. Normal ECG."])
  similarity = cxr_emb @ text_emb.T                                 # cosine similarities

Inputs take the training code's evaluation path: the run's `train.data_specs` preprocessing (no augmentation)
and `train.make_embed_fns`, in fixed-size batches padded at the end, so each modality compiles once. ECGs are
resampled to the run's sampling rate, cropped from the start or zero-padded to its length, and their leads put
in the canonical order by name. Texts longer than the run's `text_max_length` tokens are truncated.

A bad input (missing or unreadable file, corrupt image, wrong or unknown leads, non-finite samples, empty
text) never fails silently: every input of a call is checked, then one `BadInputs` error names each bad one
(path, or modality[position]). `Embedder.embed(..., skip_bad=True)` returns the good ones and the errors instead.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from etils import epath
from PIL import Image

from medbind_jax import train
from medbind_jax.data import preprocess, schema
from medbind_jax.data.preprocess import InputError
from medbind_jax.model import MODALITIES, MedBind, build_model, init_params

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"


class BadInputs(InputError):
  """Every bad input of one call; `errors` holds one InputError per bad input, in input order."""

  def __init__(self, modality: str, errors: Sequence[InputError], total: int):
    self.modality, self.errors, self.total = modality, list(errors), total
    lines = "\n".join(f"  {err}" for err in self.errors)
    super().__init__(f"{len(self.errors)} of {total} {modality} inputs cannot be embedded:\n{lines}")


@dataclasses.dataclass
class Embedded:
  """What `Embedder.embed` returns: the embeddings of the good inputs and the errors of the bad ones."""

  embeddings: np.ndarray  # float32 [len(kept), d], unit vectors
  kept: np.ndarray  # int [len(kept)], positions of the embedded inputs in the call's input list
  errors: list[InputError]  # one per input left out, in input order


# ------------------------------------------------------------------------------------------------------------------
# Loading a run
# ------------------------------------------------------------------------------------------------------------------


def _path(workdir: str) -> epath.Path:
  """A local workdir made absolute (orbax needs that), or a cloud one (gs://...) as it is."""
  return epath.Path(workdir if "://" in os.fspath(workdir) else os.path.abspath(workdir))


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints in `workdir`, ascending."""
  directory = _path(workdir) / CHECKPOINT_DIR
  if not directory.exists():
    return []
  return sorted(ocp.CheckpointManager(directory, item_names=("state", "data")).all_steps())


def restore_params(workdir: str, step: int | None = None) -> tuple[dict[str, Any], int]:
  """(the trainable parameters of the checkpoint at `step`, default the latest; that step), on one device.

  Only `params` is read from the checkpoint's state item (not the optimiser state, not the data iterator), with
  the shapes and dtypes stored in the checkpoint.
  """
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {_path(workdir) / CHECKPOINT_DIR}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {workdir}; steps there: {steps}")
  path = _path(workdir) / CHECKPOINT_DIR / str(step) / STATE_ITEM
  handler = ocp.PyTreeCheckpointHandler()  # the state item alone, as StandardCheckpointHandler wrote it
  try:
    metadata = handler.metadata(path)
    if "params" not in metadata.tree:
      raise FileNotFoundError(f"{path} holds no `params` (not a checkpoint of train.py?)")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                                     metadata.tree["params"])}
    restored = handler.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  finally:
    handler.close()
  return restored["params"], step


def _check_params(params, expected, workdir: str) -> None:
  """Raises naming every parameter whose presence or shape differs between the checkpoint and the model."""
  have = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  problems = [f"missing {k}" for k in sorted(want.keys() - have.keys())]
  problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
  problems += [f"{k}: checkpoint {have[k]}, model {want[k]}" for k in sorted(want.keys() & have.keys())
               if tuple(have[k]) != tuple(want[k])]
  if problems:
    more = f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ValueError(f"the checkpoint in {workdir} does not fit the model its config.json describes:\n  "
                     + "\n  ".join(problems[:20]) + more)


def frozen_text_params(config: ml_collections.ConfigDict, model: MedBind, pretrained: dict) -> Any:
  """The frozen text trunk of a run with `model.text.trunk == 'cached'` (checkpoints leave it out).

  It is the pretrained tower (`model.text.init`), or, for a randomly initialised trunk, a fixed function of
  the run's seed, drawn again by `train.initial_params`.
  """
  if "text" in pretrained:
    return pretrained["text"]
  log.info("model.text.init is empty: rebuilding the frozen random text trunk from seed %d", config.seed)
  return train.initial_params(config, model, pretrained)["text_encoder"]


# ------------------------------------------------------------------------------------------------------------------
# Reading inputs
# ------------------------------------------------------------------------------------------------------------------


def _is_path(x) -> bool:
  return isinstance(x, (str, os.PathLike))


def read_wfdb_record(record_path: str) -> tuple[np.ndarray, float, list[str]]:
  """(signal in mV [T, leads], sampling rate in Hz, lead names) of a WFDB record (path without extension;
  a trailing '.hea' is accepted). InputError naming the record when it is missing or damaged."""
  from data_prep import common  # pylint: disable=import-outside-toplevel  (pulls in wfdb)
  record_path = os.fspath(record_path)
  if record_path.endswith(".hea"):
    record_path = record_path[:-len(".hea")]
  try:
    ecg = common.read_wfdb(record_path)
  except common.RecordError as err:
    raise InputError(f"{record_path}: {err}") from err
  return ecg.signal_mv, ecg.sampling_rate, ecg.leads


def canonical_lead_columns(leads: Sequence[str], num_columns: int, name: str) -> list[int]:
  """Column of each lead of `schema.LEADS_12` in a signal whose columns are named `leads` (matched by name,
  ignoring case, spaces, '-', '_' and a leading 'lead'; extra leads such as Frank's vx/vy/vz are ignored)."""
  from data_prep import common  # pylint: disable=import-outside-toplevel
  leads = [str(lead) for lead in leads]
  if len(leads) != num_columns:
    raise InputError(f"{name}: {num_columns} signal columns but {len(leads)} lead names")
  try:
    return common.canonical_lead_order(leads)
  except common.RecordError as err:
    known = {common.lead_key(lead) for lead in schema.LEADS_12}
    unknown = [lead for lead in leads if common.lead_key(lead) not in known]
    hint = f"; unrecognised lead names {unknown}" if unknown else ""
    raise InputError(f"{name}: {err}{hint} (expected the 12 leads {', '.join(schema.LEADS_12)})") from err


def _read_bytes(path, name: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError as err:
    raise InputError(f"{name}: no such file") from err
  except OSError as err:
    raise InputError(f"{name}: cannot read file ({err})") from err


# ------------------------------------------------------------------------------------------------------------------
# The embedder
# ------------------------------------------------------------------------------------------------------------------


class Embedder:
  """Embeds batches of CXR images, ECG records and texts with one trained MedBind model.

  Attributes:
    config: the run's config; model: the MedBind module; params: its trainable parameters (checkpoint);
    step: the checkpoint's step (None when built from parameters in memory); batch_size: examples per compiled
    batch; embed_dim: d; fns: the `train.make_embed_fns` functions used; cxr_spec, ecg_spec: preprocessing.
  """

  def __init__(self, config: ml_collections.ConfigDict, model: MedBind, params, *, text_params=None,
               batch_size: int | None = None, step: int | None = None, num_threads: int = 4):
    """`params` as in the checkpoint; `text_params` the frozen text trunk when `model.text.trunk == 'cached'`."""
    self.config, self.model, self.step = config, model, step
    self.batch_size = int(batch_size or config.eval.batch_size)
    self.embed_dim = int(config.model.embed_dim)
    self.num_threads = num_threads
    self.cxr_spec, self.ecg_spec = train.data_specs(config)
    text_mode = config.model.text.trunk
    if text_mode == "cached" and text_params is None:
      raise ValueError("model.text.trunk is 'cached': pass the frozen trunk as text_params")
    self.tokenize = train.make_tokenize(config)
    device = jax.local_devices()[0]
    self.params = jax.device_put(params, device)
    text_params = None if text_params is None else jax.device_put(text_params, device)
    self.fns = train.make_embed_fns(model, text_mode, text_params, self.tokenize, self.batch_size)

  @classmethod
  def load(cls, workdir: str, step: int | None = None, *, batch_size: int | None = None,
           num_threads: int = 4) -> Embedder:
    """The model of the training run in `workdir` at checkpoint `step` (default: the latest)."""
    config = train.load_run_config(workdir)
    model, pretrained = build_model(config.model)
    params, step = restore_params(workdir, step)
    expected = jax.eval_shape(lambda: init_params(model, jax.random.key(0), pretrained))
    text_params = None
    if config.model.text.trunk == "cached":
      expected.pop("text_encoder")
      text_params = frozen_text_params(config, model, pretrained)
    _check_params(params, expected, workdir)
    log.info("loaded step %d of %s", step, workdir)
    return cls(config, model, params, text_params=text_params, batch_size=batch_size, step=step,
               num_threads=num_threads)

  # ---- Public API ------------------------------------------------------------------------------------------------

  def embed_cxr(self, images: Sequence, *, progress: bool = False) -> np.ndarray:
    """Images -> float32 [N, d]. Each image: a PNG/JPEG path, encoded bytes, a PIL image, or an array [H, W] or
    [H, W, C] (uint8, or float in [0, 1]). Raises BadInputs naming every bad image."""
    return self._all_or_raise("cxr", images, progress=progress)

  def embed_ecg(self, records: Sequence, sampling_rate: float | Sequence[float] | None = None,
                leads: Sequence[str] | None = None, *, progress: bool = False) -> np.ndarray:
    """ECGs -> float32 [N, d]. Each record: a WFDB record path (without extension; its header gives the rate
    and lead names, `sampling_rate` and `leads` do not apply) or an array [T, num_leads] in millivolts.

    Arrays need `sampling_rate` (Hz; one for all, or one per record). `leads` names the array's columns (one
    list for all arrays); without it an array must have the 12 leads in the order of `schema.LEADS_12`.
    Raises BadInputs naming every bad record.
    """
    return self._all_or_raise("ecg", records, progress=progress, sampling_rate=sampling_rate, leads=leads)

  def embed_text(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
    """Texts -> float32 [N, d]. Raises BadInputs naming every empty or non-string text."""
    return self._all_or_raise("text", texts, progress=progress)

  def embed(self, modality: str, inputs: Sequence, *, names: Sequence[str] | None = None, skip_bad: bool = False,
            progress: bool = False, sampling_rate=None, leads=None) -> Embedded:
    """Embeds `inputs` of one modality; bad inputs are collected, none is dropped silently.

    Args:
      modality: 'cxr', 'ecg' or 'text'; inputs: as `embed_cxr` / `embed_ecg` / `embed_text` take them.
      names: what error messages call each input (default: its path, else `modality[position]`).
      skip_bad: False: raise BadInputs naming every bad input (after checking all of them); True: return the
        good ones with the errors of the others.
      progress: show a progress bar over the inputs.
      sampling_rate, leads: for ECG arrays, as in `embed_ecg`.
    """
    if modality not in MODALITIES:
      raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if isinstance(inputs, (str, bytes, os.PathLike)):
      raise TypeError(f"pass a list of {modality} inputs, not a single {type(inputs).__name__}")
    inputs = list(inputs)
    if names is None:
      names = [os.fspath(x) if _is_path(x) and modality != "text" else f"{modality}[{i}]"
               for i, x in enumerate(inputs)]
    elif len(names) != len(inputs):
      raise ValueError(f"{len(names)} names for {len(inputs)} inputs")
    load = self._loader(modality, len(inputs), sampling_rate, leads)

    def checked(i: int):
      try:
        return load(inputs[i], names[i], i)
      except InputError as err:
        return err
      except (ValueError, TypeError, OSError) as err:  # anything else an odd input makes the loaders raise
        return InputError(f"{names[i]}: {type(err).__name__}: {err}")

    n, batch = len(inputs), self.batch_size
    embeddings = np.zeros((n, self.embed_dim), np.float32)
    ok = np.zeros(n, bool)
    errors: list[InputError] = []
    rows: list[int] = []
    items: list = []
    pending = None  # (rows, device result) of the batch the device is working on
    bar = tqdm.tqdm(total=n, desc=f"embed {modality}", unit=modality, disable=not progress, dynamic_ncols=True)

    def collect():
      if pending is not None:
        done_rows, result = pending
        embeddings[done_rows] = np.asarray(result)[:len(done_rows)]
        ok[done_rows] = True

    # Inputs are read by a thread pool one batch-worth at a time; the device embeds batch k (async dispatch)
    # while the host prepares batch k + 1.
    with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
      for start in range(0, n, batch):
        chunk = range(start, min(n, start + batch))
        for i, item in zip(chunk, pool.map(checked, chunk)):
          if isinstance(item, InputError):
            errors.append(item)
          else:
            rows.append(i)
            items.append(item)
          if len(rows) == batch or (i == n - 1 and rows):
            dispatched = (rows, self._embed_batch(modality, items))
            collect()
            pending, rows, items = dispatched, [], []
        bar.update(len(chunk))
      collect()
    bar.close()
    kept = np.flatnonzero(ok)
    if errors and not skip_bad:
      raise BadInputs(modality, errors, n)
    return Embedded(embeddings=embeddings[kept], kept=kept, errors=errors)

  # ---- Internals -------------------------------------------------------------------------------------------------

  def _all_or_raise(self, modality: str, inputs, **kwargs) -> np.ndarray:
    return self.embed(modality, inputs, **kwargs).embeddings

  def _embed_batch(self, modality: str, items: list):
    """Pads `items` (prepared inputs) to the fixed batch size and starts the embedding; returns [batch, d]."""
    pad = self.batch_size - len(items)
    if modality == "text":
      return self.fns.text(self.params, items + [""] * pad)
    x = np.stack(items)
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    return (self.fns.cxr if modality == "cxr" else self.fns.ecg)(self.params, x)

  def _loader(self, modality: str, n: int, sampling_rate, leads) -> Callable[[Any, str, int], Any]:
    if modality == "cxr":
      return self._load_cxr
    if modality == "text":
      return self._load_text
    if sampling_rate is not None and not np.isscalar(sampling_rate):
      if len(sampling_rate) != n:
        raise ValueError(f"{len(sampling_rate)} sampling rates for {n} ECG records")
    if leads is not None and (isinstance(leads, str) or not all(isinstance(lead, str) for lead in leads)):
      raise ValueError(f"leads must be a list of lead names shared by all arrays, got {leads!r}")
    return lambda record, name, i: self._load_ecg(
        record, name, sampling_rate if sampling_rate is None or np.isscalar(sampling_rate) else sampling_rate[i],
        leads)

  def _load_cxr(self, image, name: str, i: int) -> np.ndarray:
    del i
    if _is_path(image):
      image = _read_bytes(image, name)
    elif isinstance(image, (bytes, bytearray, memoryview)):
      image = bytes(image)
      if not image:
        raise InputError(f"{name}: empty image bytes")
    elif isinstance(image, np.ndarray):
      if image.size == 0:
        raise InputError(f"{name}: empty image array of shape {image.shape}")
      if not np.issubdtype(image.dtype, np.number) and image.dtype != bool:
        raise InputError(f"{name}: image array of dtype {image.dtype}; expected numbers")
      if image.dtype != np.uint8 and not np.all(np.isfinite(image)):
        raise InputError(f"{name}: image array contains non-finite values")
    elif not isinstance(image, Image.Image):
      raise InputError(f"{name}: expected a path, encoded bytes, a PIL image or an array, "
                       f"got {type(image).__name__}")
    return preprocess.preprocess_cxr(image, self.cxr_spec, None, name=name)

  def _load_ecg(self, record, name: str, sampling_rate, leads) -> np.ndarray:
    if _is_path(record):
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
    if leads is not None:
      signal_mv = signal_mv[:, canonical_lead_columns(leads, signal_mv.shape[1], name)]
    return preprocess.preprocess_ecg(signal_mv, float(sampling_rate), self.ecg_spec, None, name=name)

  def _load_text(self, text, name: str, i: int) -> str:
    del i
    if not isinstance(text, str):
      raise InputError(f"{name}: expected a string, got {type(text).__name__}")
    if not text.strip():
      raise InputError(f"{name}: empty text")
    return text
