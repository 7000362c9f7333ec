"""Forward+backward throughput of every encoder tower, at two sizes, in float32 and bfloat16 compute.

  python -m bench.bench_encoders                 # all towers (a few minutes on the 2-core machines)
  python -m bench.bench_encoders --towers vit,bert --sizes tiny

One training-mode step = value_and_grad of a scalar of the pooled output w.r.t. all parameters (dropout on where
the tower has it). Parameters are float32 in both rows; "bf16" means `dtype=bfloat16` compute. GFLOP/s comes
from XLA's cost analysis of the compiled step; MFU is against the ~180 GFLOP/s fp32 matmul rate measured on the
2-core CPU (DESIGN.md section 10), so it means little on other hardware.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from medbind_jax.models import build_encoder

CPU_PEAK_GFLOPS = 180.0

# tower -> size -> (module fields, batch size). "tiny" is the CPU-demo scale; "small" a modest real model
# (ViT-S/16 at 224 px on 6 layers, a Swin with Swin-T widths on 3 stages at 128 px, MiniLM-L6, ...).
SIZES = {
    "vit": {
        "tiny": (dict(image_size=64, patch_size=8, hidden_size=128, num_layers=3, num_heads=4, mlp_dim=256), 32),
        "small": (dict(image_size=224, patch_size=16, hidden_size=384, num_layers=6, num_heads=6, mlp_dim=1536), 8),
    },
    "swin": {
        "tiny": (dict(image_size=64, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4),
                 32),
        "small": (dict(image_size=128, patch_size=4, embed_dim=96, depths=(2, 2, 2), num_heads=(3, 6, 12),
                       window_size=8), 8),
    },
    "bert": {
        "tiny": (dict(vocab_size=30522, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512,
                      max_position_embeddings=64, pooling="mean"), 32),
        "small": (dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                       max_position_embeddings=512, pooling="mean"), 16),  # the MiniLM-L6 shape
    },
    "ecg_transformer": {
        "tiny": (dict(num_samples=5000, patch_size=50, hidden_size=128, num_layers=3, num_heads=4, mlp_dim=256), 32),
        "small": (dict(num_samples=5000, patch_size=50, hidden_size=256, num_layers=6, num_heads=8, mlp_dim=1024), 16),
    },
    "ecg_resnet": {
        "tiny": (dict(num_samples=5000, stem_channels=32, stage_channels=(32, 64, 128), blocks_per_stage=(1, 1, 1)),
                 32),
        "small": (dict(num_samples=5000), 16),  # (64, 128, 256, 512) x 2 blocks
    },
}
TEXT_LENGTH = 48  # tokens per report


def _inputs(name, encoder, batch_size, rng):
  if name == "bert":
    ids = rng.integers(1, encoder.vocab_size, (batch_size, TEXT_LENGTH)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  return rng.standard_normal(encoder.example_inputs(batch_size).shape).astype(np.float32)


def bench_one(name, size, dtype, min_seconds):
  fields, batch_size = SIZES[name][size]
  encoder = build_encoder(name, dtype=dtype, **fields)
  rng = np.random.default_rng(0)
  inputs = _inputs(name, encoder, batch_size, rng)
  # Random parameters drawn in numpy: compiling `init` would cost more than the measurement.
  shapes = jax.eval_shape(encoder.init, jax.random.key(0), inputs)["params"]
  params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), shapes)
  num_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))

  def loss(p, key):
    pooled = encoder.apply({"params": p}, inputs, train=True, rngs={"dropout": key})["pooled"]
    return jnp.mean(pooled ** 2)

  start = time.perf_counter()
  step = jax.jit(jax.value_and_grad(loss)).lower(params, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - start
  cost = step.cost_analysis()
  flops = (cost[0] if isinstance(cost, list) else cost or {}).get("flops")

  jax.block_until_ready(step(params, jax.random.key(0)))  # warm-up
  steps, start = 0, time.perf_counter()
  while steps < 3 or time.perf_counter() - start < min_seconds:
    jax.block_until_ready(step(params, jax.random.key(steps)))
    steps += 1
  step_s = (time.perf_counter() - start) / steps
  gflops = flops / step_s / 1e9 if flops else float("nan")
  print(f"{name:16s} {size:6s} {jnp.dtype(dtype).name:9s} {batch_size:5d} {num_params / 1e6:8.2f} "
        f"{compile_s:9.1f} {step_s * 1e3:9.1f} {batch_size / step_s:9.1f} {gflops:8.1f} "
        f"{100 * gflops / CPU_PEAK_GFLOPS:6.1f}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--towers", default=",".join(SIZES), help="comma-separated tower names")
  parser.add_argument("--sizes", default="tiny,small", help="comma-separated sizes: tiny, small")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
  parser.add_argument("--min-seconds", type=float, default=1.0, help="timing window per row")
  args = parser.parse_args()

  print(f"devices: {jax.devices()}")
  print(f"{'tower':16s} {'size':6s} {'dtype':9s} {'batch':>5s} {'params_M':>8s} {'compile_s':>9s} "
        f"{'step_ms':>9s} {'ex/s':>9s} {'GFLOP/s':>8s} {'MFU%':>6s}")
  for name in args.towers.split(","):
    for size in args.sizes.split(","):
      for dtype in args.dtypes.split(","):
        bench_one(name, size, jnp.dtype(dtype), args.min_seconds)


if __name__ == "__main__":
  main()
