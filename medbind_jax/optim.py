"""Optimiser: AdamW with linear warm-up and cosine decay, freezing and learning-rate groups by regex.

`param_groups` is a sequence of (regex, multiplier) over '/'-joined parameter paths such as
'text_encoder/layer_0/attn/query/kernel'; the first matching regex decides, multiplier None freezes the
parameter (its gradient is zeroed before clipping, so it neither moves nor counts in the global norm, and its
update is exactly zero, so it stays bit-identical), unmatched parameters use multiplier 1. Example: train only
the last layer of a 6-layer text trunk and everything outside it:

  param_groups = ((r"^text_encoder/layer_5/", 1.0), (r"^text_encoder/", None))
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import optax
from flax import traverse_util


def param_paths(params) -> list[str]:
  return ["/".join(k) for k in traverse_util.flatten_dict(params)]


def group_labels(params, param_groups: Sequence[tuple[str, float | None]]):
  """Pytree of labels ('frozen' or 'lr_x<multiplier>'), one per parameter."""
  compiled = [(re.compile(rx), mult) for rx, mult in param_groups]
  unused = {rx for rx, _ in param_groups}
  flat = {}
  for path in traverse_util.flatten_dict(params):
    name = "/".join(path)
    mult = 1.0
    for (rx, m), (raw, _) in zip(compiled, param_groups):
      if rx.search(name):
        mult = m
        unused.discard(raw)
        break
    flat[path] = "frozen" if mult is None else f"lr_x{float(mult)}"
  if unused:
    raise ValueError(f"optim.param_groups regexes match no parameter: {sorted(unused)}; parameters look like "
                     f"{param_paths(params)[:5]}")
  return traverse_util.unflatten_dict(flat)


def _decay_mask(params):
  """Weight decay on matrices and kernels only, not on biases, norms, scales or temperatures."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def learning_rate_schedule(config) -> optax.Schedule:
  c = config.optim
  return optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, c.warmup_steps,
                                            max(config.total_steps, c.warmup_steps + 1), end_value=0.0)


def make_optimizer(config, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (transformation, base learning-rate schedule) for `config.optim` over `params`."""
  c = config.optim
  schedule = learning_rate_schedule(config)
  labels = group_labels(params, c.param_groups)

  def adamw(multiplier: float) -> optax.GradientTransformation:
    return optax.adamw(lambda step: multiplier * schedule(step), b1=c.b1, b2=c.b2, eps=c.eps,
                       weight_decay=c.weight_decay, mask=_decay_mask)

  transforms: dict[str, Any] = {}
  for label in set(jax.tree.leaves(labels)):
    transforms[label] = optax.set_to_zero() if label == "frozen" else adamw(float(label[len("lr_x"):]))
  tx = optax.multi_transform(transforms, labels)
  if c.grad_clip_norm:
    frozen = jax.tree.map(lambda label: label == "frozen", labels)
    tx = optax.chain(optax.masked(optax.set_to_zero(), frozen), optax.clip_by_global_norm(c.grad_clip_norm), tx)
  return tx, schedule
