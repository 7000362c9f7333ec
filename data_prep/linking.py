"""CXR-ECG linking for EMCL: which chest X-ray and which ECG come from the same encounter.

The rule (`link_events`):

  1. Candidates: a CXR study and an ECG of the same subject such that
       - both carry an admission id (hadm_id): the ids are equal (different admissions never link, however
         close in time; one admission links however far apart in time), else
       - both times are known and |t_cxr - t_ecg| <= window (inclusive; default 24 h).
  2. One-to-one: each CXR and each ECG is in at most one pair (a record holds one of each). Candidates are taken
     greedily in the order (|dt|, cxr id, ecg id) (unknown |dt| last): the closest pairs first, ties broken by
     ids, so the result does not depend on input order.

`assign_admissions` fills hadm_id from MIMIC-IV's admissions table when the caller has it: an event belongs to
the admission of its subject whose [admittime, dischtime] contains its time (the earliest admittime, then the
smallest hadm_id, when several do). MIMIC-CXR-JPG and MIMIC-IV-ECG carry no hadm_id themselves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

DEFAULT_WINDOW_HOURS = 24.0


@dataclasses.dataclass(frozen=True)
class Event:
  """One CXR study or ECG: `time` in seconds since the epoch (NaN when unknown), `hadm_id` '' when unknown."""

  event_id: str
  subject_id: str
  time: float
  hadm_id: str = ""


@dataclasses.dataclass(frozen=True)
class Admission:
  subject_id: str
  hadm_id: str
  admit_time: float
  discharge_time: float


@dataclasses.dataclass
class LinkResult:
  pairs: list[tuple[str, str]]  # (cxr event_id, ecg event_id), sorted
  counts: dict[str, int]


def assign_admissions(events: Sequence[Event], admissions: Iterable[Admission]) -> list[Event]:
  """`events` with hadm_id set to the admission containing each event's time (see the module docstring)."""
  by_subject: dict[str, list[Admission]] = {}
  for adm in admissions:
    by_subject.setdefault(adm.subject_id, []).append(adm)
  for stays in by_subject.values():
    stays.sort(key=lambda a: (a.admit_time, a.hadm_id))
  out = []
  for event in events:
    hadm = ""
    for adm in by_subject.get(event.subject_id, ()):
      if adm.admit_time <= event.time <= adm.discharge_time:
        hadm = adm.hadm_id
        break
    out.append(dataclasses.replace(event, hadm_id=hadm) if hadm else event)
  return out


def _candidate(cxr: Event, ecg: Event, window_s: float) -> tuple[bool, float, bool]:
  """(is a candidate, |dt| (inf when unknown), by admission)."""
  dt = abs(cxr.time - ecg.time)
  dt = math.inf if math.isnan(dt) else dt
  if cxr.hadm_id and ecg.hadm_id:
    return cxr.hadm_id == ecg.hadm_id, dt, True
  return dt <= window_s, dt, False


def link_events(cxrs: Sequence[Event], ecgs: Sequence[Event],
                window_hours: float = DEFAULT_WINDOW_HOURS) -> LinkResult:
  """Pairs CXRs with ECGs by the module's rule; counts describe what happened.

  counts: cxr, ecg (inputs); candidate_pairs; linked_pairs; linked_by_admission / linked_by_window;
  cxr_with_several_candidates / ecg_with_several_candidates; cxr_candidates_lost / ecg_candidates_lost (had a
  candidate but ended unpaired because a closer pair took its partner).
  """
  window_s = window_hours * 3600.0
  ecgs_by_subject: dict[str, list[Event]] = {}
  for ecg in ecgs:
    ecgs_by_subject.setdefault(ecg.subject_id, []).append(ecg)
  candidates = []
  for cxr in cxrs:
    for ecg in ecgs_by_subject.get(cxr.subject_id, ()):
      ok, dt, by_admission = _candidate(cxr, ecg, window_s)
      if ok:
        candidates.append((dt, cxr.event_id, ecg.event_id, by_admission))
  candidates.sort()
  cxr_degree: dict[str, int] = {}
  ecg_degree: dict[str, int] = {}
  for _, c, e, _ in candidates:
    cxr_degree[c] = cxr_degree.get(c, 0) + 1
    ecg_degree[e] = ecg_degree.get(e, 0) + 1
  used_cxr: set[str] = set()
  used_ecg: set[str] = set()
  pairs, by_admission_count = [], 0
  for _, c, e, by_admission in candidates:
    if c in used_cxr or e in used_ecg:
      continue
    used_cxr.add(c)
    used_ecg.add(e)
    pairs.append((c, e))
    by_admission_count += by_admission
  counts = {
      "cxr": len(cxrs), "ecg": len(ecgs), "candidate_pairs": len(candidates), "linked_pairs": len(pairs),
      "linked_by_admission": by_admission_count, "linked_by_window": len(pairs) - by_admission_count,
      "cxr_with_several_candidates": sum(d > 1 for d in cxr_degree.values()),
      "ecg_with_several_candidates": sum(d > 1 for d in ecg_degree.values()),
      "cxr_candidates_lost": len(cxr_degree) - len(used_cxr),
      "ecg_candidates_lost": len(ecg_degree) - len(used_ecg),
  }
  return LinkResult(sorted(pairs), counts)
