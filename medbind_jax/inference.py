"""Loads a trained MEDBind run and embeds CXR images, ECG records and texts into its shared space.

  from medbind_jax import inference
  embedder = inference.Embedder.load("workdirs/medbind")           # latest checkpoint; step=N for another
  cxr_emb = embedder.embed_cxr(["a.png", "b.jpg"])                 # float32 [2, d] unit vectors
  ecg_emb = embedder.embed_ecg(["ptbxl/HR06000"])                  # WFDB records: paths without extension
  ecg_emb = embedder.embed_ecg([signal_mv], sampling_rate=500.0, leads=lead_names)  # arrays [T, leads], mV
  text_emb = embedder.embed_text(["Sinus rhythm. Normal ECG."])
  similarity = cxr_emb @ text_emb.T                                 # cosine similarities

`embedder.embed(modality, inputs)` works for every modality the run has, including ones registered by the user
(`medbind_jax.data.codecs`); each codec's `input_loader` says what inputs it reads.

Inputs take the training code's evaluation path: the run's codec preprocessing (no augmentation) and
`runs.make_embed_fns`, in fixed-size batches padded at the end, so each modality compiles once. ECGs are
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
from typing import Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from medbind_jax import runs
from medbind_jax.data import codecs
from medbind_jax.data.preprocess import InputError
from medbind_jax.model import MedBind

log = logging.getLogger(__name__)

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
# The embedder
# ------------------------------------------------------------------------------------------------------------------


def _shape_checked(load: codecs.InputLoader, shape: tuple[int, ...]) -> codecs.InputLoader:
  """`load`, raising InputError for a prepared input whose shape is not the model's (e.g. a wrong-length vector
  that a codec's preprocessing passed through)."""

  def checked(item, name: str, i: int):
    x = load(item, name, i)
    if np.shape(x) != tuple(shape):
      raise InputError(f"{name}: prepared input has shape {np.shape(x)}; the model takes {tuple(shape)}")
    return x

  return checked


class Embedder:
  """Embeds batches of inputs of any of a trained MedBind model's modalities, and texts.

  Attributes:
    config: the run's config; model: the MedBind module; params: its trainable parameters (checkpoint);
    step: the checkpoint's step (None when built from parameters in memory); batch_size: examples per compiled
    batch; embed_dim: d; fns: the `runs.make_embed_fns` functions used; specs: modality -> preprocessing spec.
  """

  def __init__(self, config: ml_collections.ConfigDict, model: MedBind, params, *, text_params=None,
               batch_size: int | None = None, step: int | None = None, num_threads: int = 4):
    """`params` as in the checkpoint; `text_params` the frozen text trunk when the text trunk is 'cached'."""
    self.config, self.model, self.step = config, model, step
    self.batch_size = int(batch_size or config.eval.batch_size)
    self.embed_dim = int(config.model.embed_dim)
    self.num_threads = num_threads
    self.specs = runs.data_specs(config)
    text_mode = runs.text_mode(config)
    if text_mode == "cached" and text_params is None:
      raise ValueError("the text trunk is 'cached': pass the frozen trunk as text_params")
    self.tokenize = runs.make_tokenize(config)
    device = jax.local_devices()[0]
    self.params = jax.device_put(params, device)
    text_params = None if text_params is None else jax.device_put(text_params, device)
    self.fns = runs.make_embed_fns(model, text_mode, text_params, self.tokenize, self.batch_size)

  @classmethod
  def load(cls, workdir: str, step: int | None = None, *, batch_size: int | None = None,
           num_threads: int = 4) -> Embedder:
    """The model of the training run in `workdir` (local or a URI, e.g. gs://...) at checkpoint `step` (default:
    the latest). Runs written before modalities were keyed load too (their parameters are migrated)."""
    config, model, params, text_params, step = runs.load_trained(workdir, step)
    log.info("loaded step %d of %s", step, workdir)
    return cls(config, model, params, text_params=text_params, batch_size=batch_size, step=step,
               num_threads=num_threads)

  @property
  def modalities(self) -> list[str]:
    """What this run embeds: its input modalities and 'text'."""
    return sorted(self.specs) + [codecs.TEXT]

  # ---- Public API ------------------------------------------------------------------------------------------------

  def embed_cxr(self, images: Sequence, *, progress: bool = False) -> np.ndarray:
    """Images -> float32 [N, d]. Each image: a PNG/JPEG path (local or a URI, read through `medbind_jax.paths`),
    encoded bytes, a PIL image, or an array [H, W] or [H, W, C] (uint8, or float in [0, 1]). Raises BadInputs
    naming every bad image."""
    return self._all_or_raise("cxr", images, progress=progress)

  def embed_ecg(self, records: Sequence, sampling_rate: float | Sequence[float] | None = None,
                leads: Sequence[str] | None = None, *, progress: bool = False) -> np.ndarray:
    """ECGs -> float32 [N, d]. Each record: a local WFDB record path (without extension; wfdb reads local files;
    its header gives the rate and lead names, `sampling_rate` and `leads` do not apply) or an array
    [T, num_leads] in millivolts.

    Arrays need `sampling_rate` (Hz; one for all, or one per record). `leads` names the array's columns (one
    list for all arrays); without it an array must have the 12 leads in the order of `schema.LEADS_12`.
    Raises BadInputs naming every bad record.
    """
    return self._all_or_raise("ecg", records, progress=progress, sampling_rate=sampling_rate, leads=leads)

  def embed_text(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
    """Texts -> float32 [N, d]. Raises BadInputs naming every empty or non-string text."""
    return self._all_or_raise("text", texts, progress=progress)

  def embed(self, modality: str, inputs: Sequence, *, names: Sequence[str] | None = None, skip_bad: bool = False,
            progress: bool = False, **options) -> Embedded:
    """Embeds `inputs` of one modality; bad inputs are collected, none is dropped silently.

    Args:
      modality: one of `self.modalities`; inputs: what its codec's `input_loader` reads (e.g. as `embed_cxr` /
        `embed_ecg` / `embed_text` take them).
      names: what error messages call each input (default: its path, else `modality[position]`).
      skip_bad: False: raise BadInputs naming every bad input (after checking all of them); True: return the
        good ones with the errors of the others.
      progress: show a progress bar over the inputs.
      **options: the modality's own options (ECG arrays: `sampling_rate`, `leads`, as in `embed_ecg`).
    """
    if modality not in self.modalities:
      raise ValueError(f"modality must be one of {self.modalities} (this run's), got {modality!r}")
    if isinstance(inputs, (str, bytes, os.PathLike)):
      raise TypeError(f"pass a list of {modality} inputs, not a single {type(inputs).__name__}")
    inputs = list(inputs)
    if names is None:
      names = [os.fspath(x) if codecs.is_path(x) and modality != codecs.TEXT else f"{modality}[{i}]"
               for i, x in enumerate(inputs)]
    elif len(names) != len(inputs):
      raise ValueError(f"{len(names)} names for {len(inputs)} inputs")
    if modality == codecs.TEXT:
      if options:
        raise TypeError(f"texts take no options, got {sorted(options)}")
      load = self._load_text
    else:
      codec = codecs.get(modality)
      load = _shape_checked(codec.input_loader(self.specs[modality], len(inputs), **options),
                            codec.example_input(self.specs[modality]).shape)

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
    if modality == codecs.TEXT:
      return self.fns.text(self.params, items + [""] * pad)
    x = np.stack(items)
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    return self.fns.inputs[modality](self.params, x)

  @staticmethod
  def _load_text(text, name: str, i: int) -> str:
    del i
    if not isinstance(text, str):
      raise InputError(f"{name}: expected a string, got {type(text).__name__}")
    if not text.strip():
      raise InputError(f"{name}: empty text")
    return text
