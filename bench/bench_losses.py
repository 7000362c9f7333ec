r"""The contrastive objective against open_clip's `ClipLoss` and against the matmul floor, forward + backward.

  pip install -r requirements-test.txt && pip install --no-deps open_clip_torch==3.3.0   # the reference
  python -m bench.bench_losses              # B = 256, 1024, 4096 (about 3 minutes on the 2-core machines)
  python -m bench.bench_losses --sizes 256,1024 --repeats 5

Per batch size B (D = 256, fp32, one process, one device), the median wall time of:

  floor      the three matmuls any CLIP-style loss needs: logits = Z U^T, dZ = G U, dU = G^T Z (XLA, jitted)
  ClipLoss   open_clip's ClipLoss on PyTorch CPU (its loss.py loaded by path: the package import needs
             torchvision), loss and backward to both embeddings
  tmcl       one TMCL edge of this project (`losses.objective` with the edge cxr_text, duplicate reports as
             positives), value and gradient w.r.t. both embeddings
  pair       the CXR-ECG pair edge with a quarter of the rows linked (the pipeline's static linked prefix, so
             only those rows are scored), against one ClipLoss call over the B/4 linked pairs
  full       MEDBind's objective: two TMCL edges and the pair edge, against three ClipLoss calls (two over B
             pairs, one over the B/4 linked pairs)

Both sides use both cores (torch.set_num_threads(2); XLA's CPU client). The seven entries of a size are timed in
four rounds that visit each in turn, so a burst of load from a neighbour falls on all of them; ratios are within
one run, and absolute times are not comparable between machines.

ClipLoss / floor is the most any loss can gain over ClipLoss here while it runs on XLA's matmuls: an edge needs the
three matmuls of the floor (forward logits, the two embedding gradients) whatever else it saves.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import interleaved_medians
from medbind_jax import losses

D = 256


def load_clip_loss():
  """open_clip's ClipLoss class, from the installed package's loss.py without importing the package."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise SystemExit("open_clip is not installed: pip install --no-deps open_clip_torch==3.3.0")
  path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
  module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.ClipLoss


def _unit(rng, n):
  x = rng.normal(size=(n, D)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _text_keys(rng, n):
  """Mostly distinct reports with some exact duplicates, as in real report sets."""
  ids = rng.integers(0, max(2, (3 * n) // 4), n)
  return np.stack([ids, 7 * ids + 1], axis=1).astype(np.int32)


def floor_fn(b: int):
  rng = np.random.default_rng(0)
  z, u, g = jnp.asarray(_unit(rng, b)), jnp.asarray(_unit(rng, b)), jnp.asarray(rng.normal(size=(b, b)), jnp.float32)
  matmuls = jax.jit(lambda z, u, g: (z @ u.T, g @ u, g.T @ z))
  return lambda: jax.block_until_ready(matmuls(z, u, g))


def _problem(b: int):
  rng = np.random.default_rng(1)
  emb = {"inputs": {m: jnp.asarray(_unit(rng, b)) for m in ("cxr", "ecg")},
         "reports": {m: jnp.asarray(_unit(rng, b)) for m in ("cxr", "ecg")}}
  batch = {"text_key": {m: jnp.asarray(_text_keys(rng, b)) for m in ("cxr", "ecg")},
           "pair_mask": {"cxr_ecg": jnp.arange(b) < b // 4},
           "index": {m: jnp.arange(b, dtype=jnp.int32) for m in ("cxr", "ecg")}}
  scales = {"cxr_text": jnp.float32(14.3), "ecg_text": jnp.float32(14.3), "cxr_ecg": jnp.float32(14.3)}
  return emb, batch, scales


EDGES = {"tmcl": (losses.Edge("cxr_text", ("cxr", "text")),),
         "pair": (losses.Edge("cxr_ecg", ("cxr", "ecg"), "pair"),),
         "full": (losses.Edge("cxr_text", ("cxr", "text")), losses.Edge("ecg_text", ("ecg", "text")),
                  losses.Edge("cxr_ecg", ("cxr", "ecg"), "pair"))}


def ours_fn(b: int, which: str):
  emb, batch, scales = _problem(b)
  grad = jax.jit(jax.value_and_grad(lambda e: losses.objective(e, batch, scales, EDGES[which],
                                                                linked_rows=b // 4)[0]))
  return lambda: jax.block_until_ready(grad(emb))


def clip_fn(clip_loss_cls, b: int, calls: tuple[int, ...]):
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(2)
  loss_fn = clip_loss_cls()
  rng = np.random.default_rng(2)
  pairs = [(torch.tensor(_unit(rng, n), requires_grad=True), torch.tensor(_unit(rng, n), requires_grad=True))
           for n in calls]
  scale = torch.tensor(14.3)

  def step():
    total = sum(loss_fn(a, t, scale) for a, t in pairs)
    total.backward()
    for a, t in pairs:
      a.grad = t.grad = None

  return step


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="256,1024,4096", help="batch sizes B, comma-separated")
  parser.add_argument("--repeats", type=int, default=0, help="timed repeats per entry (default: by size)")
  args = parser.parse_args(argv)
  clip_loss = load_clip_loss()
  rows = []
  for b in (int(s) for s in args.sizes.split(",")):
    repeats = args.repeats or (20 if b <= 1024 else 5)
    t = interleaved_medians({"floor": floor_fn(b), "clip": clip_fn(clip_loss, b, (b,)), "tmcl": ours_fn(b, "tmcl"),
                             "clip_pair": clip_fn(clip_loss, b, (b // 4,)), "pair": ours_fn(b, "pair"),
                             "clip3": clip_fn(clip_loss, b, (b, b, b // 4)), "full": ours_fn(b, "full")}, repeats)
    rows.append((b, t))
    print(f"B={b}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in t.items()), flush=True)
  print("\nfp32, D=256, forward + backward, median ms (ratios within the run):\n")
  print("| B | matmul floor | ClipLoss | TMCL edge | ClipLoss / TMCL | ClipLoss / floor | TMCL / floor "
        "| ClipLoss B/4 | pair edge | ClipLoss B/4 / pair | 3x ClipLoss | full objective | 3x ClipLoss / full |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for b, t in rows:
    print(f"| {b} | {1e3 * t['floor']:.1f} | {1e3 * t['clip']:.1f} | {1e3 * t['tmcl']:.1f} | "
          f"{t['clip'] / t['tmcl']:.2f}x | {t['clip'] / t['floor']:.2f}x | {t['tmcl'] / t['floor']:.2f}x | "
          f"{1e3 * t['clip_pair']:.1f} | "
          f"{1e3 * t['pair']:.1f} | {t['clip_pair'] / t['pair']:.2f}x | {1e3 * t['clip3']:.1f} | "
          f"{1e3 * t['full']:.1f} | {t['clip3'] / t['full']:.2f}x |")


if __name__ == "__main__":
  main()
