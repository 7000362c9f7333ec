"""The tokenizer and chat template of a GGUF file, as a Hugging Face fast tokenizer.

A GGUF carries no `tokenizer.json`: llama.cpp stores the vocabulary, merges, token types, special token ids and
the chat template as `tokenizer.*` metadata. transformers already knows how to turn those into a `tokenizers`
backend (byte-level BPE for `tokenizer.ggml.model = gpt2` as in SmolLM2 and Llama 3, sentencepiece-style for
`llama`, with the control tokens kept whole); this module feeds it the metadata our loader has already read (so
the file is parsed once) and wraps the backend with the special tokens and the chat template:

  tok = tokenizer_from_gguf(smollm2_gguf_path())
  ids = tok.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True)

No torch and no network: only `gguf` (to read the file) and transformers' tokenizer classes.
"""

from __future__ import annotations

from typing import Any, Mapping

_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}


def tokenizer_from_metadata(metadata: Mapping[str, Any]):
  """A `transformers.PreTrainedTokenizerFast` from a GGUF's metadata ({key: value}, `loading.gguf_metadata`)."""
  from transformers import PreTrainedTokenizerFast  # noqa: PLC0415  (heavy; only when a tokenizer is built)
  from transformers.integrations.gguf.gguf_tokenizer_mapping import (  # noqa: PLC0415
      GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)

  if "tokenizer.ggml.tokens" not in metadata:
    raise ValueError("the GGUF file has no tokenizer (no tokenizer.ggml.tokens metadata)")
  grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                     if f"tokenizer.{key}" in metadata}
             for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  tokenizer_dict, init_kwargs = grouped["tokenizer"], grouped["tokenizer_config"]
  if tokenizer_dict.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies by default
    init_kwargs.setdefault("add_bos_token", True)
  tokens = tokenizer_dict["tokens"]
  for name, key in _SPECIAL_TOKENS.items():
    token_id = metadata.get(f"tokenizer.ggml.{key}")
    if token_id is not None:
      init_kwargs[name] = tokens[int(token_id)]
  backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
  return PreTrainedTokenizerFast(tokenizer_object=backend, **init_kwargs, **extra)


def tokenizer_from_gguf(path: str):
  """The tokenizer of the GGUF file at `path` (reads the file's metadata; `loading.load_gguf` returns the same
  tokenizer without reading it twice)."""
  import gguf  # noqa: PLC0415

  from medbind_jax.llm.loading import gguf_metadata  # noqa: PLC0415
  return tokenizer_from_metadata(gguf_metadata(gguf.GGUFReader(path)))
