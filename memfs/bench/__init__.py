"""memfs measured.  `memfs bench` runs memfs and zram side by side
(zram_vs_memfs); `memfs bench TOOL` runs one of the tools below.  Each is
also `python -m memfs.bench.MODULE`.  bench/README.md says how they measure;
their results go to bench/ in a checkout."""
from __future__ import annotations

import importlib
import sys

# tool name -> (module, what it measures)
TOOLS = {
    "fuzz": ("fuzz_socket", "generated frames against a live daemon: descriptors and memory after"),
    "alone": ("alone", "a target served by its own keeper, the daemon dead, against the daemon"),
    "compare-builds": ("compare_builds", "two built checkouts of memfs side by side"),
    "random-reads": ("random_reads", "memfs's random read-back repeated on the same pages"),
}


def main(argv: list[str]) -> int:
    if argv and argv[0] in TOOLS:
        from .zram_vs_memfs import BenchError
        module = importlib.import_module(f".{TOOLS[argv[0]][0]}", __name__)
        try:
            return module.main(argv[1:])
        except BenchError as e:
            print(f"memfs bench {argv[0]}: {e}", file=sys.stderr)
            return 1
    from . import zram_vs_memfs
    return zram_vs_memfs.main(argv)
