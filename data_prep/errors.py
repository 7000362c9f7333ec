"""`RecordError`: a source record that cannot be converted (shared by the converters' helper modules)."""

from __future__ import annotations


class RecordError(Exception):
  """A source record that cannot be converted.

  `kind` is a short fixed category ("missing file", "empty report", ...) counted in dataset_info.json; the
  message (`kind: detail`) is the reason written to the error log.
  """

  def __init__(self, kind: str, detail: str = ""):
    self.kind, self.detail = kind, detail
    super().__init__(f"{kind}: {detail}" if detail else kind)
