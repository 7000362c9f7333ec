"""Evaluators for MEDBind-JAX (DESIGN.md section 7), chosen by name in `config.eval.evaluators`.

Every evaluator has one contract: built once with the split's `common.SplitEmbedder` (and the protocol), then
`evaluator.run(params) -> {name: value}` at any step; `summary(results)` picks its headline numbers and
`table(results)` formats its markdown; `notes` lists what its last run skipped and why. `build(config.eval, data)`
returns a `Suite` that runs the named evaluators on one set of params (each record embedded once) and writes the
report (`report.py`).

The metric kernels live in `medbind_jax.evaluators.metrics`: pure numpy, unit-tested apart from the data plumbing.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

from medbind_jax.evaluators import common, cross_modal, few_shot, report, retrieval, zero_shot
from medbind_jax.evaluators import protocol as protocol_lib

log = logging.getLogger(__name__)

# name -> (data, protocol, config.eval, edges) -> evaluator
EVALUATORS: dict[str, Callable] = {
    "retrieval": lambda data, protocol, cfg, edges: retrieval.RetrievalEvaluator(
        data, [e.modality for e in edges if e.uses_text], [e.modalities for e in edges if e.kind == "pair"],
        ks=tuple(cfg.ks)),
    "zero_shot": lambda data, protocol, cfg, edges: zero_shot.ZeroShotEvaluator(data, protocol),
    "few_shot": lambda data, protocol, cfg, edges: few_shot.FewShotEvaluator(
        data, protocol, shots=tuple(cfg.few_shot.shots), seeds=cfg.few_shot.seeds, l2=cfg.few_shot.l2),
    "cross_modal": lambda data, protocol, cfg, edges: cross_modal.CrossModalEvaluator(data, protocol),
}


class Suite:
  """The configured evaluators over one split."""

  def __init__(self, evaluators: Mapping, data: common.SplitEmbedder, protocol: protocol_lib.Protocol, *,
               plots: bool = True, plot_points: int = 300):
    self.evaluators, self.data, self.protocol = dict(evaluators), data, protocol
    self.plots, self.plot_points = plots, plot_points

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

  def summary_table(self, results: Mapping[str, float]) -> str:
    return report.summary_table(results, self.evaluators)


def build(eval_config, data: common.SplitEmbedder, edges=()) -> Suite:
  """The suite `eval_config` (config.eval) names, over `data`, for a model trained on `edges` (losses.Edge)."""
  names = tuple(eval_config.evaluators)
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown:
    raise ValueError(f"unknown evaluator(s) {unknown} in config.eval.evaluators; known: {sorted(EVALUATORS)}")
  protocol = protocol_lib.load(eval_config.protocol)
  return Suite({n: EVALUATORS[n](data, protocol, eval_config, edges) for n in names}, data, protocol,
               plots=eval_config.plots, plot_points=eval_config.plot_points)
