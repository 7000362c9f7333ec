"""Evaluation protocols as versioned data: prompt ensembles, multi-class tasks and cross-modal label pairs.

A protocol is a JSON file (`protocols/<name>.json` in this package, or any path) with a "version" and:

  prompts            {modality: {label: {"positive": [texts], "negative": [texts]}}}: zero-shot prompt ensembles
                     stating a finding and its absence.
  multiclass_tasks   [{"name", "modality", "classes"}]: single-label problems over the examples where exactly one of
                     `classes` is positive (used by zero-shot and few-shot; a modality's first task also colours
                     the report's embedding map).
  cross_modal_tasks  [{"name", "query", "query_label", "support", "support_label"}]: queries of one modality
                     classified with support examples of the other, labelled with a finding the world links.

Modalities are codec names ('cxr', 'ecg', or any registered one); label names refer to the dataset's
`<modality>_label_names`; tasks naming modalities or labels a dataset lacks are
skipped by the evaluators with a logged reason, so one protocol can be run on any data.
"""

from __future__ import annotations

import dataclasses
import json
import os

from medbind_jax import paths

TEXT = "text"  # reports, not a modality a protocol classifies
_PACKAGED = os.path.join(os.path.dirname(__file__), "protocols")


@dataclasses.dataclass(frozen=True)
class Prompts:
  positive: tuple[str, ...]
  negative: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class MulticlassTask:
  name: str
  modality: str
  classes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CrossModalTask:
  name: str
  query: str
  query_label: str
  support: str
  support_label: str


@dataclasses.dataclass(frozen=True)
class Protocol:
  version: str
  prompts: dict[str, dict[str, Prompts]]
  multiclass_tasks: tuple[MulticlassTask, ...]
  cross_modal_tasks: tuple[CrossModalTask, ...]


def packaged() -> list[str]:
  """The protocols packaged with this module (files of the installed package: local by definition)."""
  return sorted(f[:-len(".json")] for f in os.listdir(_PACKAGED) if f.endswith(".json"))


def load(name_or_path: str) -> Protocol:
  """Loads a packaged protocol by name (e.g. 'synthetic_v1') or a JSON file by path (local or a URI), checking its
  structure."""
  path = name_or_path if name_or_path.endswith(".json") else os.path.join(_PACKAGED, name_or_path + ".json")
  if not paths.exists(path):
    raise FileNotFoundError(f"no evaluation protocol {name_or_path!r}: give a JSON path or one of {packaged()}")
  raw = json.loads(paths.read_text(path))

  def fail(message):
    raise ValueError(f"{path}: {message}")

  if not raw.get("version"):
    fail('needs a non-empty "version"')
  prompts: dict[str, dict[str, Prompts]] = {}
  for modality, by_label in raw.get("prompts", {}).items():
    if not modality or modality == TEXT:
      fail(f"prompts must be keyed by an input modality (e.g. 'cxr'), got {modality!r}")
    prompts[modality] = {}
    for label, entry in by_label.items():
      if not entry.get("positive") or not entry.get("negative"):
        fail(f"prompts/{modality}/{label} needs non-empty 'positive' and 'negative' lists")
      prompts[modality][label] = Prompts(tuple(entry["positive"]), tuple(entry["negative"]))
  multiclass = []
  for task in raw.get("multiclass_tasks", []):
    if task.get("modality") in (None, "", TEXT) or len(task.get("classes", [])) < 2:
      fail(f"multiclass task {task.get('name')!r} needs an input modality and at least 2 classes")
    multiclass.append(MulticlassTask(task["name"], task["modality"], tuple(task["classes"])))
  cross = []
  for task in raw.get("cross_modal_tasks", []):
    query, support = task.get("query"), task.get("support")
    if not query or not support or query == support or TEXT in (query, support):
      fail(f"cross-modal task {task.get('name')!r}: query and support must be two different input modalities")
    cross.append(CrossModalTask(task["name"], task["query"], task["query_label"], task["support"],
                                task["support_label"]))
  names = [t.name for t in multiclass] + [t.name for t in cross]
  if len(set(names)) != len(names):
    fail(f"task names must be unique, got {names}")
  return Protocol(raw["version"], prompts, tuple(multiclass), tuple(cross))
