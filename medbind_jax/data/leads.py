"""ECG lead names: the one rule by which every part of the package matches a signal's columns to the 12 leads.

The converters (`data_prep.ecg_io`), the training pipeline (`preprocess.canonical_leads`) and the inference API
(the ECG codec) all call `match_leads`, so a name is accepted or refused the same way everywhere.

Accepted spellings of a name (after surrounding whitespace is stripped; letters in any case):

  [sign][prefix]lead

  sign    optional single '-': the column holds the inverted lead (the Cabrera display's '-aVR'), so its values
          are -1 x the lead ('-Lead aVR' too); `match_leads` returns sign -1 for it and callers multiply the
          column by it
  prefix  optional 'lead', optionally followed by one ' ', '_' or '-' ('Lead I', 'lead_aVR', 'LEAD-V1', 'leadII')
  lead    I, II, III, aVR, aVL, aVF, V1 ... V6; for V1-V6 one optional ' ', '_' or '-' between the V and the digit
          ('V-3', 'v_4', 'V 5')

Refused (unrecognised), never guessed at:

  other leads       'V7', 'V3R', 'V4R', 'MLII', Frank 'vx'/'vy'/'vz', 'X', 'IV', 'V0'
  other signs       '+aVR', '--aVR', '- aVR' (only one '-', directly before the name, marks an inverted lead)
  sign after 'lead' 'Lead -aVR', 'Lead--aVR' (read as 'lead' + separator + '-aVR': a sign inside the name)
  other separators  'aV R', 'a-VR', 'I I', 'aVR_', 'lead  I', 'V--3', 'Lead.I'
  other letters     non-ASCII ones that case-fold onto a lead's (the Turkish dotless 'ı' is no 'I')
  nothing           '', '-', 'lead'

A signal is matched on its recognised columns; its refused names are listed as unrecognised whenever the match
fails (so 'V7' in place of 'V6' reports the missing V6 and the unrecognised V7).

`match_leads` raises `LeadError` (a ValueError) when a wanted lead is missing or given twice (a lead given both
signed and unsigned counts as twice); its message names the duplicates, the missing leads, the names the record
has and the unrecognised ones.
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

import numpy as np

from medbind_jax.data.schema import LEADS_12

_LEAD = {lead.lower(): lead for lead in LEADS_12}
_NAME = re.compile(r"(?P<sign>-)?(?:lead[ _-]?)?(?P<lead>i{1,3}|av[rlf]|v[ _-]?[1-6])", re.IGNORECASE | re.ASCII)


def parse_lead(name: str) -> tuple[str | None, int]:
  """(canonical name in `LEADS_12`, sign): sign -1 for an inverted lead ('-aVR'), else +1; (None, +1) when the
  name is refused (see the module docstring for the table)."""
  return _parse(str(name))


@functools.lru_cache(maxsize=4096)  # the training pipeline matches every stored record's lead names
def _parse(name: str) -> tuple[str | None, int]:
  match = _NAME.fullmatch(name.strip())
  if match is None:
    return None, 1
  return _LEAD[re.sub(r"[ _-]", "", match["lead"]).lower()], -1 if match["sign"] else 1


class LeadError(ValueError):
  """Leads that cannot be matched: `kind` "duplicate lead" (when any lead is given twice) or "missing leads",
  with the `duplicates` ({lead: the names giving it}), `missing` and `unrecognised` names."""

  def __init__(self, names: Sequence[str], missing: Sequence[str], duplicates: dict[str, list[str]],
               unrecognised: Sequence[str], wanted: Sequence[str]):
    self.names, self.missing, self.duplicates = list(names), list(missing), duplicates
    self.unrecognised, self.wanted = list(unrecognised), tuple(wanted)
    self.kind = "duplicate lead" if duplicates else "missing leads"
    pieces = [f"{lead} appears {'twice' if len(given) == 2 else f'{len(given)} times'} (as {given})"
              for lead, given in duplicates.items()]
    if missing:
      pieces.append(f"{self.missing}" if self.kind == "missing leads" else f"missing leads {self.missing}")
    pieces.append(f"the record has {self.names}")
    if unrecognised:
      pieces.append(f"unrecognised lead names {self.unrecognised}")
    self.detail = "; ".join(pieces) + f" (expected the leads {', '.join(self.wanted)}, by name)"
    super().__init__(f"{self.kind}: {self.detail}")


def match_leads(names: Sequence[str], wanted: Sequence[str] = LEADS_12) -> tuple[list[int], list[int]]:
  """(columns, signs): for each lead of `wanted` (canonical names, default the 12 in `LEADS_12` order), the
  column of `names` holding it and its sign (-1 where that column holds the inverted lead): the leads are
  `signal[:, columns] * signs`. Matched by name, never by position; names of other leads (recognised or not) are
  ignored. LeadError when a wanted lead is missing or given twice."""
  names = [str(name) for name in names]
  found: dict[str, list[tuple[int, int]]] = {}  # lead -> [(column, sign)]
  unrecognised = []
  for column, name in enumerate(names):
    lead, sign = parse_lead(name)
    if lead is None:
      unrecognised.append(name)
    else:
      found.setdefault(lead, []).append((column, sign))
  duplicates = {lead: [names[c] for c, _ in found[lead]] for lead in wanted if len(found.get(lead, ())) > 1}
  missing = [lead for lead in wanted if lead not in found]
  if duplicates or missing:
    raise LeadError(names, missing, duplicates, unrecognised, wanted)
  return [found[lead][0][0] for lead in wanted], [found[lead][0][1] for lead in wanted]


def non_finite(signal: np.ndarray, lead_names: Sequence[str]) -> str:
  """'' when every sample of `signal` [T, leads] is finite, else '{count} in leads {names}' for messages."""
  bad = ~np.isfinite(signal)
  if not bad.any():
    return ""
  return f"{int(bad.sum())} in leads {[lead_names[i] for i in np.flatnonzero(bad.any(axis=0))]}"
