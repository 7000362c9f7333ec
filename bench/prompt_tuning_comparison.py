r"""The paper's LLM comparison on the synthetic world: which inputs let a LoRA-tuned decoder predict in-hospital
mortality and 30-day readmission, with the pretrained SmolLM2-135M-Instruct base (configs/prompt_tuning.py).

  python -m bench.prompt_tuning_comparison --root workdirs/pt_comparison --out docs/prompt_tuning.md
  python -m bench.prompt_tuning_comparison --root /tmp/ptc --smoke --out /tmp/ptc/table.md     # a quick check

Arms (both outcomes in every run; seeds 0, 1, 2 by default):
  a  facts                 patient facts only (age, sex, comorbidity count)
  b  facts+reports         + the written CXR and ECG reports
  c  facts+soft            + MEDBind soft tokens instead of the reports
  d  facts+reports+soft    + both
  e  facts+soft, unbound   + soft tokens from a MEDBind trained without the CXR<->ECG loss (lambda = 0)

The two MEDBind runs (lambda 1 and 0, `configs/medbind.py:emcl_weight=W`, seed 0) are trained first into
<root>/medbind_lambda1 and <root>/medbind_lambda0 on one synthetic world in <root>/world (or given with
--medbind_workdir / --unbound_workdir; they must share a world). Prompt-tuning run <root>/<arm>_seed<S> shares
<root>/cache (MEDBind embeddings, computed once per run and split) and <root>/jax_cache (compiled programs). A
finished run (eval/metrics.json at its last step) is not run again and an interrupted one resumes, so the same
command carries on after an interruption; per-run wall times are kept in <root>/timings.json.

Default sizes: 200 steps of 8 prompts per run (1,600 prompts, about a third of an epoch of the ~4,500 training
prompts of the default world's ~2,400 linked training encounters), every linked test encounter evaluated (~600
prompts), MEDBind runs of the default config's 1,000 steps: about 70 minutes per seed on 2 CPU cores. The table in
docs/prompt_tuning.md was made at half that (`--steps 100 --config_arg lr=3e-3 --medbind_arg steps=500`: about
40 minutes per seed). --out: a file with the markers below gets its comparison section replaced (the rest of
docs/prompt_tuning.md is kept); any other file is written with the section alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
import time
from typing import Sequence

import jax
import numpy as np

from configs import medbind as medbind_config
from configs import prompt_tuning as pt_config
from bench.ablation import finished_metrics
from medbind_jax import runs, train
from medbind_jax.llm import prompt_tuning

log = logging.getLogger("medbind_jax.prompt_tuning_comparison")

ARMS = {  # name: (prompt inputs, which MEDBind run embeds, description)
    "a": ("facts", "bound", "facts only"),
    "b": ("facts+reports", "bound", "+ written reports"),
    "c": ("facts+soft", "bound", "+ MEDBind soft tokens instead of reports"),
    "d": ("facts+reports+soft", "bound", "+ reports and soft tokens"),
    "e": ("facts+soft", "unbound", "+ soft tokens of an unbound MEDBind (lambda = 0)"),
}
OUTCOMES = ("in_hospital_mortality", "readmission_30d")
START, END = "<!-- comparison:start -->", "<!-- comparison:end -->"


def train_medbind(workdir: str, weight: float, world: str, *, config_arg: str, num_patients: int,
                  evaluators: Sequence[str]) -> str:
  """Trains (or finds finished) the MEDBind run of EMCL weight `weight` on the world in `world`."""
  config = medbind_config.get_config(",".join(filter(None, [f"emcl_weight={weight}", config_arg])))
  config.data.dir = world
  if num_patients:
    config.data.synthetic.num_patients = num_patients
  if evaluators:
    config.eval.evaluators = tuple(evaluators)
  steps = runs.checkpoint_steps(workdir) if os.path.isdir(workdir) else []
  if steps and steps[-1] == config.total_steps:
    log.info("MEDBind lambda=%g already trained in %s", weight, workdir)
    return workdir
  log.info("training MEDBind lambda=%g in %s", weight, workdir)
  train.train_and_evaluate(config, workdir)
  return workdir


def run_config(args, arm: str, seed: int, medbind_workdir: str):
  inputs = ARMS[arm][0]
  config = pt_config.get_config(
      f"medbind_workdir={medbind_workdir},inputs={inputs},seed={seed},steps={args.steps},batch_size={args.batch_size},"
      f"max_train_records={args.max_train_records},max_eval_records={args.max_eval_records}"
      + (f",{args.config_arg}" if args.config_arg else ""))
  config.cache_dir = os.path.join(args.root, "cache")
  return config


def _cell(values: list[float]) -> str:
  values = [v for v in values if np.isfinite(v)]
  if not values:
    return "n/a"
  return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


MEDBIND_COLUMNS = (("retrieval/cxr_to_ecg/R@10", "CXR->ECG R@10"), ("retrieval/ecg_to_cxr/R@10", "ECG->CXR R@10"),
                   ("retrieval/cxr_to_text/R@1", "CXR->text R@1"), ("retrieval/ecg_to_text/R@1", "ECG->text R@1"))


def _medbind_table(medbind: dict[str, str]) -> list[str]:
  """The MEDBind runs' own retrieval figures (their metrics.json), so the soft tokens' source can be judged."""
  lines = ["| MEDBind run | workdir | steps | " + " | ".join(name for _, name in MEDBIND_COLUMNS) + " |",
           "|---|---|---:|" + "---:|" * len(MEDBIND_COLUMNS)]
  for kind, workdir in medbind.items():
    path = os.path.join(workdir, "metrics.json")
    metrics = json.load(open(path)) if os.path.exists(path) else {}
    cells = [f"{100 * metrics[key]:.1f}%" if key in metrics else "n/a" for key, _ in MEDBIND_COLUMNS]
    steps = runs.checkpoint_steps(workdir) if os.path.isdir(workdir) else []
    lines.append(f"| {kind} | `{workdir}` | {steps[-1] if steps else 'n/a'} | " + " | ".join(cells) + " |")
  return lines


def comparison_section(results: dict[str, list[tuple[int, dict]]], timings: dict[str, float], args, *, command: str,
                       medbind: dict[str, str], sizes: dict[str, dict], config) -> str:
  """The docs section: settings, the MEDBind runs, mean ± std per arm, every run's figures, sizes and times.
  `results`: {arm: [(seed, eval metrics)]}; `config`: one run's config (the settings every run shares)."""
  metrics_of = [(outcome, metric) for outcome in OUTCOMES for metric in ("auroc", "balanced_accuracy")]
  header = ("mortality AUROC | mortality bal. acc. | readmission AUROC | readmission bal. acc.")
  lines = [START, "", "## 3. The comparison", "",
           f"Command: `{command}`", "",
           f"Base: SmolLM2-135M-Instruct (packaged GGUF, {config.model.dtype}), LoRA rank {config.lora.rank} "
           f"(alpha {config.lora.alpha:g}, dropout {config.lora.dropout:g}) on `{config.lora.targets}`, "
           f"{config.projector.tokens} soft tokens per modality, {config.total_steps} steps of "
           f"{config.data.batch_size} prompts, AdamW at learning rate {config.optim.learning_rate:g} "
           f"({config.optim.warmup_steps} warm-up steps, gradient clipping {config.optim.grad_clip_norm:g}), "
           "class-balanced loss, label-word scoring (logit Yes - logit No); test-split AUROC and balanced accuracy "
           "(score > 0) of each run, mean ± std (population) over seeds.", "",
           "The MEDBind runs whose embeddings the soft tokens carry (their own test-split retrieval):", "",
           *_medbind_table(medbind), "",
           f"| arm | inputs | seeds | {header} | run time (s, mean) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for arm, runs_ in results.items():
    cells = [_cell([m.get(f"{o}/{k}", float("nan")) for _, m in runs_]) for o, k in metrics_of]
    times = [timings[f"{arm}_seed{seed}"] for seed, _ in runs_ if f"{arm}_seed{seed}" in timings]
    lines.append(f"| ({arm}) {ARMS[arm][2]} | `{ARMS[arm][0]}` | {len(runs_)} | " + " | ".join(cells)
                 + (f" | {np.mean(times):.0f} |" if times else " | n/a |"))
  lines += ["", "Every run:", "", f"| arm | seed | {header} | run time (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
  for arm, runs_ in results.items():
    for seed, m in runs_:
      time_s = timings.get(f"{arm}_seed{seed}")
      lines.append(f"| ({arm}) | {seed} | " + " | ".join(f"{m.get(f'{o}/{k}', float('nan')):.3f}"
                                                        for o, k in metrics_of)
                   + (f" | {time_s:.0f} |" if time_s is not None else " | n/a |"))
  lines += ["", "Sizes per run (first seed): " + "; ".join(
      f"({arm}) {s['train_prompts']} training prompts of {s['train_tokens']} tokens (padded), {s['eval_prompts']} "
      f"test prompts, {s['trainable_params'] / 1e6:.2f}M trainable parameters" for arm, s in sizes.items()) + ".", ""]
  total = sum(timings.values())
  lines += [f"Total prompt-tuning time of these runs: {total / 3600:.2f} h on this machine's 2 CPU cores "
            f"(`{args.root}/timings.json`; each run's wall time: tuning, evaluation and compilation).", "", END]
  return "\n".join(lines)


def write_out(path: str, section: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  text = open(path).read() if os.path.exists(path) else ""
  if START in text and END in text:
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
  else:
    text = section + "\n"
  with open(path, "w") as f:
    f.write(text)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", required=True, help="the MEDBind runs, the world and one workdir per run go here")
  parser.add_argument("--out", default="docs/prompt_tuning.md")
  parser.add_argument("--arms", default="a,b,c,d,e", help=f"comma-separated, of {','.join(ARMS)}")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--tokens", type=int, default=4, help="soft tokens per modality")
  parser.add_argument("--lora_rank", type=int, default=8)
  parser.add_argument("--max_train_records", type=int, default=0, help="0: every linked training encounter")
  parser.add_argument("--max_eval_records", type=int, default=0, help="0: every linked test encounter")
  parser.add_argument("--config_arg", default="", help="extra configs/prompt_tuning.py arguments")
  parser.add_argument("--medbind_workdir", default="", help="a trained MEDBind run (lambda 1); default: trained here")
  parser.add_argument("--unbound_workdir", default="", help="a trained MEDBind run with lambda 0, on the same world")
  parser.add_argument("--medbind_arg", default="", help="configs/medbind.py arguments of the runs trained here")
  parser.add_argument("--medbind_evaluators", default="retrieval",
                      help="evaluators of the MEDBind runs trained here ('' : the config's full suite)")
  parser.add_argument("--num_patients", type=int, default=0, help="world size of the MEDBind runs trained here "
                      "(0: the config's 3,000 patients)")
  parser.add_argument("--smoke", action="store_true", help="1 seed, 4 steps, arms a and c, 32 train / 32 test "
                      "encounters, a 300-patient world and 20-step MEDBind runs (a check that it all runs)")
  args = parser.parse_args(argv)
  if args.smoke:
    args.seeds, args.steps, args.arms = "0", 4, "a,c"
    args.max_train_records, args.max_eval_records = args.max_train_records or 32, args.max_eval_records or 32
    args.medbind_arg = args.medbind_arg or "steps=20,batch_size=32"
    args.num_patients = args.num_patients or 300
  args.config_arg = ",".join(filter(None, [f"tokens={args.tokens},lora_rank={args.lora_rank}", args.config_arg]))
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
  logging.getLogger("medbind_jax").setLevel(logging.INFO)
  os.makedirs(args.root, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.root, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  arms = [a.strip() for a in args.arms.split(",")]
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    parser.error(f"unknown arm(s) {unknown}; known: {','.join(ARMS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  if len(seeds) < 3:
    log.warning("%d seed(s) per arm: the comparison asks for at least 3", len(seeds))

  world = os.path.join(args.root, "world")
  evaluators = tuple(e for e in args.medbind_evaluators.split(",") if e)
  medbind = {"bound": args.medbind_workdir, "unbound": args.unbound_workdir}
  for kind, weight in (("bound", 1.0), ("unbound", 0.0)):
    if not medbind[kind] and any(ARMS[a][1] == kind for a in arms):
      medbind[kind] = train_medbind(os.path.join(args.root, f"medbind_lambda{weight:g}"), weight, world,
                                    config_arg=args.medbind_arg, num_patients=args.num_patients,
                                    evaluators=evaluators)

  timings_path = os.path.join(args.root, "timings.json")
  timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
  results: dict[str, list[tuple[int, dict]]] = {a: [] for a in arms}
  sizes: dict[str, dict] = {}
  # Seed-major: every arm's seed 0 before any arm's seed 1, so an interrupted comparison has whole seeds.
  for seed in seeds:
    for arm in arms:
      name = f"{arm}_seed{seed}"
      workdir = os.path.join(args.root, name)
      config = run_config(args, arm, seed, medbind[ARMS[arm][1]])
      metrics = finished_metrics(workdir, config.total_steps)
      if metrics is None:
        log.info("arm (%s) %s, seed %d: %s", arm, ARMS[arm][0], seed, workdir)
        start = time.perf_counter()
        prompt_tuning.train_and_evaluate(config, workdir)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
        with open(timings_path, "w") as f:
          json.dump(timings, f, indent=2)
        metrics = finished_metrics(workdir, config.total_steps)
      results[arm].append((seed, metrics))
      if arm not in sizes and os.path.exists(os.path.join(workdir, prompt_tuning.SIZES_FILE)):
        sizes[arm] = json.load(open(os.path.join(workdir, prompt_tuning.SIZES_FILE)))
  command = "python -m bench.prompt_tuning_comparison " + " ".join(
      shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
  section = comparison_section(results, {k: v for k, v in timings.items() if k.split("_seed")[0] in arms}, args,
                               command=command, medbind={k: v for k, v in medbind.items() if v}, sizes=sizes,
                               config=run_config(args, arms[0], seeds[0], medbind[ARMS[arms[0]][1]]))
  write_out(args.out, section)
  print(section)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
