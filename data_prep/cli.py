"""The converters' shared command line: `Options` and the flags every `python -m data_prep.<dataset>` takes.

`add_common_args` / `options_from_args`: --src --out --workers --shard-size --max-error-rate --overwrite
--no-progress, plus --sampling-rate --num-samples (ECG) and --image-size (CXR); `parse_fractions` for
--split-fractions; `setup_logging`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os


@dataclasses.dataclass(frozen=True)
class Options:
  """Options shared by all converters.

  shard_size, sampling_rate, num_samples and image_size change the output (they are part of the resume
  fingerprint); workers, max_error_rate, progress and overwrite do not.
  """

  shard_size: int = 1000  # records per shard (tasks per shard: failed records leave a shard shorter)
  workers: int = 1  # processes; 1 converts in this process
  max_error_rate: float = 0.05  # exit non-zero when failed / planned records exceeds this
  sampling_rate: float = 500.0  # ECG output rate, Hz
  num_samples: int = 5000  # ECG output length: longer records keep their first num_samples; 0 keeps all
  image_size: int = 512  # CXR: longest side above this is downscaled (to PNG); 0 keeps the original bytes
  progress: bool = True
  overwrite: bool = False  # replace the output of a run with another plan or options instead of refusing

  def __post_init__(self):
    if self.shard_size < 1:
      raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
    if not 0.0 <= self.max_error_rate <= 1.0:
      raise ValueError(f"--max-error-rate must lie in [0, 1], got {self.max_error_rate}")
    if not self.sampling_rate > 0:
      raise ValueError(f"--sampling-rate must be positive, got {self.sampling_rate}")
    if self.num_samples < 0 or self.image_size < 0:
      raise ValueError("--num-samples and --image-size must be >= 0 (0: keep the source's)")

  def output_options(self) -> dict:
    """The options that change the bytes written (recorded in dataset_info.json and the fingerprint)."""
    return {"shard_size": self.shard_size, "sampling_rate": self.sampling_rate, "num_samples": self.num_samples,
            "image_size": self.image_size}


def add_common_args(parser: argparse.ArgumentParser, *, ecg: bool = False, cxr: bool = False,
                    src_help: str = "dataset root, laid out as distributed (see the module docstring)") -> None:
  defaults = Options()
  parser.add_argument("--src", required=True, help=src_help)
  parser.add_argument("--out", required=True, help="output directory for shards and dataset_info.json")
  parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                      help="worker processes (1: convert in this process); the output does not depend on it")
  parser.add_argument("--shard-size", type=int, default=defaults.shard_size, help="records per shard")
  parser.add_argument("--max-error-rate", type=float, default=defaults.max_error_rate,
                      help="exit with status 1 when the share of failed records exceeds this")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an output directory converted with another plan or other options")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  if ecg:
    parser.add_argument("--sampling-rate", type=float, default=defaults.sampling_rate,
                        help="ECG output sampling rate in Hz (polyphase resampling when it differs)")
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples,
                        help="ECG output length in samples: longer records keep the first ones; 0 keeps all")
  if cxr:
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help="downscale images whose longest side exceeds this (re-encoded as 8-bit PNG); "
                             "0 keeps the original bytes")


def options_from_args(args: argparse.Namespace) -> Options:
  defaults = Options()
  return Options(shard_size=args.shard_size, workers=max(1, args.workers), max_error_rate=args.max_error_rate,
                 sampling_rate=getattr(args, "sampling_rate", defaults.sampling_rate),
                 num_samples=getattr(args, "num_samples", defaults.num_samples),
                 image_size=getattr(args, "image_size", defaults.image_size),
                 progress=not args.no_progress, overwrite=args.overwrite)


def parse_fractions(text: str) -> tuple[float, float, float]:
  """'0.8,0.1,0.1' -> (train, val, test) fractions; they must be non-negative and sum to 1."""
  parts = tuple(float(x) for x in text.split(","))
  if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6:
    raise argparse.ArgumentTypeError(f"expected three non-negative fractions summing to 1, got {text!r}")
  return parts


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
