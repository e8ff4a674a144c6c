"""The `real` data set: the memory of a program no one here wrote.

CPython imports a fixed list of standard-library modules and builds large
dicts (keys and values made from the library's own source text) until its
RSS reaches the wanted size.  Then its resident private anonymous pages
(heap and anonymous mappings, as /proc/PID/pagemap reports them present)
are copied out through /proc/PID/mem into an image file, which the target
loads with --data.  The interpreter runs with ASLR off (setarch -R) and
PYTHONHASHSEED=0, so two captures are nearly identical; the image is cached
and reused.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

PAGE = 4096
CACHE = Path("/var/cache/memfs/bench")

PROGRAM = r"""
import importlib, sys
MODULES = '''argparse ast asyncio base64 bisect calendar collections configparser contextlib copy csv
dataclasses datetime decimal difflib email enum fractions functools gettext glob gzip hashlib heapq
html http.client inspect io ipaddress itertools json logging mailbox math multiprocessing operator
optparse pathlib pickle pprint queue random re shlex shutil socket sqlite3 statistics string struct
subprocess tarfile tempfile textwrap threading tokenize traceback typing unittest urllib.parse uuid
xml.dom.minidom xml.etree.ElementTree zipfile'''.split()
mods = [importlib.import_module(m) for m in MODULES]
import inspect
words = []
for m in mods:
    try:
        words += inspect.getsource(m).split()
    except (OSError, TypeError):
        pass
want = int(sys.argv[1])

def rss_anon():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('RssAnon:'))

tables, i = [], 0
while rss_anon() < want * 1.05:
    t = {}
    for _ in range(20000):
        w = words[i % len(words)]
        t[f'{w}:{i}'] = (i, w, i / 7.0, [i, len(w)], {'n': i % 97})
        i += 1
    tables.append(t)
print('READY', flush=True)
sys.stdin.read()
"""


def present_runs(pid: int, start: int, end: int):
    """Runs of pages of [start, end) that are present in memory."""
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        pm.seek(start // PAGE * 8)
        raw = pm.read((end - start) // PAGE * 8)
    run = None
    for k, (entry,) in enumerate(struct.iter_unpack("<Q", raw)):
        if entry >> 63 & 1:
            run = run or [start + k * PAGE, 0]
            run[1] += PAGE
        elif run:
            yield tuple(run)
            run = None
    if run:
        yield tuple(run)


def capture(mb: int, out: Path) -> None:
    env = dict(os.environ, PYTHONHASHSEED="0")
    cmd = ["setarch", os.uname().machine, "-R", sys.executable, "-c", PROGRAM, str(mb << 20)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError("the Python program for the real data set did not start")
        want, got = mb << 20, 0
        tmp = out.with_suffix(".part")
        with open(f"/proc/{proc.pid}/maps") as maps, open(f"/proc/{proc.pid}/mem", "rb") as mem, \
                open(tmp, "wb") as img:
            for line in maps:
                fields = line.split()
                name = fields[5] if len(fields) > 5 else ""
                if "w" not in fields[1] or fields[1][3] != "p" or name not in ("", "[heap]"):
                    continue
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                for addr, length in present_runs(proc.pid, lo, hi):
                    length = min(length, want - got)
                    mem.seek(addr)
                    img.write(mem.read(length))
                    got += length
                    if got >= want:
                        break
                if got >= want:
                    break
        if got < PAGE:
            raise RuntimeError("the Python program had no anonymous memory to capture")
        tmp.rename(out)
    finally:
        proc.kill()
        proc.wait()


def image(mb: int) -> Path:
    """The cached image of `mb` MiB of a CPython heap, captured on first use."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"real-python-{mb}M.img"
    if not path.exists():
        capture(mb, path)
    return path
