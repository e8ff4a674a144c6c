"""The manual pages render cleanly and document what the code has."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from helpers import ROOT

from memfs import cli, core
from memfs.config import SETTINGS
from memfs.daemon import GLOBAL_EVENTS
from memfs.fs.tree import RANGE_FILES, ROOT_FILES, SESSION_FILES
from memfs.session import SESSION_EVENTS

MAN = ROOT / "man"
PAGES = sorted(p.name for p in MAN.iterdir())


def rendered(name: str) -> str:
    r = subprocess.run(["man", "-l", str(MAN / name)], capture_output=True, text=True, check=True,
                       env=dict(os.environ, LC_ALL="C", MANWIDTH="200"))
    return r.stdout


def words(name: str) -> set[str]:
    return {w.rstrip(".") for w in re.findall(r"[\w\-./<>]+", rendered(name).replace("\u2010", "-"))}


@pytest.mark.parametrize("page", PAGES)
def test_renders_without_warnings(page):
    r = subprocess.run(["groff", "-man", "-ww", "-z", "-Tutf8", str(MAN / page)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == ""
    r = subprocess.run(["man", "--warnings", "-l", str(MAN / page)], capture_output=True, text=True,
                       env=dict(os.environ, LC_ALL="C", MANWIDTH="80"))
    assert r.returncode == 0 and r.stderr == ""


def test_every_file_counter_setting_and_event_is_in_memfs_5():
    from memfs.counters import COUNTERS
    w = words("memfs.5")
    counted = set(COUNTERS)  # every counter there is (tests/unit/test_names.py: every one kept is there)
    wanted = (set(ROOT_FILES) | set(SESSION_FILES) | set(RANGE_FILES) | counted
              | set(SETTINGS) | set(GLOBAL_EVENTS) | set(SESSION_EVENTS) | set(core.STATES)
              | set(core.TRACE_KINDS.values()) | {"by-pid/<pid>", "all", "cold", "compress", "evict", "prefetch"})
    assert not wanted - w, f"undocumented in memfs(5): {sorted(wanted - w)}"


def test_every_command_and_option_is_in_memfs_8():
    w = words("memfs.8")
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = set()
    for name, p in sub.choices.items():
        if name not in w:
            missing.add(name)
        # bench parses its own options (memfs/bench/zram_vs_memfs.py): those too
        parsers = [p, cli.load_bench().build_parser()] if name == "bench" else [p]
        for action in (a for q in parsers for a in q._actions):
            missing |= {o for o in action.option_strings if o not in ("-h", "--help") and o not in w}
    assert not missing, f"undocumented in memfs(8): {sorted(missing)}"


def test_every_c_function_is_in_predicomp_client_3():
    header = (ROOT / "native" / "include" / "predicomp_client.h").read_text()
    functions = set(re.findall(r"\b(predicomp_client_\w+)\(", header))
    w = words("predicomp_client.3")
    assert functions and not functions - w, f"undocumented: {sorted(functions - w)}"


def test_protocol_messages_are_in_memfs_7():
    from memfs import protocol
    w = words("memfs.7")
    assert not set(protocol.NAMES.values()) - w
