"""The README's two set-up commands are what CI and the configs say."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_commands():
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
  commands = _setup_commands()
  assert len(commands) == 2 and all("\n" not in c for c in commands), commands
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci_lines = [line for line in f.read().splitlines() if line and not line.startswith("#")]
  assert commands[1] in ci_lines
  assert commands[1].endswith("python -m pytest tests -q -n 2 --dist loadfile")


def test_readme_main_command_uses_the_default_config_and_pinned_requirements():
  install_and_run = _setup_commands()[0]
  assert "pip install -r requirements.txt" in install_and_run
  assert install_and_run.endswith("python main.py --config=configs/medbind.py --workdir=workdirs/medbind")
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    pins = [line for line in f.read().splitlines() if line and not line.startswith("#")]
  assert pins and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][\w.+]*", p) for p in pins), pins
