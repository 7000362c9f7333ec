"""Embedding throughput (examples/s) per modality of `medbind_jax.inference.Embedder`, default config's model.

  python -m bench.bench_embed                          # batch 256 (config.eval.batch_size), 3 timed batches
  python -m bench.bench_embed --batch-size 64 --batches 5 --modalities cxr,ecg

The model is `configs/medbind.get_config()`'s: ViT CXR tower and ECG transformer at random init (throughput does
not depend on the weights), the packaged MiniLM text trunk (frozen, `trunk = "cached"`: at inference it runs on
every text) and the heads. Two figures per modality, each after one warm-up batch that compiles:

  end-to-end   `Embedder.embed_*` on raw inputs: CXR = PNG bytes (the real fixture images, 512x512 like the
               originals) decoded, resized to 64 px and normalised; ECG = 10 s 12-lead arrays at 500 Hz (the real
               fixture records) checked, resampled to 100 Hz and cut to 1000 samples; text = real radiology
               reports (IU X-ray), tokenised to 64 tokens. Host preparation overlaps the device's previous batch.
  model only   the jitted embedding function on an already prepared batch (text: already tokenised).
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
from medbind_jax import inference, train  # pylint: disable=wrong-import-position
from medbind_jax.data import preprocess  # pylint: disable=wrong-import-position
from medbind_jax.model import MedBind, build_model, init_params  # pylint: disable=wrong-import-position

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "real"


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
  model, pretrained = build_model(config.model)
  params = init_params(model, jax.random.key(0), pretrained)
  text_params = params.pop("text_encoder")  # the frozen trunk, as a `trunk = "cached"` run keeps it
  batch_size = args.batch_size or config.eval.batch_size
  embedder = inference.Embedder(config, model, params, text_params=text_params, batch_size=batch_size)
  device_text_params = jax.device_put(text_params, jax.local_devices()[0])
  text_trunk = train.text_trunk_fn(model)
  text_project = jax.jit(lambda p, f: model.apply({"params": p}, "text", f, method=MedBind.project))
  num_params = {m: sum(x.size for x in jax.tree.leaves(params[f"{m}_encoder"] if m != "text" else text_params))
                for m in ("cxr", "ecg", "text")}

  print(f"devices: {jax.devices()}; default config (configs/medbind.py), batch size {batch_size}, "
        f"{args.batches} timed batches after one warm-up")
  print(f"{'modality':8s} {'tower':16s} {'params_M':>8s} {'input':44s} {'end-to-end ex/s':>16s} "
        f"{'model-only ex/s':>16s}")
  inputs = {"cxr": "PNG 512x512 -> 64x64", "ecg": "12 x 5000 @ 500 Hz -> 12 x 1000 @ 100 Hz",
            "text": f"report -> {config.data.text_max_length} tokens"}
  for modality in args.modalities.split(","):
    raw = raw_inputs(modality, batch_size)
    method = {"cxr": embedder.embed_cxr, "ecg": lambda x: embedder.embed_ecg(x, sampling_rate=500.0),
              "text": embedder.embed_text}[modality]
    end_to_end = timed(lambda: method(raw), args.batches)
    if modality == "text":
      tokens = embedder.tokenize(raw)
      model_only = timed(lambda: np.asarray(text_project(embedder.params, text_trunk(device_text_params, tokens))),
                         args.batches)
    else:
      batch = np.stack([preprocess.preprocess_cxr(x, embedder.cxr_spec) if modality == "cxr"
                        else preprocess.preprocess_ecg(x, 500.0, embedder.ecg_spec) for x in raw])
      fn = embedder.fns.cxr if modality == "cxr" else embedder.fns.ecg
      model_only = timed(lambda: np.asarray(fn(embedder.params, batch)), args.batches)
    tower = config.model[modality].name + (" (MiniLM)" if modality == "text" else "")
    print(f"{modality:8s} {tower:16s} {num_params[modality] / 1e6:8.2f} {inputs[modality]:44s} "
          f"{batch_size / end_to_end:16.1f} {batch_size / model_only:16.1f}", flush=True)


if __name__ == "__main__":
  main()
