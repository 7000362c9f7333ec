"""Training mixtures: several converted datasets in one run, each feeding the edges whose modalities it has.

`config.data.sources` lists the datasets, each {dir, split = 'train', weight = 1.0, weights = {edge: weight},
name = the dir's last component}. Their split indexes are concatenated into one `SplitIndex` (record numbers run
over the sources in order), and every pool of the batch layout (`pipeline.Layout`: the rows of each modality, and
the linked rows of the pair edges) is a weighted mixture of the pools of the sources that have it:

  pool of modality M   records with M, from every source that has them, weighted by the source's weight for
                       the edge that draws M's rows (a tmcl/sigmoid edge of M, else the pair edge M belongs to);
  linked pool          linked records with both modalities of the pair edges, from the sources that have them
                       (a `pair` edge draws only from linked records), weighted by the weight for the pair edge.

Each source's part of a pool is its own endless stream, shuffled with a seed of (run seed, pool, source) and
reshuffled every epoch; `grain.MapDataset.mix` interleaves the streams deterministically in proportion to the
weights. So a pool is still an indexable function of the seed alone, and the global step's batch (record ids,
augmentation) depends only on seed, step and device count: the grain iterator's position restores every source
exactly. With one source the pools are those of a single-directory run, item for item.

A source that serves none of the configured edges, an edge that no source serves, and a weight for an edge the
run does not have are errors that name the source and the edge.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import grain
import numpy as np

LINKED = "/linked"  # pipeline.LINKED (kept apart from every modality name by its '/')


@dataclasses.dataclass(frozen=True)
class Source:
  """One dataset of a mixture. `weights` (edge name -> weight) overrides `weight` for the pools those edges draw."""

  dir: str
  split: str = "train"
  weight: float = 1.0
  weights: Mapping[str, float] = dataclasses.field(default_factory=dict)
  name: str = ""

  @property
  def label(self) -> str:
    return self.name or os.path.basename(str(self.dir).rstrip("/")) or str(self.dir)


_KEYS = {f.name for f in dataclasses.fields(Source)}


def sources_from_config(data_config) -> list[Source]:
  """`config.data.sources` as Sources; empty: the one source `config.data.dir` / `config.data.train_split`."""
  entries = [dict(e) for e in (data_config.get("sources") or ())]
  if not entries:
    return [Source(data_config.dir, data_config.train_split)]
  out = []
  for i, entry in enumerate(entries):
    unknown = sorted(set(entry) - _KEYS)
    if unknown or not entry.get("dir"):
      raise ValueError(f"config.data.sources[{i}] = {entry}: each source needs a 'dir' (a converted data "
                       f"directory) and may set 'split', 'weight', 'weights' ({{edge name: weight}}) and 'name'"
                       + (f"; unknown keys {unknown}" if unknown else ""))
    source = Source(**{**entry, "weights": dict(entry.get("weights") or {})})
    bad = [w for w in [source.weight, *source.weights.values()] if not (isinstance(w, (int, float)) and w >= 0)]
    if bad:
      raise ValueError(f"config.data.sources[{i}] ({source.label}): weights must be numbers >= 0, got {bad}")
    out.append(source)
  labels = [s.label for s in out]
  if len(set(labels)) != len(labels):
    raise ValueError(f"config.data.sources: two sources share a name ({labels}); give each a distinct 'name'")
  return out


def pool_edges(edges: Sequence, layout) -> dict[str, str]:
  """Pool -> the edge whose weight it takes: a modality's rows follow its tmcl/sigmoid edge (the first one), else
  the pair edge it belongs to; the linked pool follows the first pair edge."""
  out = {}
  for edge in edges:
    if edge.uses_text:
      out.setdefault(edge.modality, edge.name)
  for edge in edges:
    if edge.kind == "pair":
      out.setdefault(LINKED, edge.name)
      for m in edge.modalities:
        out.setdefault(m, edge.name)
  return {pool: name for pool, name in out.items() if pool == LINKED or pool in layout.modalities}


def source_pools(index, layout) -> dict[str, np.ndarray]:
  """Record numbers (within `index`, one source's SplitIndex) of each pool of `layout`."""
  pools = {m: index.pool(m) for m in layout.modalities}
  if layout.pair_edges:
    pools[LINKED] = index.linked_pool(layout.linked_modalities)
  return pools


def check_sources(sources: Sequence[Source], per_source: Sequence[Mapping[str, np.ndarray]], edges: Sequence,
                  layout, linked_per_batch: int) -> None:
  """Raises when a source serves no edge, an edge has no source, or a source weights an edge the run lacks."""
  names = [e.name for e in edges]

  def serves(pools, edge) -> bool:
    if edge.kind == "pair":
      return len(pools.get(LINKED, ())) > 0
    return len(pools.get(edge.modality, ())) > 0

  for source, pools in zip(sources, per_source):
    unknown = sorted(set(source.weights) - set(names))
    if unknown:
      raise ValueError(f"source {source.label} ({source.dir}) weights edges {unknown} that the run does not have "
                       f"(its edges: {names}); fix the edge names in config.data.sources")
    if not any(serves(pools, e) for e in edges):
      has = [m for m in layout.modalities if len(pools.get(m, ()))]
      edge_list = ", ".join(f"{e.name}: {'+'.join(e.modalities)}" for e in edges)
      raise ValueError(f"source {source.label} ({source.dir}, split {source.split}) serves none of the run's edges "
                       f"({edge_list}): it has records of "
                       f"{has or 'none of their modalities'}. Remove it from config.data.sources or add an edge "
                       "for its modalities to config.loss.edges.")
  for edge in edges:
    if edge.kind == "pair" and not linked_per_batch:
      continue
    if not any(serves(pools, edge) for pools in per_source):
      what = ("linked records with both " + " and ".join(edge.modalities) if edge.kind == "pair"
              else f"records with {edge.modality} and its report")
      raise ValueError(f"edge {edge.name} has no source: none of {[s.label for s in sources]} has {what}. Add a "
                       f"source that has them to config.data.sources, or drop the edge (configs/medbind.py "
                       f"edges=...).")


def mixed_pools(sources: Sequence[Source], per_source: Sequence[Mapping[str, np.ndarray]], offsets: Sequence[int],
                edges: Sequence, layout, seed: int) -> dict[str, Any]:
  """Pool -> an endless indexable stream of record numbers of the combined index (see the module docstring);
  an empty list for a pool no source has."""
  by_pool = pool_edges(edges, layout)
  kinds = (LINKED,) + tuple(layout.modalities)
  out = {}
  for position, kind in enumerate(kinds):
    streams, weights = [], []
    for s, (source, pools, offset) in enumerate(zip(sources, per_source, offsets)):
      records = pools.get(kind, np.zeros(0, np.int64))
      weight = float(source.weights.get(by_pool.get(kind, ""), source.weight))
      if not len(records) or weight == 0:
        continue
      # Source 0's seed is a single-directory run's, so one source gives its pools item for item.
      stream_seed = seed * (1 + len(layout.modalities)) + position + 7919 * s
      streams.append(grain.MapDataset.source(np.asarray(records) + offset).shuffle(seed=stream_seed).repeat())
      weights.append(weight)
    if not streams:
      out[kind] = []
    elif len(streams) == 1:
      out[kind] = streams[0]
    else:
      out[kind] = grain.MapDataset.mix(streams, weights)
  return out


def combine(indexes: Sequence) -> tuple[Any, list[int]]:
  """One SplitIndex over several sources' (records in source order) and each source's first record number.
  One index is returned as it is."""
  from medbind_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  offsets = list(np.cumsum([0] + [len(i.records) for i in indexes[:-1]]).astype(int))
  if len(indexes) == 1:
    return indexes[0], offsets
  info = {"name": "mixture", "sources": [{"dir": i.data_dir, "split": i.split, "name": i.info.get("name"),
                                          "num_records": len(i.records)} for i in indexes]}
  return pipeline.SplitIndex(
      data_dir=", ".join(str(i.data_dir) for i in indexes), split="+".join(sorted({i.split for i in indexes})),
      records=[r for i in indexes for r in i.records], info=info,
      skipped=[s for i in indexes for s in i.skipped], num_missing=sum(i.num_missing for i in indexes)), offsets
