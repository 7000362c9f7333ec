"""Scalars to TensorBoard event files (tensorboardX: no TensorFlow needed) and to a JSON-lines file.

Only process 0 writes. On resume, `truncate_after(step)` drops JSON lines of steps the restored state has not
done yet, so the file never shows a step twice.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax


class MetricWriter:

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for name, value in scalars.items():
      value = float(value)
      row[name] = value if math.isfinite(value) else str(value)
      self._tb.add_scalar(name, value, int(step))
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
