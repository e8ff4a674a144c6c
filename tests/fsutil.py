"""A daemon with its filesystem, run as a real process, and a shell to drive it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from helpers import ROOT, c_target, wait_for

NOBODY = 65534
OTHER_UID = 65533  # a second unprivileged user; needs no passwd entry for setpriv


def is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


class FsDaemon:
    def __init__(self, tmp: Path, *args: str, wrap: tuple[str, ...] = ()):
        self.wrap = wrap  # a command the daemon runs under (prlimit ...)
        self.mnt = tmp / "mnt"
        self.sock = str(tmp / "memfs.sock")
        self.log = tmp / "daemon.log"  # appended to: a daemon started again on the same base adds to it
        # page states change only when a test acts, unless it asks for a sampler
        self.args = args if "--access-source" in args else ("--access-source", "none", *args)
        self.proc: trio.Process | None = None
        self._logf = None

    async def start(self) -> "FsDaemon":
        env = dict(os.environ, MEMFS_NO_BOOTSTRAP="1")
        self._logf = open(self.log, "ab")
        self.proc = await trio.lowlevel.open_process(
            [*self.wrap, sys.executable, "-m", "memfs", "serve", "--socket", self.sock, "--mount", str(self.mnt),
             "-v", *self.args], env=env, cwd=str(ROOT), stdout=self._logf, stderr=subprocess.STDOUT)
        with trio.fail_after(30):
            while not (is_mounted(self.mnt) and os.path.exists(self.mnt / "version")):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited: {self.log.read_text()}")
                await trio.sleep(0.05)
        return self

    async def kill(self) -> None:
        """SIGKILL, as the OOM killer would: no chance to hand anything back."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._logf is not None:
            self._logf.close()
            self._logf = None

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(60):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        if self._logf is not None:
            self._logf.close()

    def session_dir(self, sid: int) -> Path:
        return self.mnt / "sessions" / str(sid)


async def sh(cmd: str, user: int | None = None, check: bool = False) -> tuple[int, str, str]:
    """Run a bash command line (as `user` if given); (exit code, stdout, stderr)."""
    argv = ["bash", "-c", cmd]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    r = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    out, err = r.stdout.decode(), r.stderr.decode()
    if check and r.returncode:
        raise AssertionError(f"{cmd!r} failed ({r.returncode}): {err}")
    return r.returncode, out, err


def read_pages(path: Path) -> list[tuple[int, str, int, int]]:
    out = []
    with open(path) as f:
        for line in f:
            fields = line.split()
            assert len(fields) == 4, f"{path}: malformed line {line!r}"
            i, state, csize, age = fields
            out.append((int(i), state, int(csize), int(age)))
    return out


PAGES_PER_MB = 256
EVICTED = ("compressed", "zero")


def page_states(d, sid, r: int = 0) -> list[str]:
    """The state of every page of a session's range, from its `pages` file."""
    return [state for _, state, _, _ in read_pages(d.session_dir(sid) / "ranges" / str(r) / "pages")]


def evicted_share(states: list[str], pages) -> float:
    """The part of `pages` (indexes) that is out of the target."""
    return sum(states[i] in EVICTED for i in pages) / len(pages)


def flat(path: Path) -> dict[str, str]:
    return dict(line.split(None, 1) for line in path.read_text().splitlines() if line.strip())


HOT_PART = range(32 * PAGES_PER_MB, 48 * PAGES_PER_MB)  # what a hot/cold target keeps using


async def hot_and_cold_target(d, targets, pattern: str):
    """A 128 MiB target that keeps using HOT_PART (16 MiB) and leaves the rest:
    the ground truth an access source is judged against.  Returns it and its cold pages."""
    t = await targets(c_target(d.sock, 128, "--pattern", pattern))
    await t.command(f"hot {HOT_PART.start} {len(HOT_PART)}")
    return t, [i for i in range(t.npages) if i not in HOT_PART]


async def wait_cold_part_evicted(d, t, cold, timeout: float, linger: float) -> list[str]:
    """Until 90 % of the cold pages are evicted; then, `linger` seconds later, the
    cold part must still be out and the hot part in.  The page states then."""
    await wait_for(lambda: evicted_share(page_states(d, t.session_id), cold) >= 0.9,
                   timeout=timeout, interval=min(1.0, timeout / 60))
    await trio.sleep(linger)  # more rounds: the hot part must still be there
    st = page_states(d, t.session_id)
    assert evicted_share(st, cold) >= 0.9
    hot_out = evicted_share(st, HOT_PART)
    assert hot_out <= 0.05, f"{hot_out:.1%} of the hot part was evicted"
    return st
