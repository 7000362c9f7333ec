r"""Chunked against unchunked contrastive edges: compiled temporary memory and wall time, forward + backward.

  python -m bench.bench_chunked                    # B = 4096, chunks B/2 .. B/16 (a few minutes on 2 cores)
  python -m bench.bench_chunked --batch 1024 --repeats 10 --edges tmcl,pair,sigmoid

For one TMCL edge (`losses.tmcl_sum` vs `chunked_losses.chunked_tmcl_sum`, duplicate reports as positives) and one
pair edge (`losses.pair_sum` vs `chunked_losses.chunked_pair_sum`, a quarter of the rows linked, 'linked'
negatives, record ids), and with `--edges ...,sigmoid` the sigmoid edge (`chunked_sigmoid_sum`), on one device in
fp32 with D = 256: the value and gradient w.r.t. both embeddings and the logit scale, unchunked and with chunk =
B/2, B/4, B/8, B/16. Reported per variant: XLA's temporary buffer size of the compiled program
(`memory_analysis().temp_size_in_bytes`: what the logits blocks cost, inputs and outputs excluded) and the median
wall time. Variants are timed round-robin (one call of each per round, after a warm-up), so the machine's noise
spreads evenly over them; ratios are within the run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench import timing
from medbind_jax import chunked_losses, losses

D = 256
DIVISORS = (2, 4, 8, 16)


def _unit(rng, n):
  x = rng.normal(size=(n, D)).astype(np.float32)
  return jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def _problem(b: int):
  """Embeddings, mostly distinct report keys with some duplicates, a quarter of the rows linked, record ids."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, max(2, (3 * b) // 4), b)
  keys = jnp.asarray(np.stack([ids, 7 * ids + 1], axis=1).astype(np.int32))
  linked = jnp.arange(b) < b // 4
  record = jnp.arange(b, dtype=jnp.int32)
  return (_unit(rng, b), _unit(rng, b), jnp.float32(14.3)), keys, linked, record


def _edge_fn(edge: str, chunk: int | None):
  """value_and_grad of the edge's loss (sum / count) w.r.t. (first embedding, second embedding, scale); the keys,
  linked mask and record ids are arguments too (not constants XLA would fold at compile time)."""
  if edge == "tmcl":
    def loss(x, y, s, keys, linked, record):  # pylint: disable=unused-argument
      if chunk is None:
        total, count = losses.tmcl_sum(x, y, keys, s)
      else:
        total, count = chunked_losses.chunked_tmcl_sum(x, y, keys, s, chunk=chunk)
      return total / count
  elif edge == "sigmoid":
    def loss(x, y, s, keys, linked, record):  # pylint: disable=unused-argument
      bias = jnp.float32(-10.0)
      if chunk is None:
        total, count = losses.sigmoid_sum(x, y, keys, s, bias)
      else:
        total, count = chunked_losses.chunked_sigmoid_sum(x, y, keys, s, bias, chunk=chunk)
      return total / count
  else:
    def loss(x, y, s, keys, linked, record):  # pylint: disable=unused-argument
      if chunk is None:
        total, count = losses.pair_sum(x, y, linked, s, "linked", None, record, record)
      else:
        total, count = chunked_losses.chunked_pair_sum(x, y, linked, s, "linked", None, record, record, chunk=chunk)
      return total / jnp.maximum(count, 1.0)

  def value_and_grad(*args):
    with jax.default_matmul_precision("highest"):  # as `losses.objective` runs them
      return jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)

  return jax.jit(value_and_grad)


def measure(b: int, repeats: int, edges=("tmcl", "pair")) -> list[tuple[str, str, int, float]]:
  """[(edge, variant, temp bytes, median seconds)] for each edge, unchunked first."""
  embeddings, keys, linked, record = _problem(b)
  args = embeddings + (keys, linked, record)
  variants = []
  for edge in edges:
    for chunk in (None,) + tuple(b // k for k in DIVISORS):
      fn = _edge_fn(edge, chunk)
      compiled = fn.lower(*args).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      jax.block_until_ready(compiled(*args))  # warm-up
      variants.append((edge, "unchunked" if chunk is None else f"B/{b // chunk}", temp, compiled))
  medians = timing.interleaved_medians(
      {i: (lambda c=compiled: jax.block_until_ready(c(*args)))
       for i, (_, _, _, compiled) in enumerate(variants)}, repeats, rounds=repeats, settle=False)
  return [(edge, name, temp, medians[i]) for i, (edge, name, temp, _) in enumerate(variants)]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=4096, help="global batch B (divisible by 16)")
  parser.add_argument("--repeats", type=int, default=7, help="timed rounds (one call of every variant per round)")
  parser.add_argument("--edges", default="tmcl,pair", help="edges to measure, comma-separated: tmcl, pair, sigmoid")
  args = parser.parse_args(argv)
  if args.batch % max(DIVISORS):
    parser.error(f"--batch must be divisible by {max(DIVISORS)}")
  edges = tuple(args.edges.split(","))
  if not set(edges) <= {"tmcl", "pair", "sigmoid"}:
    parser.error(f"--edges: unknown edge in {args.edges!r}")
  rows = measure(args.batch, args.repeats, edges)
  base = {edge: (temp, t) for edge, name, temp, t in rows if name == "unchunked"}
  print(f"\nB={args.batch}, D={D}, fp32, one device ({jax.devices()[0].platform}), value and gradient, median of "
        f"{args.repeats} (ratios within the run):\n")
  print("| edge | chunk | temp MiB | temp unchunked / chunked | ms | time chunked / unchunked |")
  print("|---|---|---:|---:|---:|---:|")
  for edge, name, temp, t in rows:
    base_temp, base_t = base[edge]
    print(f"| {edge} | {name} | {temp / 2**20:.1f} | {base_temp / max(temp, 1):.2f}x | {1e3 * t:.1f} | "
          f"{t / base_t:.2f}x |")


if __name__ == "__main__":
  main()
