"""Where the native files are: in an installed package (memfs/_native/, put
there by setup.py), or in a checkout (native/build, native/include)."""
from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent / "_native"
CHECKOUT = Path(__file__).resolve().parent.parent / "native"
KINDS = {"bin": "build", "lib": "build", "include": "include"}


def path(kind: str, name: str) -> Path:
    """bin/memfs-target, lib/libpredicomp_client.so, include/predicomp_client.h ..."""
    installed = PACKAGE / kind / name
    if installed.exists():
        return installed
    return CHECKOUT / KINDS[kind] / name


def checkout() -> Path | None:
    """The source checkout this package runs from, if it does."""
    root = CHECKOUT.parent
    return root if (root / "native" / "Makefile").exists() else None


def results_dir() -> Path:
    """Where measurements are written: the checkout's bench/, else ./bench."""
    root = checkout()
    return root / "bench" if root else Path.cwd() / "bench"
