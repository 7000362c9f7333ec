"""Timing shared by the benchmarks: several callables measured in interleaved rounds, so that a burst of load on the
shared machines falls on all of them rather than on one, and ratios taken within the run stay comparable."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, rounds: int = 4,
                        settle: bool = True) -> dict[str, float]:
  """Median wall seconds of each callable over `repeats` timed calls (at least one per visit), taken in `rounds`
  rounds that visit every callable in turn. With `settle`, each visit starts with an untimed call (the first one
  also compiles): the previous callable's threads (torch's OpenMP workers spin after their work) must not be
  charged to the next one. Without it the callables must be warm already."""
  times = {name: [] for name in fns}
  per_visit = max(1, -(-repeats // rounds))
  for _ in range(rounds):
    for name, fn in fns.items():
      if settle:
        fn()
      for _ in range(per_visit):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}
