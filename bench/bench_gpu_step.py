r"""The paper-scale train step's MFU on an accelerator (written for one NVIDIA H200), bf16 compute.

  python -m bench.bench_gpu_step                          # paper config, batch 256, bfloat16 towers
  python -m bench.bench_gpu_step --batch 8 --steps 2      # a smoke run (CPU: a few minutes)

The `paper` config's model (Swin-T 224 CXR tower, BERT-base text tower trained end to end with 128-token
reports, 8 x 512 ECG transformer on 10 s at 500 Hz, batch 256 with a quarter linked), random weights and a
random device-resident batch of the right shapes (no data or checkpoints needed), through the trainer's own
update step (`train.build_train_step`: towers, loss, gradient, AdamW). Printed: step time, examples/s, the
step's FLOPs from XLA's cost analysis, and MFU against (a) the matmul rate measured in the same run (a large
matmul in the compute dtype) and (b) `--peak-tflops` (default 989: the H200's dense bf16 rate). The contrastive
matmuls stay float32 (`loss.precision`); parameters stay float32.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import medbind
from medbind_jax import runs, sharding, train
from medbind_jax.data import codecs, pipeline
from medbind_jax.model import build_model


def random_batch(model, layout, spec: pipeline.BatchSpec, text_length: int, vocab_size: int, seed: int = 0) -> dict:
  """A batch in the pipeline's layout with random inputs, tokens and distinct report keys."""
  rng = np.random.default_rng(seed)
  n = spec.global_batch_size
  inputs = {m: rng.normal(size=model.towers[m].example_inputs(n).shape).astype(np.float32)
            for m in layout.modalities}
  reports = {m: {"input_ids": rng.integers(1, vocab_size, (n, text_length)).astype(np.int32),
                 "attention_mask": np.ones((n, text_length), np.int32)} for m in layout.report_modalities}
  keys = {m: np.stack([np.arange(n), np.arange(n) + k], 1).astype(np.int32)
          for k, m in enumerate(layout.report_modalities)}
  linked = spec.linked_slots() >= 0
  return {"inputs": inputs, "reports": reports, "text_key": keys,
          "pair_mask": {name: linked for name in layout.pair_edges},
          "index": {m: np.arange(n, dtype=np.int32) for m in layout.modalities}}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=256, help="global batch (rows of every modality)")
  parser.add_argument("--dtype", default="bfloat16", help="towers' compute dtype")
  parser.add_argument("--steps", type=int, default=20, help="timed steps (after 2 warm-up steps)")
  parser.add_argument("--peak-tflops", type=float, default=989.0, help="nominal peak of the compute dtype")
  parser.add_argument("--matmul-size", type=int, default=8192)
  args = parser.parse_args(argv)

  config = medbind.get_config(f"paper,batch_size={args.batch}")
  config.model.dtype = args.dtype
  print(f"devices: {jax.devices()}; paper config, batch {args.batch}, {args.dtype} compute", flush=True)
  model, _ = build_model(config)  # the paper config's towers with random weights (no `init` directories)
  params = runs.initial_params(config, model, {})
  layout = pipeline.Layout.from_edges(runs.edges(config))
  mesh = sharding.make_mesh(config.mesh)
  spec = pipeline.BatchSpec(args.batch, config.data.linked_per_batch, shards=jax.local_device_count())
  text = model.towers[codecs.TEXT]
  batch = random_batch(model, layout, spec, config.data.text_max_length, text.vocab_size)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  state, step = train.build_train_step(config, model, layout, runs.text_mode(config), params, mesh, spec,
                                       jax.random.key(0))
  table = jnp.zeros((0,), jnp.float32)

  start = time.perf_counter()
  compiled = step.lower(state, batch, table).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
  for _ in range(2):
    state, metrics = compiled(state, batch, table)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, table)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  loss = float(metrics["loss"])

  a = jnp.ones((args.matmul_size, args.matmul_size), jnp.dtype(args.dtype))
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  matmul_times = []
  for _ in range(10):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    matmul_times.append(time.perf_counter() - start)
  matmul_rate = 2 * args.matmul_size ** 3 / float(np.median(matmul_times))

  examples = args.batch * len(layout.modalities)
  achieved = flops / step_s
  print(f"\n| step ms | examples/s | GFLOP/step | TFLOP/s | measured {args.dtype} matmul TFLOP/s | MFU (measured) "
        f"| MFU (peak {args.peak_tflops:.0f}) | compile s | loss |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  print(f"| {1e3 * step_s:.1f} | {examples / step_s:.4g} | {flops / 1e9:.0f} | {achieved / 1e12:.3g} | "
        f"{matmul_rate / 1e12:.3g} | {100 * achieved / matmul_rate:.1f}% | "
        f"{100 * achieved / (args.peak_tflops * 1e12):.1f}% | {compile_s:.0f} | {loss:.3f} |")


if __name__ == "__main__":
  main()
