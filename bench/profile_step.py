r"""Where the default train step's time goes on XLA:CPU: a profile of the compiled step (bench_step's model-only
step), its op time grouped by what the ops do and by the model scope they come from.

  python -m bench.profile_step --data-dir /tmp/bench_world
  python -m bench.profile_step --steps 5 --top 30

The step is compiled as in bench_step (`train.build_train_step` on one batch of the input pipeline), warmed up, and
`--steps` steps are traced with XLA:CPU's per-op trace events. Each op's thread time (summed over the worker
threads that ran it) is put in a class by its HLO instruction, for fusions by the ops they hold:

  matmul / conv     dot or convolution (incl. the YNN/XNN library fusions that wrap them)
  transpose / copy  a fusion holding a transpose or a layout-changing copy (XLA:CPU's matmul kernels take no
                    operand contracted on its leading dimension, so weight gradients A^T G copy A transposed first)
  pad/slice/concat  pure data movement (e.g. the conv stem's im2col and its gradient)
  reduction         a fusion holding a reduce (norms, softmax sums, loss reductions)
  elementwise       any other fusion
  other             sorts, scatters, collectives, custom calls

The shares are of op thread time, the figure that bounds MFU: matmul thread time / total is what the step's
matmul share would be with every other op free. Absolute times move with the load on shared machines.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import tempfile

import jax

from bench import bench_step

_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ")
_MOVEMENT = {"parameter", "bitcast", "slice", "concatenate", "pad", "broadcast", "constant", "reshape",
             "dynamic-slice", "dynamic-update-slice", "tuple", "get-tuple-element"}
CLASSES = ("matmul / conv", "transpose / copy", "pad/slice/concat", "reduction", "elementwise", "other")


def parse_hlo(text: str) -> dict[str, tuple[str, str, set[str]]]:
  """{instruction name: (opcode, scope, opcodes of the computation a fusion calls)} of an HLO module's text."""
  computations, current, instructions = collections.defaultdict(set), None, {}
  lines = text.splitlines()
  for line in lines:
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      match = _COMPUTATION.match(line)
      current = match.group(1) if match else None
    elif current and (match := _INSTRUCTION.match(line)):
      computations[current].add(match.group(2))
  for line in lines:
    if not (match := _INSTRUCTION.match(line)):
      continue
    called = re.search(r"calls=%?([\w.\-]+)", line)
    scope = re.search(r'op_name="([^"]*)"', line)
    instructions[match.group(1)] = (match.group(2), _scope(scope.group(1) if scope else ""),
                                    computations.get(called.group(1), set()) if called else set())
  return instructions


def _scope(op_name: str) -> str:
  """A readable model scope of an op's metadata, layers of a kind merged: 'cxr/block_*/mlp (bwd)' from
  'jit(train_step)/transpose(jvp(MedBind.embed))/MedBind.features/cxr/block_1/mlp/add_any'."""
  path = op_name.split(";")[0]
  backward = "transpose(" in path
  parts = [p for p in re.sub(r"[\w.]*\(|\)", "/", path).split("/") if p][1:-1]  # less the jit name, the primitive
  parts = [re.sub(r"_\d+", "_*", p) for p in parts if not p.startswith("MedBind") and p not in ("jvp", "transpose")]
  return "/".join(parts[:3]) + (" (bwd)" if backward else "")


def classify(opcode: str, fused: set[str]) -> str:
  if opcode in ("dot", "convolution") or fused & {"dot", "convolution"}:
    return "matmul / conv"
  if opcode == "fusion":
    if fused & {"transpose", "copy"}:
      return "transpose / copy"
    if fused <= _MOVEMENT:
      return "pad/slice/concat"
    if "reduce" in fused:
      return "reduction"
    if fused & {"sort", "scatter", "gather"}:
      return "other"
    return "elementwise"
  if opcode in ("transpose", "copy"):
    return "transpose / copy"
  if opcode in ("pad", "slice", "concatenate", "dynamic-slice", "dynamic-update-slice"):
    return "pad/slice/concat"
  return "other"


def op_events(trace_dir: str) -> list[tuple[int, int, str]]:
  """(start ns, end ns, HLO instruction name) of every op event on XLA's worker threads in a trace."""
  (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb"))
  events = []
  for plane in jax.profiler.ProfileData.from_file(path).planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      events += [(int(e.start_ns), int(e.end_ns), e.name) for e in line.events
                 if not e.name.startswith(("end:", "Thunk", "Threadpool", "SlinkyThreadPool"))]
  return events


def concurrency(events: list[tuple[int, int, str]]) -> dict[int, int]:
  """{k: nanoseconds of the traced span during which exactly k op events were running} (k = 0 for the gaps)."""
  edges = sorted([(start, 1) for start, _, _ in events] + [(end, -1) for _, end, _ in events])
  spans, running = collections.Counter(), 0
  for (at, change), (later, _) in zip(edges, edges[1:]):
    running += change
    spans[running] += later - at
  return dict(spans)


def main():
  # XLA:CPU's per-op trace events, switched on before its client starts (at the first array, in `setup`).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  bench_step.add_setup_args(parser)
  parser.add_argument("--steps", type=int, default=3, help="traced steps")
  parser.add_argument("--top", type=int, default=15, help="the costliest scopes listed")
  args = parser.parse_args()
  config, model, layout, params, batch_spec, iterator, _, table_shape = bench_step.setup(args)
  batch = next(iterator)
  del iterator
  compiled, state, batch, table, _ = bench_step.compile_model_step(config, model, layout, params, batch_spec, batch,
                                                                   table_shape)
  instructions = parse_hlo(compiled.as_text())
  for _ in range(2):  # warm-up
    state, metrics = compiled(state, batch, table)
  jax.block_until_ready((state, metrics))
  trace_dir = tempfile.mkdtemp(prefix="profile_step_")
  try:
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
      state, metrics = compiled(state, batch, table)
      jax.block_until_ready((state, metrics))
    jax.profiler.stop_trace()
    events = op_events(trace_dir)
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  times = collections.Counter()
  for start, end, name in events:
    times[name] += end - start
  if not times:
    raise SystemExit("the trace holds no XLA op events (is this the CPU backend?)")

  by_class, by_scope, unknown = collections.Counter(), collections.Counter(), 0
  for name, ns in times.items():
    if name not in instructions:
      unknown += ns
      continue
    opcode, scope, fused = instructions[name]
    kind = classify(opcode, fused)
    by_class[kind] += ns
    by_scope[(kind, scope)] += ns
  total = sum(by_class.values())
  per_step = 1e6 * args.steps
  print(f"\nop thread time per step: {total / per_step:.0f} ms over {args.steps} traced steps "
        f"({unknown / per_step:.1f} ms in events that are no HLO op of the step)\n")
  spans = concurrency(events)
  span = sum(spans.values())
  print("the traced span with k ops running at once (XLA runs an op on one thread unless it splits it):",
        ", ".join(f"{k}: {100 * ns / span:.0f}%" for k, ns in sorted(spans.items())), "\n")
  print("| class | thread ms / step | share |\n|---|---:|---:|")
  for kind in CLASSES:
    print(f"| {kind} | {by_class[kind] / per_step:.1f} | {100 * by_class[kind] / total:.1f}% |")
  print("\nthe costliest (class, scope) groups:\n\n| class | scope | thread ms / step | share |\n|---|---|---:|---:|")
  for (kind, scope), ns in by_scope.most_common(args.top):
    print(f"| {kind} | {scope or '-'} | {ns / per_step:.1f} | {100 * ns / total:.1f}% |")


if __name__ == "__main__":
  main()
