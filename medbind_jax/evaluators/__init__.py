"""Evaluators for MEDBind-JAX (DESIGN.md section 7), chosen by name in `config.eval.evaluators`.

Every evaluator has one contract: built once with the split's `common.SplitEmbedder` (and the protocol), then
`evaluator.run(params) -> {name: value}` at any step; `summary(results)` picks its headline numbers and
`table(results)` formats its markdown; `notes` lists what its last run skipped and why. `build(config.eval, data)`
returns a `Suite` that runs the named evaluators on one set of params (each record embedded once) and writes the
report (`report.py`); the probes fit on a second split (`support`, the training split by default). `MultiSuite`
runs one Suite per evaluation dataset (`config.eval.datasets`), namespacing each one's metrics by its name, and
writes one report over all of them with the aggregate RSUM per modality.

The metric kernels live in `medbind_jax.evaluators.metrics`: pure numpy, unit-tested apart from the data plumbing.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

from medbind_jax import paths
from medbind_jax.evaluators import common, cross_modal, few_shot, report, retrieval, zero_shot
from medbind_jax.evaluators import protocol as protocol_lib

log = logging.getLogger(__name__)

# name -> (data, support, protocol, config.eval, edges) -> evaluator; `support`: the split probes fit on (None:
# the evaluated split itself).
EVALUATORS: dict[str, Callable] = {
    "retrieval": lambda data, support, protocol, cfg, edges: retrieval.RetrievalEvaluator(
        data, [e.modality for e in edges if e.uses_text], [e.modalities for e in edges if e.kind == "pair"],
        ks=tuple(cfg.ks)),
    "zero_shot": lambda data, support, protocol, cfg, edges: zero_shot.ZeroShotEvaluator(data, protocol),
    "few_shot": lambda data, support, protocol, cfg, edges: few_shot.FewShotEvaluator(
        data, protocol, support=support, shots=tuple(cfg.few_shot.shots), seeds=cfg.few_shot.seeds,
        l2=cfg.few_shot.l2),
    "linear_probe": lambda data, support, protocol, cfg, edges: few_shot.LinearProbeEvaluator(
        data, protocol, support=support, fractions=tuple(cfg.linear_probe.fractions), seeds=cfg.linear_probe.seeds,
        l2=cfg.linear_probe.l2),
    "cross_modal": lambda data, support, protocol, cfg, edges: cross_modal.CrossModalEvaluator(data, protocol),
}


class Suite:
  """The configured evaluators over one split (and the support split the probes fit on)."""

  def __init__(self, evaluators: Mapping, data: common.SplitEmbedder, protocol: protocol_lib.Protocol, *,
               plots: bool = True, plot_points: int = 300, support: common.SplitEmbedder | None = None,
               ks=(1, 5, 10)):
    self.evaluators, self.data, self.protocol, self.support = dict(evaluators), data, protocol, support
    self.plots, self.plot_points, self.ks = plots, plot_points, tuple(ks)

  def run(self, params, *, report_dir: str | None = None, step: int | None = None) -> dict[str, float]:
    """Every evaluator's results; with `report_dir`, also writes metrics.json, report.md and the plots there."""
    try:
      results: dict[str, float] = {}
      for name, evaluator in self.evaluators.items():
        start = time.perf_counter()
        results.update(evaluator.run(params))
        log.info("evaluator %s: %.1f s", name, time.perf_counter() - start)
      if report_dir is not None:
        start = time.perf_counter()
        report.write(report_dir, results, step=step, evaluators=self.evaluators, data=self.data, params=params,
                     protocol=self.protocol, plots=self.plots, plot_points=self.plot_points)
        log.info("evaluation report in %s (%.1f s)", report_dir, time.perf_counter() - start)
      return results
    finally:
      self.data.release()
      if self.support is not None:
        self.support.release()

  def summary_table(self, results: Mapping[str, float]) -> str:
    return report.summary_table(results, self.evaluators)

  def printed(self, results: Mapping[str, float]) -> str:
    """What a run prints: the headline numbers and, with retrieval, its R@K table."""
    out = self.summary_table(results)
    if "retrieval" in self.evaluators:
      out += ("\n\nRetrieval (R@K in %, chance level in brackets):\n"
              + retrieval.format_table(dict(results), ks=self.ks))
    return out


class MultiSuite:
  """One `Suite` per evaluation dataset, by name. `run` returns every suite's metrics as '<name>/<metric>' plus
  `aggregate/...` (report.aggregate: the RSUM of each modality's text retrieval summed over the datasets that
  have it, the paper's "CXR modality aggregate"), and with a report dir writes each suite's report into
  `<dir>/<name>/` and the combined one into `<dir>`."""

  def __init__(self, suites: Mapping[str, Suite]):
    if not suites:
      raise ValueError("MultiSuite needs at least one evaluation dataset")
    self.suites = dict(suites)

  def run(self, params, *, report_dir: str | None = None, step: int | None = None) -> dict[str, float]:
    per_dataset = {}
    for name, suite in self.suites.items():
      log.info("evaluating dataset %s (%s/%s)", name, suite.data.index.data_dir, suite.data.index.split)
      per_dataset[name] = suite.run(params, step=step,
                                    report_dir=None if report_dir is None else paths.join(report_dir, name))
    results = {f"{name}/{k}": v for name, values in per_dataset.items() for k, v in values.items()}
    results.update(report.aggregate(per_dataset, ks=next(iter(self.suites.values())).ks))
    if report_dir is not None:
      report.write_multi(report_dir, results, per_dataset, self.suites, step=step)
    return results

  def printed(self, results: Mapping[str, float]) -> str:
    parts = []
    for name, suite in self.suites.items():
      own = {k[len(name) + 1:]: v for k, v in results.items() if k.startswith(name + "/")}
      parts.append(f"[{name}] {suite.data.index.data_dir} ({suite.data.index.split}):\n{suite.printed(own)}")
    parts.append(report.aggregate_table(results))
    return "\n\n".join(parts)


def build(eval_config, data: common.SplitEmbedder, edges=(), *, support: common.SplitEmbedder | None = None,
          protocol: str | None = None) -> Suite:
  """The suite `eval_config` (config.eval) names, over `data`, for a model trained on `edges` (losses.Edge), the
  probes fitted on `support`; `protocol` overrides `eval_config.protocol`."""
  names = tuple(eval_config.evaluators)
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown:
    raise ValueError(f"unknown evaluator(s) {unknown} in config.eval.evaluators; known: {sorted(EVALUATORS)}")
  protocol = protocol_lib.load(protocol or eval_config.protocol)
  return Suite({n: EVALUATORS[n](data, support, protocol, eval_config, edges) for n in names}, data, protocol,
               plots=eval_config.plots, plot_points=eval_config.plot_points, support=support,
               ks=tuple(eval_config.ks))
