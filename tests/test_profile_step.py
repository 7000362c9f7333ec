"""bench/profile_step.py's reading of a compiled program: which class each HLO op falls in, and the model scope of
its metadata (the trace itself needs XLA's per-op events, switched on only in the benchmark's own process)."""

import jax
import jax.numpy as jnp

from bench import profile_step


def _classes(fn, *args):
  """{opcode or fused-op summary: class} of every top-level op of fn's compiled entry computation."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  instructions = profile_step.parse_hlo(text)
  entry = text[text.index("ENTRY"):]
  names = [name for name in instructions if f"%{name} = " in entry or f" {name} = " in entry]
  return {name: profile_step.classify(*instructions[name][::2]) for name in names}, instructions


def test_ops_fall_in_their_classes():
  x = jnp.ones((64, 48))
  w = jnp.ones((64, 32))

  def fn(x, w):
    weight_grad = x.T @ w  # contracts x's leading dimension
    norm = jnp.sum(jnp.exp(x), axis=1)  # a reduce of an elementwise op
    padded = jnp.pad(x, ((1, 1), (0, 0)))[:, :8]  # data movement only
    return weight_grad, norm, padded, jnp.tanh(w) * 2.0, jnp.sort(w[:, 0])

  classes, instructions = _classes(fn, x, w)
  found = set(classes.values())
  assert {"matmul / conv", "reduction", "pad/slice/concat", "elementwise", "other"} <= found, classes
  for name, kind in classes.items():
    opcode, _, fused = instructions[name]
    if kind == "matmul / conv":
      assert opcode in ("dot", "convolution") or fused & {"dot", "convolution"}
    if kind == "reduction":
      assert "reduce" in fused and not fused & {"dot", "convolution", "transpose", "copy"}
    if opcode == "sort":
      assert kind == "other"


def test_a_materialised_transpose_is_a_transpose():
  classes, instructions = _classes(lambda x: jnp.transpose(x * 2.0) + 1.0, jnp.ones((96, 40)))
  assert "transpose / copy" in classes.values(), {n: instructions[n] for n in classes}


def test_scopes_merge_layers_of_a_kind_and_mark_the_backward():
  scope = profile_step._scope  # pylint: disable=protected-access
  assert scope("jit(train_step)/transpose(jvp(MedBind.embed))/MedBind.features/cxr/block_1/mlp/add_any") == \
      "cxr/block_*/mlp (bwd)"
  assert scope("jit(train_step)/jvp(MedBind.embed)/MedBind.features/ecg/block_0/block_0.attend/attn/vmap()/div") == \
      "ecg/block_*/block_*.attend"
  assert scope("jit(train_step)/transpose(jvp(MedBind.embed))/MedBind.features/cxr/stem_2/slice") == \
      "cxr/stem_* (bwd)"
  assert scope("jit(train_step)/add") == ""


def test_concurrency_splits_the_span_by_ops_running_at_once():
  events = [(0, 10, "a"), (5, 15, "b"), (20, 30, "c"), (22, 24, "d")]
  assert profile_step.concurrency(events) == {1: 5 + 5 + 2 + 6, 2: 5 + 2, 0: 5}
