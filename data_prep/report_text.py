"""Report text of the converters: radiology report sections (`report_sections`, `findings_impression`), the
stored CXR report (`cxr_report_text`) and ECG machine statements joined into one text (`join_statements`)."""

from __future__ import annotations

import re
from typing import Iterable

from data_prep.errors import RecordError

# A section header: an upper-case phrase at the start of a line followed by a colon ("FINDINGS:", "IMPRESSION:",
# "FINDINGS AND IMPRESSION:"). Header lines without a colon ("FINAL REPORT") are not sections.
_SECTION = re.compile(r"^[ \t]*([A-Z][A-Z /&(),-]*[A-Z)])[ \t]*:", re.MULTILINE)


def collapse_whitespace(text: str) -> str:
  return " ".join(text.split())


def report_sections(report: str) -> dict[str, str]:
  """Sections of a free-text radiology report, {HEADER: text with whitespace collapsed}.

  A section runs from its header to the next header; a repeated header keeps its first occurrence.
  """
  sections: dict[str, str] = {}
  matches = list(_SECTION.finditer(report))
  for k, match in enumerate(matches):
    end = matches[k + 1].start() if k + 1 < len(matches) else len(report)
    header = collapse_whitespace(match.group(1))
    sections.setdefault(header, collapse_whitespace(report[match.end():end]))
  return sections


def findings_impression(report: str) -> tuple[str, str]:
  """(findings, impression) of a MIMIC-CXR style report; '' where absent. A combined 'FINDINGS AND IMPRESSION'
  section counts as findings."""
  sections = report_sections(report)
  findings = sections.get("FINDINGS") or sections.get("FINDINGS AND IMPRESSION") or \
      sections.get("IMPRESSION AND FINDINGS") or ""
  return findings, sections.get("IMPRESSION", "")


def cxr_report_text(findings: str, impression: str) -> str:
  """The stored CXR report: findings then impression, each with whitespace collapsed, joined by one space.

  RecordError('empty report') when both are blank.
  """
  text = " ".join(collapse_whitespace(part) for part in (findings, impression) if part and part.strip())
  if not text:
    raise RecordError("empty report", "no FINDINGS or IMPRESSION text")
  return text


def join_statements(statements: Iterable[str]) -> str:
  """ECG machine statements -> one text: each stripped, blanks dropped, a '.' added where a statement does not
  end in punctuation, joined by single spaces ('Sinus rhythm', 'Normal ECG' -> 'Sinus rhythm. Normal ECG.')."""
  parts = []
  for statement in statements:
    statement = collapse_whitespace(statement or "")
    if statement:
      parts.append(statement if statement[-1] in ".!?;:" else statement + ".")
  return " ".join(parts)
