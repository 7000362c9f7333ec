"""Under CI a test skipped by `pytest.importorskip` fails the run; elsewhere it stays a skip (tests/ci_guard.py).

Each case runs pytest in a subprocess on a generated folder whose conftest loads only `ci_guard` (not the
project's conftest, which imports jax), so the check takes about a second.
"""

import os
import subprocess
import sys
import textwrap

import pytest

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

_CONFTEST = f"""
import sys
sys.path.insert(0, {_TESTS_DIR!r})
from ci_guard import pytest_collectreport, pytest_runtest_logreport, pytest_sessionfinish, pytest_terminal_summary
"""
_TEST_SKIPS_IN_TEST = """
import pytest

def test_needs_missing_module():
  pytest.importorskip("a_module_that_does_not_exist")

def test_plain_skip_is_not_import_skip():
  pytest.skip("not an import problem")

def test_passes():
  pass
"""
_TEST_SKIPS_MODULE = """
import pytest
pytest.importorskip("another_module_that_does_not_exist")

def test_never_runs():
  pass
"""


def _run_pytest(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
  files = {"pytest.ini": "[pytest]\n", "conftest.py": _CONFTEST, "test_in_test.py": _TEST_SKIPS_IN_TEST,
           "test_module_level.py": _TEST_SKIPS_MODULE}
  for name, text in files.items():
    (tmp_path / name).write_text(textwrap.dedent(text))
  env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
  if ci is not None:
    env["CI"] = ci
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_import_skip_fails_under_ci(tmp_path):
  result = _run_pytest(tmp_path, ci="true")
  out = result.stdout + result.stderr
  assert result.returncode == pytest.ExitCode.TESTS_FAILED, out
  assert "CI: 2 test(s) skipped for a missing import" in out, out
  assert "SKIPPED IN CI test_in_test.py::test_needs_missing_module: " in out, out
  assert "a_module_that_does_not_exist" in out
  assert "SKIPPED IN CI test_module_level.py: " in out and "another_module_that_does_not_exist" in out, out
  assert "SKIPPED IN CI test_in_test.py::test_plain_skip_is_not_import_skip" not in out, out
  assert "1 passed, 3 skipped" in out, out


@pytest.mark.parametrize("ci", [None, "false"])
def test_import_skip_stays_a_skip_outside_ci(tmp_path, ci):
  result = _run_pytest(tmp_path, ci=ci)
  out = result.stdout + result.stderr
  assert result.returncode == pytest.ExitCode.OK, out
  assert "1 passed, 3 skipped" in out and "SKIPPED IN CI" not in out, out
