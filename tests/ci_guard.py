"""pytest hooks: under CI, a test skipped by `pytest.importorskip` fails the run.

Parity tests check the JAX code against reference implementations (torch, transformers, scikit-learn) and skip
when those cannot be imported. Locally that is a convenience; in CI (the environment variable `CI` set, as for
`.ci/run`) it would let a broken test-extras install pass as green. So under CI every such skip is collected, listed
in the terminal summary, and the session exits with status 1 (tests failed). Other skips are left alone.

`tests/conftest.py` imports these hooks. This module imports nothing heavy (no jax), so `tests/test_ci_guard.py`
can load it in a quick pytest subprocess.
"""

import os

import pytest

# pytest.importorskip's skip reasons: "could not import 'mod': ..." and "module 'mod' has __version__ ..., required
# is: ..." (too old).
_IMPORT_SKIP_MARKERS = ("could not import ", "required is: ")
_import_skips: list[tuple[str, str]] = []  # (node id, skip reason)


def in_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _note(report) -> None:
  """Records `report` if it is a skip raised by importorskip (a test's, or a whole module's at collection)."""
  if not report.skipped or hasattr(report, "wasxfail") or not isinstance(report.longrepr, tuple):
    return
  reason = str(report.longrepr[2])
  if any(marker in reason for marker in _IMPORT_SKIP_MARKERS):
    _import_skips.append((report.nodeid, reason))


pytest_runtest_logreport = _note
pytest_collectreport = _note


def pytest_sessionfinish(session, exitstatus) -> None:
  if in_ci() and _import_skips and exitstatus == pytest.ExitCode.OK:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
  if in_ci() and _import_skips:
    terminalreporter.write_sep("=", f"CI: {len(_import_skips)} test(s) skipped for a missing import", red=True)
    terminalreporter.write_line("Under CI a parity test must run, not skip: fix the test-extras install "
                                "(README set-up command 2).")
    for nodeid, reason in _import_skips:
      terminalreporter.write_line(f"SKIPPED IN CI {nodeid}: {reason}", red=True)
