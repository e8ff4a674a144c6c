"""Two builds of memfs side by side: what a change costs when nothing goes wrong.

    python3 -m memfs bench compare-builds --old CHECKOUT --new CHECKOUT
        [--mb 512] [--datasets mixed,text] [--rounds 3] [--out FILE]

Each checkout must be built (python3 -m memfs test, or make -C native).
Round after round, the two builds take turns (the order swapped every
round, so that a slow spell of the machine meets both): a daemon of that
build (--policy off --access-source none), and for each data set a fresh
memfs-target of that build, which is evicted (`echo evict > ctl`), read
back in order, evicted and read at random (npages/16), evicted and
prefetched, and verified.  Reported per data set and build, the median
over rounds: eviction MB/s, the store's bytes over the copies' (its
overhead: slot rounding, chunk tails, and now the index), the daemon's
memory growth over the compressed bytes, sequential restore GB/s, random
fault p50/p99, prefetch GB/s; and new/old for each.  Free memory is warmed
before each timed step, as memfs bench does (zram_vs_memfs.warm_free_memory).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .zram_vs_memfs import warm_free_memory

PAGE = 4096


class Build:
    def __init__(self, name: str, root: Path):
        self.name, self.root = name, root.resolve()
        self.target = self.root / "native" / "build" / "memfs-target"
        if not self.target.exists():
            raise SystemExit(f"{self.target}: not built")

    def daemon(self, work: Path) -> subprocess.Popen:
        env = dict(os.environ, MEMFS_NO_BOOTSTRAP="1", PYTHONPATH=str(self.root))
        p = subprocess.Popen([sys.executable, "-m", "memfs", "serve", "--socket", str(work / "s"), "--mount",
                              str(work / "m"), "--policy", "off", "--access-source", "none"],
                             cwd=self.root, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "log", "w"))
        deadline = time.monotonic() + 30
        while not (work / "m" / "version").exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: the daemon did not start: {(work / 'log').read_text()}")
            time.sleep(0.05)
        return p


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def flat(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(None, 1) for line in path.read_text().splitlines())
            if v.strip().isdigit()}


def one(build: Build, work: Path, dataset: str, mb: int) -> dict[str, float]:
    t = subprocess.Popen([str(build.target), "--mb", str(mb), "--pattern", dataset, "--socket", str(work / "s")],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def cmd(c: str) -> dict[str, str]:
        t.stdin.write(c + "\n")
        t.stdin.flush()
        return {k: v for k, sep, v in (kv.partition("=") for kv in t.stdout.readline().split()[1:]) if sep}

    def evict() -> float:
        warm_free_memory(mb)
        t0 = time.monotonic()
        (work / "m" / "sessions" / sid / "ctl").write_text("evict\n")
        return time.monotonic() - t0

    try:
        sid = {k: v for k, _sep, v in (kv.partition("=") for kv in t.stdout.readline().split()[1:])}["session"]
        daemon_pid = int(next(line.split()[1] for line in (work / "pid").read_text().splitlines()))
        rss0 = status_kb(daemon_pid, "VmRSS")
        out = {"evict_mbps": mb / evict()}
        st = flat(work / "m" / "stat")
        out["store_over_compressed"] = st["store_bytes_used"] / max(1, st["store_bytes_compressed"])
        out["daemon_growth_over_compressed"] = (status_kb(daemon_pid, "VmRSS") - rss0) * 1024 / max(
            1, st["store_bytes_compressed"])
        warm_free_memory(mb)
        r = cmd("touch seq 0 1")
        out["seq_gbps"] = mb * (1 << 20) / int(r["wall_ns"])
        evict()
        warm_free_memory(mb // 16)
        r = cmd(f"touch rand {mb * 256 // 16} 7")
        out["rand_p50_us"], out["rand_p99_us"] = int(r["p50"]) / 1000, int(r["p99"]) / 1000
        evict()
        warm_free_memory(mb)
        t0 = time.monotonic()
        (work / "m" / "sessions" / sid / "ctl").write_text("prefetch\n")
        out["prefetch_gbps"] = mb / 1024 / (time.monotonic() - t0)
        r = cmd("verify")
        if r.get("bad") != "0":
            raise SystemExit(f"{build.name} {dataset}: {r}")
        return out
    finally:
        t.kill()
        t.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="memfs bench compare-builds", description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path, required=True)
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--datasets", default="mixed,text")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the table as Markdown here")
    args = ap.parse_args(argv)
    builds = [Build("old", args.old), Build("new", args.new)]
    datasets = args.datasets.split(",")
    got: dict[tuple[str, str], list[dict[str, float]]] = {}
    for rnd in range(args.rounds):
        for b in (builds if rnd % 2 == 0 else builds[::-1]):
            work = Path(tempfile.mkdtemp(prefix="memfs-cmp-"))
            d = b.daemon(work)
            (work / "pid").write_text(f"daemon {d.pid}\n")
            try:
                for ds in datasets:
                    r = one(b, work, ds, args.mb)
                    got.setdefault((ds, b.name), []).append(r)
                    print(f"round {rnd + 1} {b.name} {ds}: " + " ".join(f"{k}={v:.3g}" for k, v in r.items()),
                          flush=True)
            finally:
                d.send_signal(signal.SIGTERM)
                d.wait()
                subprocess.run(["fusermount3", "-u", "-z", str(work / "m")], stderr=subprocess.DEVNULL)
                shutil.rmtree(work, ignore_errors=True)
    keys = list(next(iter(got.values()))[0])
    lines = ["| data set | figure | old | new | new/old |", "|---|---|---|---|---|"]
    for ds in datasets:
        for k in keys:
            o = statistics.median(r[k] for r in got[(ds, "old")])
            n = statistics.median(r[k] for r in got[(ds, "new")])
            lines.append(f"| {ds} | {k} | {o:.3g} | {n:.3g} | {n / o:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        cmd = " ".join(["python3 -m memfs bench compare-builds", *(argv if argv is not None else sys.argv[1:])])
        args.out.write_text(f"# Two builds side by side\n\nGenerated by `{cmd}` on "
                            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: medians of "
                            f"{args.rounds} rounds, the builds alternating, {args.mb} MiB per data set.\n\n"
                            f"{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
