"""`memfs demo`: the whole product in one run, through the filesystem.

Starts a daemon with its filesystem in a private directory, starts a
target holding a data set, then compresses, evicts, prefetches and
recompresses its memory with `echo > ctl`, showing with `cat` what each
step did to the target's RSS and to the store.  Every shell command is
printed before its output, so the transcript doubles as a tutorial.
Everything it started is stopped and unmounted at the end, whatever
happens.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .. import native
from .localdaemon import LocalDaemon, DaemonFailed

TARGET = native.path("bin", "memfs-target")
KEYS = ("rss_anon_bytes", "pages_resident", "pages_clean", "pages_compressed", "pages_zero",
        "store_bytes_logical", "store_bytes_compressed", "store_bytes_used", "faults_missing",
        "restore_ok", "evict_ok", "prefetch_restored")


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def shell(cmd: str, cwd: Path) -> str:
    print(f"$ {cmd}", flush=True)
    r = subprocess.run(["bash", "-c", cmd], cwd=cwd, capture_output=True, text=True)
    out = r.stdout + r.stderr
    if out:
        print(out.rstrip(), flush=True)
    return r.stdout


def mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


def run(mb: int, pattern: str, keep: bool) -> int:
    step("start the daemon and mount its filesystem")
    try:
        with LocalDaemon(prefix="memfs-demo-") as daemon:
            print(f"$ {' '.join(daemon.command)} &", flush=True)
            return tour(daemon, mb, pattern, keep)
    except DaemonFailed as e:
        print(f"memfs demo: {e}", file=sys.stderr)
        return 1


def tour(daemon: LocalDaemon, mb: int, pattern: str, keep: bool) -> int:
    sock, mnt = daemon.sock, daemon.mnt
    target = None
    try:
        shell("cat version", mnt)

        step(f"start a target: {mb} MiB of '{pattern}' data, registered with the daemon")
        print(f"$ {TARGET} --mb {mb} --pattern {pattern} --socket {sock} &", flush=True)
        target = subprocess.Popen([str(TARGET), "--mb", str(mb), "--pattern", pattern, "--socket", str(sock)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = target.stdout.readline().split()
        if not ready or ready[0] != "READY":
            print(f"memfs demo: the target did not start: {' '.join(ready)}", file=sys.stderr)
            return 1
        info = dict(kv.split("=") for kv in ready[1:])
        sdir = mnt / "sessions" / info["session"]
        shell("ls sessions by-pid; cat sessions/*/comm sessions/*/mode", mnt)
        show = f"grep -E '^({'|'.join(KEYS)}) ' stat"
        before = daemon.session_stat(info["session"])
        shell(show, sdir)

        step("compress: every page gets a compressed copy; the target keeps its memory")
        shell("time echo compress > ctl", sdir)
        shell(show, sdir)
        shell("awk '{n[$2]++} END {for (s in n) print s, n[s]}' ranges/0/pages", sdir)

        step("evict: the pages leave the target; their copies stay in the store")
        shell("time echo evict > ctl", sdir)
        evicted = daemon.session_stat(info["session"])
        shell(show, sdir)
        shell("grep -E '^(store_bytes_used|store_bytes_compressed|sessions_active) ' ../../stat", sdir)

        step("the target reads its memory back: every page faults in from the store")
        target.stdin.write("verify\n")
        print(f"target: {target.stdout.readline().strip()}", flush=True)
        shell(show + " | grep -E 'rss|faults|restore'", sdir)
        shell("grep -E '^fault_latency_ns_p(50|99) ' stat", sdir)

        step("evict again, then prefetch: pages come back before they are touched")
        shell("echo evict > ctl; time echo prefetch > ctl", sdir)
        shell(show, sdir)

        step("evict, then recompress: the copies encoded again with lz4hc take less store")
        shell("echo evict > ctl; time echo recompress > ctl", sdir)
        recompressed = daemon.session_stat(info["session"])
        shell("grep -E '^(store_bytes_compressed|store_bytes_used|recompress_ok) ' stat", sdir)

        step("savings")
        for when, st in (("evicting", evicted), ("after recompress", recompressed)):
            saved = before["rss_anon_bytes"] - st["rss_anon_bytes"]
            cost = st["store_bytes_used"]
            print(f"{when}: the target's RSS is {mib(saved)} smaller, the store holds it in {mib(cost)}: "
                  f"net {mib(saved - cost)} saved of {mib(before['registered_bytes'])} registered "
                  f"(compression ratio {before['registered_bytes'] / max(1, st['store_bytes_compressed']):.2f})")

        step("stop: the target ends its session, its memory is all back")
        target.stdin.write("verify\n")
        print(f"target: {target.stdout.readline().strip()}", flush=True)
        target.stdin.write("stop\n")
        print(f"target: {target.stdout.readline().strip()}", flush=True)
        target.stdin.write("exit\n")
        target.wait(timeout=30)
        shell("ls sessions; grep -E '^(sessions_total|evict_ok|restore_ok) ' stat", mnt)
        if keep:
            print(f"\nmemfs demo: daemon still running, mounted at {mnt}; stop it with: kill {daemon.pid}")
            daemon.keep()
        return 0
    finally:
        if target is not None and target.poll() is None:
            target.kill()
            target.wait()
