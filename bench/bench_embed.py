"""Embedding throughput (examples/s) per modality of `medbind_jax.inference.Embedder`, default config's model.

  python -m bench.bench_embed                          # batch 256 (config.eval.batch_size), 3 timed batches
  python -m bench.bench_embed --batch-size 64 --batches 5 --modalities cxr,ecg

The model is `configs/medbind.get_config()`'s: ViT CXR tower and ECG transformer at random init (throughput does
not depend on the weights), the packaged MiniLM text trunk (frozen, `model.towers.text.trunk = "cached"`: at
inference it runs on every text) and the heads. Two figures per modality, each after one warm-up batch that
compiles:

  end-to-end   `Embedder.embed(modality, ...)` on raw inputs: CXR = PNG bytes (the real fixture images, 512x512
               like the originals) decoded, resized to 64 px and normalised; ECG = 10 s 12-lead arrays at 500 Hz
               (the real fixture records) checked, resampled to 100 Hz and cut to 1000 samples; text = real
               radiology reports (IU X-ray), tokenised to 128 tokens (config.data.text_max_length). Host
               preparation overlaps the device's previous batch.
  model only   the jitted embedding function (`embedder.fns.inputs[modality]`) on a batch the modality's codec
               loader already prepared (text: the text trunk and head on already tokenised reports).
"""

from __future__ import annotations

import argparse
import csv
import io
import pathlib
import sys
import time

import jax
import numpy as np
import wfdb
from PIL import Image

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import medbind  # pylint: disable=wrong-import-position
from medbind_jax import inference, runs  # pylint: disable=wrong-import-position
from medbind_jax.data import codecs  # pylint: disable=wrong-import-position
from medbind_jax.model import MedBind, build_model, init_params  # pylint: disable=wrong-import-position

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "real"
# Each modality's `Embedder.embed` options for the raw inputs of `raw_inputs` (ECG: arrays at 500 Hz).
EMBED_OPTIONS = {"ecg": {"sampling_rate": 500.0}}


def raw_inputs(modality: str, n: int) -> list:
  """`n` raw inputs of `modality`, cycling through the real fixture files."""
  if modality == "cxr":
    encoded = []
    for path in sorted((FIXTURES / "cxr").glob("*.png")):
      buf = io.BytesIO()
      Image.open(path).resize((512, 512), Image.BILINEAR).save(buf, format="PNG")
      encoded.append(buf.getvalue())
    return [encoded[i % len(encoded)] for i in range(n)]
  if modality == "ecg":
    signals = [wfdb.rdrecord(str(p.with_suffix(""))).p_signal.astype(np.float32)
               for p in sorted((FIXTURES / "ecg").glob("*.hea"))]
    return [signals[i % len(signals)] for i in range(n)]
  with open(FIXTURES / "text" / "iu_xray_reports_uid001-030.csv", newline="", encoding="utf-8") as f:
    reports = [f"{r['findings']} {r['impression']}".strip() for r in csv.DictReader(f)]
  reports = [r for r in reports if r]  # one record has neither section
  return [reports[i % len(reports)] for i in range(n)]


def timed(fn, repeats: int) -> float:
  """Seconds per call of `fn` (which blocks until its result is ready), after one warm-up call."""
  fn()
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-size", type=int, default=0, help="examples per batch (default: config.eval)")
  parser.add_argument("--batches", type=int, default=3, help="timed batches per figure (after one warm-up)")
  parser.add_argument("--modalities", default="cxr,ecg,text", help="comma-separated: cxr, ecg, text")
  args = parser.parse_args()

  config = medbind.get_config()
  model, pretrained = build_model(config)
  params = init_params(model, jax.random.key(0), pretrained)
  text_params = params["towers"].pop(codecs.TEXT)  # the frozen trunk, as a `trunk = "cached"` run keeps it
  batch_size = args.batch_size or config.eval.batch_size
  embedder = inference.Embedder(config, model, params, text_params=text_params, batch_size=batch_size)
  device_text_params = jax.device_put(text_params, jax.local_devices()[0])
  text_trunk = runs.text_trunk_fn(model)
  text_project = jax.jit(lambda p, f: model.apply({"params": p}, codecs.TEXT, f, method=MedBind.project))
  towers = {**params["towers"], codecs.TEXT: text_params}
  num_params = {m: sum(x.size for x in jax.tree.leaves(tower)) for m, tower in towers.items()}

  print(f"devices: {jax.devices()}; default config (configs/medbind.py), batch size {batch_size}, "
        f"{args.batches} timed batches after one warm-up")
  print(f"{'modality':8s} {'tower':16s} {'params_M':>8s} {'input':44s} {'end-to-end ex/s':>16s} "
        f"{'model-only ex/s':>16s}")
  inputs = {"cxr": "PNG 512x512 -> 64x64", "ecg": "12 x 5000 @ 500 Hz -> 12 x 1000 @ 100 Hz",
            "text": f"report -> {config.data.text_max_length} tokens"}
  for modality in args.modalities.split(","):
    raw = raw_inputs(modality, batch_size)
    options = EMBED_OPTIONS.get(modality, {})
    end_to_end = timed(lambda: embedder.embed(modality, raw, **options).embeddings, args.batches)
    if modality == codecs.TEXT:
      tokens = embedder.tokenize(raw)
      model_only = timed(lambda: np.asarray(text_project(embedder.params, text_trunk(device_text_params, tokens))),
                         args.batches)
    else:
      load = codecs.get(modality).input_loader(embedder.specs[modality], len(raw), **options)
      batch = np.stack([load(x, f"{modality}[{i}]", i) for i, x in enumerate(raw)])
      fn = embedder.fns.inputs[modality]
      model_only = timed(lambda: np.asarray(fn(embedder.params, batch)), args.batches)
    tower = config.model.towers[modality].name + (" (MiniLM)" if modality == codecs.TEXT else "")
    print(f"{modality:8s} {tower:16s} {num_params[modality] / 1e6:8.2f} {inputs[modality]:44s} "
          f"{batch_size / end_to_end:16.1f} {batch_size / model_only:16.1f}", flush=True)


if __name__ == "__main__":
  main()
