"""memfs's random read-back, repeated on the same pages: which reads meet a slow
stretch, and where their time goes.

    python3 -m memfs bench random-reads [--dataset random] [--mb 1024] [--reads 10]
                                        [--seed 7] [--hog]

One daemon and one target (zram_vs_memfs's `Memfs` and `Target`),
then `--reads` times the same step as `memfs bench`'s random read: read the
region back in order, evict, warm free memory, read npages/16 pages at random,
always with the same seed, so every read restores the same pages in the same
order.  Per read it prints the target's figures (p50, p99, touches over
40 us), the CPU the two threads of the fault path used in it (the daemon's
`memfs-fault` thread and the target's reading thread, from their schedstat),
the fault thread's scheduling policy when the read began (idle: SCHED_IDLE,
following the target; other: ordinary, unpinned) and how often the session's
`fault_thread_starved` fired since the last read.  A read that met a slow
stretch (docs/design.md, "Where the fault thread runs") shows as many slow
touches and more CPU in both threads, on the same pages as a good read.
`--hog` runs, before each evict, a second target's page-out and read-back
through zram, as `memfs bench` runs zram's steps between memfs's.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

from . import zram_vs_memfs as bench


def task_dir(pid: int, comm: str | None = None) -> Path:
    """/proc/PID/task/TID of the thread of `pid` named `comm` (its main thread if None)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (task.name == str(pid)) if comm is None else (task / "comm").read_text().strip() == comm:
            return task
    raise bench.BenchError(f"no thread {comm} in process {pid}")


def thread_cpu_ns(pid: int, comm: str | None = None) -> int:
    """Run time (ns) of that thread, the first field of its schedstat."""
    return int((task_dir(pid, comm) / "schedstat").read_text().split()[0])


def thread_policy(pid: int, comm: str) -> str:
    """That thread's scheduling policy (field 41 of its stat): idle, other, or its number."""
    policy = int((task_dir(pid, comm) / "stat").read_text().rsplit(")", 1)[1].split()[38])
    return {0: "other", 5: "idle"}.get(policy, str(policy))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="memfs bench random-reads", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="random", choices=bench.DATASETS)
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--reads", type=int, default=10)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--hog", action="store_true", help="zram's steps on a second target between reads")
    args = p.parse_args(argv)
    nrand = (args.mb << 20) // bench.PAGE // 16  # as memfs bench's default
    print(f"{args.dataset}, {args.mb} MiB, {nrand} random reads, seed {args.seed}")
    print(f"{'read':>4} {'p50 us':>7} {'p99 us':>7} {'slow %':>7} {'fault thread ms':>16} {'target ms':>10} "
          f"{'policy':>7} {'starved':>8}")
    slow = []
    with contextlib.ExitStack() as stack:
        memfs = stack.enter_context(bench.Memfs([]))
        hog = None
        if args.hog:
            stack.enter_context(bench.Zram(2 * args.mb << 20))
            hog = bench.Target(args.mb, args.dataset, None)
            stack.callback(hog.close)
        t = bench.Target(args.mb, args.dataset, memfs.sock)
        stack.callback(t.close)
        sid = t.info["session"]
        memfs.ctl(sid, "evict")
        for i in range(args.reads):
            starved = memfs.session_stat(sid)["fault_thread_starved"]
            t.cmd("touch seq")
            if hog:
                hog.cmd("pageout")
                hog.cmd("touch seq")
            memfs.ctl(sid, "evict")
            bench.warm_free_memory(nrand * bench.PAGE >> 20)
            policy = thread_policy(memfs.pid, "memfs-fault")
            f0, t0 = thread_cpu_ns(memfs.pid, "memfs-fault"), thread_cpu_ns(t.pid)
            a = t.cmd(f"touch rand {nrand} {args.seed}")
            f1, t1 = thread_cpu_ns(memfs.pid, "memfs-fault"), thread_cpu_ns(t.pid)
            starved = memfs.session_stat(sid)["fault_thread_starved"] - starved
            slow.append(100 * int(a["slow"]) / int(a["n"]))
            print(f"{i:>4} {int(a['p50']) / 1000:>7.1f} {int(a['p99']) / 1000:>7.1f} {slow[-1]:>7.2f} "
                  f"{(f1 - f0) / 1e6:>16.1f} {(t1 - t0) / 1e6:>10.1f} {policy:>7} {starved:>8}", flush=True)
    print(f"reads with over 1 % slow touches: {sum(s > 1 for s in slow)} of {len(slow)}; "
          f"median slow {statistics.median(slow):.2f} %")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except bench.BenchError as e:
        sys.exit(f"memfs bench random-reads: {e}")
