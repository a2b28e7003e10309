"""The package's import layering: no cycle, no private name taken across modules."""

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TOOL = REPO.parent / "shared" / "tools" / "import_graph.py"


def test_imports_run_one_way_without_private_names():
  if not TOOL.is_file():
    pytest.skip(f"{TOOL} is not beside this checkout")
  proc = subprocess.run([sys.executable, str(TOOL), "twotower_jax"], cwd=REPO,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "0 cycles, 0 private cross-module names" in proc.stdout


def test_benchmark_drivers_are_not_in_the_package():
  assert not list((REPO / "twotower_jax").glob("bench*.py"))
