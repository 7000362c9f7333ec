"""Test session set-up (runs before jax is imported).

- 8 fake CPU devices, so sharded code runs as it would on 8 accelerators.
- A persistent compilation cache for the session: the training tests compile the same programs in several
  runs, and XLA's CPU compiler, not the tiny models, would otherwise dominate their time.
- Under CI (`CI` set), a test skipped by `pytest.importorskip` fails the run (hooks in `ci_guard.py`).
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the flags above)

_CACHE = tempfile.mkdtemp(prefix="medbind_jax_test_xla_cache_")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# Hooks that fail a CI run when a parity test skipped for a missing import (see ci_guard.py).
from ci_guard import (  # noqa: E402,F401  (imported to register them as this conftest's hooks)
    pytest_collectreport, pytest_runtest_logreport, pytest_sessionfinish, pytest_terminal_summary)
