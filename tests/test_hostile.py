"""memfs against a hostile local user, a stopped process, bad input: each rule as the attack.

The daemon runs as root and serves any local user.  Nothing a user sends may
reveal another process's memory or layout, kill the daemon, cost it unbounded
descriptors or memory, or lose a byte of anyone's data; bad input gets the
right errno and changes nothing."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import trio

from fsutil import NOBODY, OTHER_UID, FsDaemon, flat, page_states, sh
from helpers import ROOT, c_target, wait_for

MB = 1 << 20


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def ctl(path, text: str, user: int | None = None) -> int:
    """`echo text > path` (as `user`); 0 or the errno the write failed with."""
    if user is None:
        def write():
            try:
                with open(path, "w") as f:
                    f.write(text + "\n")
                return 0
            except OSError as e:
                return e.errno
        return await trio.to_thread.run_sync(write)
    rc, _, err = await sh(f"echo '{text}' > {path}", user=user)
    return 0 if rc == 0 else next((e for e in (errno.EACCES, errno.EINVAL, errno.ETIMEDOUT, errno.EAGAIN)
                                   if os.strerror(e) in err), -1)


# -- nothing lost when the daemon leaves --------------------------------------------

@pytest.mark.parametrize("run", range(3))
async def test_a_stopped_target_and_a_stopped_daemon_lose_nothing(fsd, targets, run):
    """The target is stopped (SIGSTOP) during `evict`, then the daemon is stopped with
    SIGTERM: the daemon cancels the eviction request the agent never began (its fence)
    and gives the pages back.  When the target continues, its agent finds the request
    cancelled and drops nothing."""
    d = await fsd("--policy", "off")
    t = await targets(c_target(d.sock, 256))
    sd = d.session_dir(t.session_id)
    os.kill(t.pid, signal.SIGSTOP)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ctl, sd / "ctl", "evict")
            await wait_for(lambda: "evicting" in page_states(d, t.session_id), timeout=30)
            await trio.sleep(0.2)
            d.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(60):
                await d.proc.wait()
    finally:
        os.kill(t.pid, signal.SIGCONT)
    assert d.proc.returncode == 0
    assert await t.verify() == (t.npages, 0), "a cancelled eviction was carried out after all"


async def test_an_agent_that_does_not_answer_makes_evict_fail_with_etimedout(fsd, targets):
    d = await fsd("--policy", "off", "--agent-timeout-ms", "1000")
    t = await targets(c_target(d.sock, 16))
    sd = d.session_dir(t.session_id)
    os.kill(t.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert await ctl(sd / "ctl", "evict") == errno.ETIMEDOUT
        assert time.monotonic() - t0 < 10
        states = set(page_states(d, t.session_id))
        assert states <= {"resident", "clean"}, f"pages left evicting or evicted: {states}"
    finally:
        os.kill(t.pid, signal.SIGCONT)
    assert await t.verify() == (t.npages, 0)
    assert await ctl(sd / "ctl", "evict") == 0, "a live agent is served as before"
    assert await t.verify() == (t.npages, 0)
