"""Bring a checkout to a runnable state: Debian packages, venv, native build.

Standard library only: this runs under whatever python3 started
`python3 -m memfs`, before the virtual environment exists.  Every step
checks first and does nothing when its result is already there, so a
second run costs a dpkg query, a hash and a `make` that finds nothing to
do.  Then the command re-runs itself inside the venv.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
DEBS = ["fuse3", "libfuse3-dev", "liblz4-dev", "pkg-config", "gcc", "make", "libc6-dev"]
# Debian's own python3 splits these out; other Pythons (pyenv, ...) carry them.
DEBS_FOR_SYSTEM_PYTHON = ["python3-dev", "python3-venv"]


def say(msg: str) -> None:
    print(f"memfs setup: {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw) -> None:
    say(" ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def missing_debs(pkgs: list[str]) -> list[str]:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *pkgs],
                         capture_output=True, text=True)
    have = {line.split()[0] for line in out.stdout.splitlines() if line.endswith(" installed")}
    return [p for p in pkgs if p not in have]


def ensure_debs() -> None:
    pkgs = list(DEBS)
    if sys.base_prefix.startswith("/usr"):
        pkgs += DEBS_FOR_SYSTEM_PYTHON
    if not shutil.which("dpkg-query"):
        say("not a Debian system: make sure fuse3, libfuse3 and liblz4 (with headers), "
            "pkg-config and a C compiler are installed")
        return
    missing = missing_debs(pkgs)
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def ensure_venv() -> None:
    if not VENV_PYTHON.exists():
        run([sys.executable, "-m", "venv", VENV])
    stamp = VENV / ".memfs-deps"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != want:
        run([VENV_PYTHON, "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "-e", f"{ROOT}[test]"])
        stamp.write_text(want)


def ensure_native() -> None:
    make = ["make", "-s", "-C", ROOT / "native", f"PYTHON={VENV_PYTHON}"]
    if subprocess.run([str(c) for c in make] + ["-q"], capture_output=True).returncode:
        run(make)


def ensure_environment(argv: list[str]) -> None:
    if not (ROOT / "native" / "Makefile").exists() or os.environ.get("MEMFS_NO_BOOTSTRAP"):
        return  # an installed package, or the caller manages the environment
    in_venv = Path(sys.prefix).resolve() == VENV.resolve()
    if os.geteuid() != 0:
        if in_venv:
            return  # set up already by root; nothing here may be changed by us
        sys.exit("memfs: run this as root once: it installs packages and builds the native code")
    if not in_venv:
        ensure_debs()
        ensure_venv()
    ensure_native()
    if not in_venv:
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), "-m", "memfs", *argv])
