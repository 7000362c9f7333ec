"""LoRA: low-rank adapters on the decoder's projections, and the helpers that keep the base frozen.

A projection matched by `LoraConfig.targets` (a regex searched in its '/'-joined module path, e.g.
`layers_3/self_attn/q_proj`) computes

  y = x @ W + b + (dropout(x) @ A @ B) * alpha / rank

with A [in, rank] drawn like peft's default (uniform, bound 1/sqrt(in)) and B [rank, out] zero-initialised, so a
fresh adapter leaves the model's function unchanged. The update is applied beside the frozen W on the fly (W is
never rewritten while training, and may be held in bfloat16); `merge` folds it into W for export.

Training only the adapters (and later a projector and soft tokens) is parameter partitioning: `partition` splits
the tree into (trainable, frozen) by a regex over leaf paths, the loss takes both, and the gradient and the
optimiser see only the trainable part, so the frozen part cannot change:

  trainable, frozen = lora.partition(params)                       # default: every lora_a / lora_b leaf
  def loss_fn(trainable, frozen, batch):
    out = model.apply({"params": lora.combine(trainable, frozen)}, batch["input_ids"], train=True,
                      rngs={"dropout": rng})
    ...
  grads = jax.grad(loss_fn)(trainable, frozen, batch)
  updates, opt_state = tx.update(grads, opt_state, trainable)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

Dtype = Any

LORA_LEAVES = ("lora_a", "lora_b")
LORA_PARAM_REGEX = r"(^|/)lora_[ab]$"  # `partition`'s default: the adapter leaves and nothing else

# Torch Linear's default weight init, as the decoder's random init (loaded checkpoints replace it).
DEFAULT_KERNEL_INIT = nn.initializers.normal(0.02)
# peft's A init: kaiming_uniform(a=sqrt(5)) on the [rank, in] weight = uniform(-1/sqrt(in), 1/sqrt(in)).
LORA_A_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections carry adapters and how big they are.

  targets: regex searched in each projection's module path (`q_proj|v_proj`, `self_attn/(q|k|v|o)_proj`,
    `mlp/`, `layers_(2[0-9])/.*_proj`); rank: r; alpha: the update is scaled by alpha / rank; dropout: on the
    adapter's input, training only.
  """

  targets: str = r"(q_proj|v_proj)$"
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    re.compile(self.targets)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def matches(self, module_path: str) -> bool:
    return re.search(self.targets, module_path) is not None


class Dense(nn.Module):
  """x [..., in] @ kernel [in, features] (+ bias), in `dtype` with parameters stored in `param_dtype`; plus the
  LoRA update when `lora` targets this module's path. Names follow `nn.Dense` (`kernel`, `bias`) so checkpoints
  map onto it like onto any projection."""

  features: int
  use_bias: bool = False
  lora: LoraConfig | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    in_features = x.shape[-1]
    kernel = self.param("kernel", DEFAULT_KERNEL_INIT, (in_features, self.features), self.param_dtype)
    x = x.astype(self.dtype)
    y = jnp.dot(x, kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
    if self.lora is not None and self.lora.matches("/".join(self.path)):
      lora_a = self.param("lora_a", LORA_A_INIT, (in_features, self.lora.rank), self.param_dtype)
      lora_b = self.param("lora_b", nn.initializers.zeros, (self.lora.rank, self.features), self.param_dtype)
      h = nn.Dropout(self.lora.dropout)(x, deterministic=deterministic)
      y = y + jnp.dot(jnp.dot(h, lora_a.astype(self.dtype)), lora_b.astype(self.dtype)) * self.lora.scale
    return y


# --- Parameter trees -------------------------------------------------------------------------------------------

def partition(params, trainable: str = LORA_PARAM_REGEX):
  """(trainable, frozen): the leaves whose '/'-joined path `re.search`es `trainable`, and the rest, as two nested
  dicts of the same layout (`combine` joins them). Raises when nothing matches (an adapter-less tree, a typo)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  train = {path: value for path, value in flat.items() if re.search(trainable, path)}
  if not train:
    raise ValueError(f"no parameter path matches trainable={trainable!r}; paths look like {sorted(flat)[:4]} "
                     "(a model built without `lora=LoraConfig(...)` has no lora_a / lora_b leaves)")
  frozen = {path: value for path, value in flat.items() if path not in train}
  return traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def combine(*trees):
  """One parameter tree from disjoint trees (inverse of `partition`)."""
  flat = {}
  for tree in trees:
    for path, value in traverse_util.flatten_dict(tree).items():
      if path in flat:
        raise ValueError(f"parameter {'/'.join(path)} is in more than one tree")
      flat[path] = value
  return traverse_util.unflatten_dict(flat)


def cast_floating(tree, dtype: Dtype):
  """The floating-point leaves of `tree` cast to `dtype` (e.g. a frozen base held in bfloat16)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def init_adapters(model: nn.Module, rng, *init_args):
  """Fresh adapter parameters (lora_a / lora_b leaves only) for `model` (built with `lora=`), to `combine` with
  loaded base parameters. `init_args` are `model.init`'s inputs after the rng (default: one token id). Jitted:
  XLA drops the unused base initialisers, so a 7B base is never materialised here."""
  if getattr(model, "lora", None) is None:
    raise ValueError("the model has no LoRA config: build it with lora=LoraConfig(...)")
  init_args = init_args or (jnp.zeros((1, 1), jnp.int32),)
  return jax.jit(lambda key: partition(model.init(key, *init_args)["params"])[0])(rng)


def merge(params, lora: LoraConfig):
  """`params` with each adapter folded into its kernel (W + A @ B * alpha / rank, in float32, then back to W's
  dtype) and the lora_a / lora_b leaves removed: the plain decoder's parameters, for export."""
  flat = traverse_util.flatten_dict(params)
  merged = {path: value for path, value in flat.items() if path[-1] not in LORA_LEAVES}
  for path in flat:
    if path[-1] != "lora_a":
      continue
    module = path[:-1]
    kernel = flat[module + ("kernel",)]
    update = jnp.dot(jnp.asarray(flat[path], jnp.float32), jnp.asarray(flat[module + ("lora_b",)], jnp.float32),
                     precision=jax.lax.Precision.HIGHEST) * lora.scale
    merged[module + ("kernel",)] = (jnp.asarray(kernel, jnp.float32) + update).astype(kernel.dtype)
  return traverse_util.unflatten_dict(merged)
