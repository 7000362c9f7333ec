r"""Command line for a trained run: embed folders into an index, then query it across modalities.

  python -m medbind_jax.embed index --workdir RUN --cxr images/ --ecg records/ --text reports.csv \
      --text-column findings --out index.npz
  python -m medbind_jax.embed query --index index.npz --workdir RUN --text "enlarged cardiac silhouette" --k 5
  python -m medbind_jax.embed query --index index.npz --workdir RUN --ecg records/HR06000 --target cxr

index: CXR images are the *.png / *.jpg / *.jpeg files under --cxr (recursively), ECGs the WFDB records under
--ecg (one per *.hea), texts one per non-blank line of each --text file, or one per row of a .csv/.tsv file's
--text-column. The index (.npz, or .safetensors with the string fields in its metadata) holds each entry's
id, modality, source (path, or file:line / file:row) and text, the embeddings, and the run and step.

query: embeds one query (a text, an image or an ECG record) with the same run and prints the top K entries of
each target modality (default: every modality in the index) by cosine similarity; --json for a machine form.

A bad input stops `index` with exit status 1 and a message naming every bad file, line or row; --skip-bad logs
them, leaves them out and prints how many. Exit status 2 is a usage error.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import struct
import sys
from typing import Sequence

import numpy as np

from medbind_jax import paths
from medbind_jax.data import codecs
from medbind_jax.data.preprocess import InputError

log = logging.getLogger(__name__)

INDEX_FIELDS = ("ids", "modality", "sources", "texts")  # string arrays, one entry per embedding


def index_modalities() -> list[str]:
  """Every modality an index can hold: the registered codecs' and text."""
  return codecs.names() + [codecs.TEXT]


# ------------------------------------------------------------------------------------------------------------------
# The index file
# ------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Index:
  """Embedded entries of any modality: row i of `embeddings` is entry i."""

  embeddings: np.ndarray  # float32 [N, d], unit vectors
  ids: np.ndarray  # [N] str: path relative to the folder without extension, or file:line / file:row
  modality: np.ndarray  # [N] str: 'cxr', 'ecg' or 'text'
  sources: np.ndarray  # [N] str: the file (image, record path, text file:line)
  texts: np.ndarray  # [N] str: the text of text entries, '' for the others
  info: dict  # workdir, step, embed_dim of the run that embedded them

  def __len__(self) -> int:
    return len(self.ids)


def save_index(path: str, index: Index) -> None:
  """Writes `index` as .npz (string arrays, no pickle) or .safetensors (strings as JSON metadata), to a local path
  or a URI (`paths.write_bytes_atomic`: the file is built in memory and written whole)."""
  strings = {field: np.asarray(getattr(index, field), str) for field in INDEX_FIELDS}
  embeddings = np.ascontiguousarray(index.embeddings, np.float32)
  if path.endswith(".safetensors"):
    from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
    metadata = {field: json.dumps(values.tolist()) for field, values in strings.items()}
    data = save({"embeddings": embeddings}, metadata={**metadata, "info": json.dumps(index.info)})
  else:
    buffer = io.BytesIO()
    np.savez(buffer, embeddings=embeddings, info=np.asarray(json.dumps(index.info)), **strings)
    data = buffer.getvalue()
  paths.write_bytes_atomic(path, data)


def _safetensors_metadata(data: bytes) -> dict:
  """The `__metadata__` of a safetensors file's bytes (8-byte little-endian header length, then a JSON header)."""
  (length,) = struct.unpack("<Q", data[:8])
  return json.loads(data[8:8 + length]).get("__metadata__", {})


def load_index(path: str) -> Index:
  if not paths.is_file(path):
    raise FileNotFoundError(f"index {path} does not exist")
  data = paths.read_bytes(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load  # pylint: disable=import-outside-toplevel
    metadata = _safetensors_metadata(data)
    embeddings = load(data)["embeddings"]
    strings = {field: np.asarray(json.loads(metadata[field]), str) for field in INDEX_FIELDS}
    info = json.loads(metadata["info"])
  else:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
      embeddings = f["embeddings"]
      strings = {field: f[field] for field in INDEX_FIELDS}
      info = json.loads(str(f["info"]))
  return Index(embeddings=embeddings, info=info, **strings)


# ------------------------------------------------------------------------------------------------------------------
# Finding inputs
# ------------------------------------------------------------------------------------------------------------------


def read_texts(path: str, column: str | None) -> tuple[list[str], list[str]]:
  """(texts, where each comes from): one per row of a .csv/.tsv file's `column` (every row, empty cells
  included, so they are reported), else one per non-blank line."""
  content = paths.read_bytes(path).decode("utf-8")  # newlines as stored: csv reads quoted ones itself
  if path.lower().endswith((".csv", ".tsv")):
    with io.StringIO(content, newline="") as f:
      reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
      columns = reader.fieldnames or []
      if column is None:
        column = next((c for c in ("text", "report") if c in columns), None)
      if column not in columns:
        raise InputError(f"{path}: choose the text column with --text-column; columns: {', '.join(columns)}")
      rows = list(reader)
    # Row numbers count the header as row 1, as a spreadsheet shows them.
    return [row[column] or "" for row in rows], [f"{path}:row {i + 2}" for i in range(len(rows))]
  lines = [(i + 1, line.rstrip("\n")) for i, line in enumerate(io.StringIO(content, newline=None))]
  kept = [(number, line) for number, line in lines if line.strip()]
  return [line for _, line in kept], [f"{path}:{number}" for number, _ in kept]


# ------------------------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------------------------


def _embed_or_report(embedder, modality: str, inputs: list, names: list[str], args) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings, kept positions); with --skip-bad logs each bad input, else raises naming all of them."""
  result = embedder.embed(modality, inputs, names=names, skip_bad=args.skip_bad, progress=args.progress)
  for err in result.errors:
    log.warning("skipped: %s", err)
  if result.errors:
    print(f"skipped {len(result.errors)} bad {modality} input(s) of {len(inputs)}", file=sys.stderr)
  return result.embeddings, result.kept


def run_index(args) -> int:
  from medbind_jax import inference  # pylint: disable=import-outside-toplevel  (imports jax)
  folders = {m: getattr(args, m) for m in codecs.names() if getattr(args, m, None) is not None}
  if not (folders or args.text):
    raise InputError("nothing to index: give " + ", ".join(f"--{m} DIR" for m in codecs.names())
                     + " and/or --text FILE")
  jobs = []  # (modality, inputs, ids, sources, texts)
  for modality, folder in folders.items():
    codec = codecs.get(modality)
    if not paths.as_path(folder).is_dir():
      raise InputError(f"--{modality} {folder}: not a directory")
    found = codec.find_inputs(folder)
    if not found:
      raise InputError(f"--{modality} {folder}: no {codec.inputs_help} found")
    jobs.append((modality, found, [codec.input_id(p, folder) for p in found], found, [""] * len(found)))
  if args.text:  # the texts of all files form one job, so a bad-input report covers all of them
    texts, where = [], []
    for path in args.text:
      if not paths.is_file(path):
        raise InputError(f"--text {path}: no such file")
      file_texts, file_where = read_texts(path, args.text_column)
      texts += file_texts
      where += file_where
    jobs.append(("text", texts, where, where, texts))

  embedder = inference.Embedder.load(args.workdir, args.step, batch_size=args.batch_size)
  parts = {"embeddings": [], "ids": [], "modality": [], "sources": [], "texts": []}
  for modality, inputs, ids, sources, texts in jobs:
    embeddings, kept = _embed_or_report(embedder, modality, inputs, sources, args)
    parts["embeddings"].append(embeddings)
    for field, values in (("ids", ids), ("sources", sources), ("texts", texts)):
      parts[field].extend(values[i] for i in kept)
    parts["modality"].extend([modality] * len(kept))
  index = Index(embeddings=np.concatenate(parts["embeddings"]),
                **{field: np.asarray(parts[field], str) for field in INDEX_FIELDS},
                info={"workdir": paths.absolute(args.workdir), "step": embedder.step,
                      "embed_dim": embedder.embed_dim})
  save_index(args.out, index)
  counts = ", ".join(f"{int(np.sum(index.modality == m))} {m}" for m in index_modalities() if np.any(index.modality == m))
  print(f"wrote {args.out}: {len(index)} entries ({counts}), step {embedder.step} of {args.workdir}")
  return 0


def top_k(index: Index, query_emb: np.ndarray, k: int, targets: Sequence[str]) -> dict[str, list[dict]]:
  """{target modality: up to k entries by descending cosine similarity, each {rank, score, id, source, text}}."""
  scores = index.embeddings @ query_emb
  results = {}
  for modality in targets:
    rows = np.flatnonzero(index.modality == modality)
    # Stable sort on the negated score: equal scores keep index order, so the output is deterministic.
    best = rows[np.argsort(-scores[rows], kind="stable")[:k]]
    results[modality] = [{"rank": r + 1, "score": float(scores[i]), "id": str(index.ids[i]),
                          "source": str(index.sources[i]), "text": str(index.texts[i])} for r, i in enumerate(best)]
  return results


def run_query(args) -> int:
  from medbind_jax import inference  # pylint: disable=import-outside-toplevel
  index = load_index(args.index)
  modality, query = next((m, getattr(args, m)) for m in index_modalities() if getattr(args, m, None) is not None)
  embedder = inference.Embedder.load(args.workdir, args.step, batch_size=1)
  if index.info.get("embed_dim") != embedder.embed_dim:
    raise ValueError(f"{args.index} holds {index.info.get('embed_dim')}-d embeddings; the run in {args.workdir} "
                     f"makes {embedder.embed_dim}-d ones")
  if (index.info.get("workdir"), index.info.get("step")) != (paths.absolute(args.workdir), embedder.step):
    print(f"warning: {args.index} was made by step {index.info.get('step')} of {index.info.get('workdir')}; "
          f"the query uses step {embedder.step} of {paths.absolute(args.workdir)}", file=sys.stderr)
  query_emb = embedder.embed(modality, [query], names=[f"--{modality} {query}"]).embeddings[0]
  present = [m for m in index_modalities() if np.any(index.modality == m)]
  targets = args.target or present
  results = top_k(index, query_emb, args.k, targets)
  if args.json:
    print(json.dumps({"query": {"modality": modality, "input": query}, "step": embedder.step,
                      "results": results}, indent=2))
    return 0
  print(f"query ({modality}): {query}")
  for target in targets:
    print(f"\ntop {min(args.k, len(results[target]))} {target} of {int(np.sum(index.modality == target))}:")
    for hit in results[target]:  # a text entry shows its source line and text, a file its path
      text = hit["text"] if len(hit["text"]) <= 80 else hit["text"][:77] + "..."
      shown = f'{hit["source"]}  "{text}"' if hit["text"] else hit["source"]
      print(f"  {hit['rank']:>3}  {hit['score']:+.4f}  {shown}")
  return 0


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m medbind_jax.embed", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--workdir", required=True, help="the training run's workdir (config.json, checkpoints/)")
  common.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  common.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

  index = sub.add_parser("index", parents=[common], help="embed folders and text files into an index")
  for m in codecs.names():
    index.add_argument(f"--{m}", metavar="DIR", help=f"folder of {m} inputs: {codecs.get(m).inputs_help}; recursive")
  index.add_argument("--text", metavar="FILE", nargs="+", help="text files: one text per non-blank line, or "
                     "a .csv/.tsv file with one text per row of --text-column")
  index.add_argument("--text-column", default=None, help="CSV/TSV column of the texts (default: 'text' or 'report')")
  index.add_argument("--out", required=True, help="index file to write: .npz or .safetensors")
  index.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: config.eval)")
  index.add_argument("--skip-bad", action="store_true",
                     help="log and leave out bad inputs (and print how many) instead of stopping")

  query = sub.add_parser("query", parents=[common], help="top-K entries of an index for one query")
  query.add_argument("--index", required=True, help="an index written by `index`")
  what = query.add_mutually_exclusive_group(required=True)
  what.add_argument("--text", help="query text")
  for m in codecs.names():
    what.add_argument(f"--{m}", metavar="PATH", help=f"query {m} input (one of: {codecs.get(m).inputs_help})")
  query.add_argument("--k", type=int, default=5, help="entries per target modality (default 5)")
  query.add_argument("--target", choices=index_modalities(), nargs="+", help="modalities to search (default: all)")
  query.add_argument("--json", action="store_true", help="print the results as JSON")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  if getattr(args, "k", 1) < 1:
    print("error: --k must be at least 1", file=sys.stderr)
    return 2
  try:
    return run_index(args) if args.command == "index" else run_query(args)
  except (InputError, FileNotFoundError, ValueError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
