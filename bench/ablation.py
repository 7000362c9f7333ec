r"""The paper's "with vs without EMCL" ablation: the default config with emcl_weight 1 and 0, several seeds each, the
evaluation suite on every run, and a table of every metric as mean ± std per arm. emcl_weight is the weight of the
CXR<->ECG edge, `config.loss.edges.cxr_ecg.weight` (MEDBind's lambda), set through the config argument.

  python -m bench.ablation --root workdirs/ablation --out docs/ablation_emcl.md          # 2 arms x 3 seeds
  python -m bench.ablation --root /tmp/ablation --steps 20 --seeds 0 --out /tmp/ablation/table.md  # a quick check

Run <root>/emcl<W>_seed<S> is `configs/medbind.py:seed=S,emcl_weight=W[,steps=N]` (plus --config_arg and --set
overrides); all runs share <root>/cache for the frozen text-trunk features and the synthetic world in data.dir. A
run whose eval/metrics.json is at its last step is not trained again, and an interrupted one resumes from its own
checkpoint, so after an interruption the same command carries on.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
import shlex
import sys
from typing import Callable, Sequence

import ml_collections
import numpy as np

from configs import medbind
from medbind_jax import train

log = logging.getLogger("medbind_jax.ablation")

# Bookkeeping, not measurements of the model: left out of the comparison.
_NOT_METRICS = re.compile(r"(/num_\w+|/gallery_size|/chance@\d+|/chance_balanced_accuracy|^step)$")
# The rows repeated at the top of the table.
_HEADLINE = re.compile(r"^(retrieval/rsum|retrieval/(cxr_to_ecg|ecg_to_cxr)/R@\d+|retrieval/\w+_to_text/R@1"
                       r"|retrieval_within_findings/\w+/(R@1|pairwise_accuracy)|cross_modal/[^/]+/balanced_accuracy"
                       r"|zero_shot/[^/]+/macro_auroc|few_shot/[^/]+/macro/\d+-shot/auroc_mean)$")


def workdir_of(root: str, weight: float, seed: int) -> str:
  return os.path.join(root, f"emcl{weight:g}_seed{seed}")


def default_config(seed: int, weight: float, *, steps: int = 0, config_arg: str = "",
                   overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`configs/medbind.py:seed=S,emcl_weight=W[,steps=N][,config_arg]` with `path.to.field=value` overrides
  (e.g. `loss.edges.cxr_ecg.negatives=all`); `emcl_weight=W` sets `config.loss.edges.cxr_ecg.weight`."""
  arg = ",".join(filter(None, [f"seed={seed}", f"emcl_weight={weight}", f"steps={steps}" if steps else "",
                               config_arg]))
  config = medbind.get_config(arg)
  config.lock()  # an override of a field that does not exist is a typo: fail instead of adding it
  for item in overrides:
    path, _, value = item.partition("=")
    *parents, leaf = path.split(".")
    target = config
    for p in parents:
      target = target[p]
    try:
      target[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      target[leaf] = value  # a plain string
  return config


def finished_metrics(workdir: str, total_steps: int) -> dict[str, float] | None:
  """The run's evaluation if it was made at its last step, else None."""
  path = os.path.join(workdir, "eval", "metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    metrics = json.load(f)
  return metrics if metrics.get("step") == total_steps else None


def run_arms(root: str, seeds: Sequence[int], weights: Sequence[float],
             make_config: Callable[[int, float], ml_collections.ConfigDict]) -> dict[float, list[dict[str, float]]]:
  """Trains and evaluates every (weight, seed) not finished yet; returns {weight: [metrics per seed]}."""
  results: dict[float, list[dict[str, float]]] = {w: [] for w in weights}
  for weight in weights:
    for seed in seeds:
      config = make_config(seed, weight)
      if not config.get("cache_dir"):
        config.cache_dir = os.path.join(root, "cache")
      workdir = workdir_of(root, weight, seed)
      metrics = finished_metrics(workdir, config.total_steps)
      if metrics is None:
        log.info("training emcl_weight=%g seed=%d in %s", weight, seed, workdir)
        train.train_and_evaluate(config, workdir)
        metrics = finished_metrics(workdir, config.total_steps)
        if metrics is None:
          raise RuntimeError(f"{workdir} finished without eval/metrics.json at step {config.total_steps}")
      else:
        log.info("emcl_weight=%g seed=%d already finished in %s", weight, seed, workdir)
      results[weight].append(metrics)
  return results


def _cell(values: list[float]) -> str:
  if not values:
    return "–"
  text = f"{np.mean(values):.4f} ± {np.std(values):.4f}"
  return text if len(values) > 1 else f"{values[0]:.4f}"


def comparison_table(results: dict[float, list[dict[str, float]]], *, command: str, steps: int) -> str:
  """Markdown: every metric (bookkeeping counts and chance levels left out) as mean ± std over seeds per arm, and
  the difference of the means (first arm minus second)."""
  weights = list(results)
  keys = sorted({k for runs in results.values() for run in runs for k, v in run.items()
                 if not _NOT_METRICS.search(k) and isinstance(v, (int, float))})
  seeds = {w: len(runs) for w, runs in results.items()}
  header = ("| metric | " + " | ".join(f"emcl_weight={w:g} (n={seeds[w]})" for w in weights)
            + (" | difference |" if len(weights) == 2 else " |"))
  rule = "|---|" + "---:|" * (len(weights) + (len(weights) == 2))

  def row(key: str) -> str:
    values = {w: [run[key] for run in results[w] if key in run] for w in weights}
    cells = [_cell(values[w]) for w in weights]
    if len(weights) == 2:
      a, b = values[weights[0]], values[weights[1]]
      cells.append(f"{np.mean(a) - np.mean(b):+.4f}" if a and b else "–")
    return f"| {key} | " + " | ".join(cells) + " |"

  lines = ["# EMCL ablation: with vs without the CXR<->ECG loss", "",
           f"Command: `{command}`", "",
           f"Default config (`configs/medbind.py`){f', {steps} steps' if steps else ''}; per arm, the mean ± std "
           "(population std) over seeds of each run's final evaluation on the test split. The difference is "
           f"emcl_weight={weights[0]:g} minus emcl_weight={weights[-1]:g}. Retrieval R@K are fractions, RSUM is in "
           "percent. Counts and chance levels are in each run's eval/metrics.json.", "",
           "## Headline", "", header, rule, *[row(k) for k in keys if _HEADLINE.search(k)], "",
           "## Every metric", ""]
  for section in sorted({k.split("/")[0] for k in keys}):
    lines += [f"### {section}", "", header, rule, *[row(k) for k in keys if k.split("/")[0] == section], ""]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, help="one workdir per run is made under it")
  parser.add_argument("--out", default="docs/ablation_emcl.md", help="the comparison table (markdown)")
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3 for the real ablation)")
  parser.add_argument("--weights", default="1,0",
                      help="comma-separated emcl_weight values (loss.edges.cxr_ecg.weight), one arm each")
  parser.add_argument("--steps", type=int, default=0, help="training steps per run (0: the config's default)")
  parser.add_argument("--config_arg", default="", help="extra configs/medbind.py arguments, e.g. batch_size=64")
  parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                      help="config field override, e.g. --set eval.plot_points=200 (repeatable)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  logging.getLogger("medbind_jax").setLevel(logging.INFO)
  seeds = [int(s) for s in args.seeds.split(",")]
  weights = [float(w) for w in args.weights.split(",")]
  if len(seeds) < 3:
    log.warning("%d seed(s) per arm: the ablation asks for at least 3", len(seeds))
  results = run_arms(args.root, seeds, weights, lambda seed, weight: default_config(
      seed, weight, steps=args.steps, config_arg=args.config_arg, overrides=args.set))
  command = "python -m bench.ablation " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(comparison_table(results, command=command, steps=args.steps))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
