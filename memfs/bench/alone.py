"""What a target pays while its daemon is dead: its own faults, served by its keeper.

    python3 -m memfs bench alone [--mb 256] [--datasets mixed,text] [--rounds 3] [--out FILE]

For each data set one memfs-target holds the data.  Round after round,
the two servers take turns on the same pages (the order swapped every
round): the daemon (evict, then the reads) and the target's keeper (evict,
kill -9 the daemon, then the reads, then a daemon started again takes the
session back).  Each turn reads npages/16 pages at random (p50, p99 of a
touch, as memfs bench times them) and, evicted again, all pages in order
(GB/s).  Reported: the medians over rounds and keeper/daemon.  The keeper
decodes and copies in one page a fault (63 more after a sequential one);
the daemon restores up to 64 ahead and runs where the faulting thread runs
(docs/design.md, "A daemon that dies").
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ..dev.localdaemon import LocalDaemon
from .zram_vs_memfs import TARGET, warm_free_memory


class Target:
    def __init__(self, mb: int, dataset: str, sock: Path):
        self.mb = mb
        self.p = subprocess.Popen([str(TARGET), "--mb", str(mb), "--pattern", dataset, "--socket", str(sock)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = {k: v for k, _sep, v in (kv.partition("=") for kv in self.p.stdout.readline().split()[1:])}
        self.pid = self.p.pid

    def cmd(self, line: str) -> dict[str, str]:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return {k: v for k, sep, v in (kv.partition("=") for kv in self.p.stdout.readline().split()[1:]) if sep}

    def close(self) -> None:
        self.p.kill()
        self.p.wait()


def session_of(d: LocalDaemon, pid: int, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        link = d.mnt / "by-pid" / str(pid)
        if link.exists():
            return os.readlink(link).rsplit("/", 1)[1]
        time.sleep(0.05)
    raise SystemExit(f"pid {pid}: not taken back within {timeout} s")


def evict(d: LocalDaemon, t: Target, then_kill: bool) -> None:
    """Evict the target's pages with a daemon alive (started again if need be); kill it after if asked."""
    if d.proc.poll() is not None:
        d.restart()
    (d.mnt / "sessions" / session_of(d, t.pid) / "ctl").write_text("evict\n")
    if then_kill:
        d.kill()


def reads(d: LocalDaemon, t: Target, alone: bool, nrand: int) -> dict[str, float]:
    evict(d, t, alone)
    warm_free_memory(t.mb // 16)
    r = t.cmd(f"touch rand {nrand} 7")
    out = {"rand_p50_us": int(r["p50"]) / 1000, "rand_p99_us": int(r["p99"]) / 1000}
    evict(d, t, alone)
    warm_free_memory(t.mb)
    r = t.cmd("touch seq 0 1")
    out["seq_gbps"] = t.mb * (1 << 20) / int(r["wall_ns"])
    v = t.cmd("verify")
    if v.get("bad") != "0":
        raise SystemExit(f"pages read back wrong: {v}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="memfs bench alone", description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--datasets", default="mixed,text")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the table as Markdown here (bench/ALONE.md)")
    args = ap.parse_args(argv)
    serve = ("--policy", "off", "--access-source", "none")
    got: dict[tuple[str, str], list[dict[str, float]]] = {}
    for ds in args.datasets.split(","):
        d = LocalDaemon(*serve, prefix="memfs-alone-", log_to_file=True).__enter__()
        t = Target(args.mb, ds, d.sock)
        nrand = args.mb * 256 // 16
        try:
            for rnd in range(args.rounds):
                for server in (("daemon", "keeper") if rnd % 2 == 0 else ("keeper", "daemon")):
                    r = reads(d, t, server == "keeper", nrand)
                    got.setdefault((ds, server), []).append(r)
                    print(f"round {rnd + 1} {ds} {server}: " + " ".join(f"{k}={v:.3g}" for k, v in r.items()),
                          flush=True)
        finally:
            t.close()
            d.__exit__(None, None, None)
    rows = ["| data set | figure | daemon | keeper alone | keeper/daemon |", "|---|---|---|---|---|"]
    for ds in args.datasets.split(","):
        for k in got[(ds, "daemon")][0]:
            a = statistics.median(r[k] for r in got[(ds, "daemon")])
            b = statistics.median(r[k] for r in got[(ds, "keeper")])
            rows.append(f"| {ds} | {k} | {a:.3g} | {b:.3g} | {b / a:.2f} |")
    table = "\n".join(rows)
    print(table)
    if args.out:
        cmd = " ".join(["python3 -m memfs bench alone", *(argv if argv is not None else sys.argv[1:])])
        args.out.write_text(f"# A target served by its own keeper while no daemon runs\n\nGenerated by `{cmd}` "
                            f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: medians of {args.rounds} "
                            f"rounds, the two servers alternating, {args.mb} MiB per data set.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
