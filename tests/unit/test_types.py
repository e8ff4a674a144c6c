"""mypy over memfs/, at the level pyproject.toml's [tool.mypy] sets, which the
code passes: a type error anywhere in the package fails the suite."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_memfs_type_checks():
    r = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    errors = [line for line in r.stdout.splitlines() if ": error:" in line]
    assert r.returncode == 0 and not errors, "\n".join(errors) or r.stdout + r.stderr
