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


async def read_line(stream) -> str:
    out = b""
    while not out.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        out += chunk
    return out.decode()


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


# -- identity ------------------------------------------------------------------------

ATTACKER = ROOT / "tests" / "targets" / "attacker.py"
VICTIM = textwrap.dedent("""
    import mmap, sys, ctypes
    m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[:16] = b"victim's secret!"
    print(hex(ctypes.addressof(ctypes.c_char.from_buffer(m))), flush=True)
    sys.stdin.readline()
""")


async def spawn_at_pid(pid: int, argv) -> trio.Process | None:
    """A process of ours that gets `pid`, the way a reused pid goes to someone else."""
    for _ in range(20):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if p.pid == pid:
            return p
        p.kill()
        await p.wait()
    return None


async def test_a_session_cannot_be_opened_for_a_reused_pid(fsd, public_tmp, unprivileged_userfaultfd):
    """The attack of issue 21: an unprivileged user connects as P, forks C, P exits and
    its pid goes to a root process V; C names P in HELLO with ranges at V's addresses.
    It gets EPERM, and nothing about V is read or told."""
    d = await fsd("--allow-other", base=public_tmp)
    attacker = await trio.lowlevel.open_process(
        ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
         sys.executable, str(ATTACKER), d.sock, "reuse"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    victim = None
    try:
        line = b""
        while not line.endswith(b"\n"):
            line += await attacker.stdout.receive_some(1)
        p_pid = int(line.split()[1])
        await attacker.wait()  # P is gone (C, its child, holds the connection)
        victim = await spawn_at_pid(p_pid, [sys.executable, "-c", VICTIM])
        if victim is None:
            pytest.skip(f"could not hand pid {p_pid} to another process")
        addr = (await read_line(victim.stdout)).strip()
        # C still reads the attacker's stdin: its pipe is the one we hold
        await attacker.stdin.send_all(f"{p_pid} {addr} {1 << 20}\n".encode())
        out = b""
        with trio.fail_after(30):
            while not out.endswith(b"\n"):
                out += await attacker.stdout.receive_some(4096)
        answer = out.decode().strip()
        assert answer.startswith(f"REPLY ERR {errno.EPERM} "), answer
        assert addr[2:] not in answer and "victim" not in answer
        assert os.listdir(d.mnt / "sessions") == []
    finally:
        if victim is not None:
            victim.kill()
        attacker.kill()


async def run_attacker(sock: str, *args: str, user: int | None = OTHER_UID, timeout: float = 120):
    """attacker.py SOCK ARGS as `user`; its first line, and the process (still running)."""
    cmd = [sys.executable, str(ATTACKER), sock, *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    p = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = b""
    with trio.fail_after(timeout):
        while not out.endswith(b"\n"):
            chunk = await p.stdout.receive_some(4096)
            if not chunk:
                break
            out += chunk
    return out.decode().strip(), p


def fields(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split()[1:])


# -- limits --------------------------------------------------------------------------

async def test_one_user_cannot_take_every_connection(fsd, targets, public_tmp, unprivileged_userfaultfd):
    d = await fsd("--uid-connections-max", "40", base=public_tmp)
    line, flood = await run_attacker(d.sock, "flood", "70")
    try:
        got = fields(line)
        assert got.get("open") == "40" and got.get(f"e{errno.EAGAIN}") == "30", line
        # root, and another user, are served as if nothing happened
        t = await targets(c_target(d.sock, 1))
        assert await t.verify() == (t.npages, 0)
        u = await targets(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           *c_target(d.sock, 1)])
        assert await u.verify() == (u.npages, 0)
    finally:
        flood.kill()


async def test_running_out_of_descriptors_never_ends_the_daemon(fsd, targets, tmp_path):
    """Under a low RLIMIT_NOFILE, a flood of connections (root's: no per-user limit)
    makes the daemon stop accepting for a while; it logs, goes on, and serves again."""
    d = await fsd(wrap=("prlimit", "--nofile=256:256"))
    line, flood = await run_attacker(d.sock, "flood", "250", user=None)
    try:
        assert int(fields(line)["open"]) < 250, line
        await trio.sleep(1)
        assert d.proc.returncode is None, "the daemon exited"
    finally:
        flood.kill()
        await flood.wait()
    t = await targets(c_target(d.sock, 4))
    assert await ctl(d.session_dir(t.session_id) / "ctl", "evict") == 0
    assert await t.verify() == (t.npages, 0)
    assert "no room for more under RLIMIT_NOFILE" in d.log.read_text()


async def test_sessions_that_end_badly_leave_no_descriptor_behind(fsd, tmp_path):
    d = await fsd()
    await run_attacker(d.sock, "leak", "2", user=None)  # the daemon's own descriptors settle first
    await trio.sleep(0.5)
    before = fd_count(d.proc.pid)
    line, p = await run_attacker(d.sock, "leak", "30", user=None)
    await p.wait()
    got = fields(line)
    assert got == {f"busy:{errno.EBUSY}": "30", f"fds:{errno.EINVAL}": "30", f"restart:{errno.EPROTO}": "30"}, line
    await wait_for(lambda: fd_count(d.proc.pid) <= before, timeout=10)


SPARSE = textwrap.dedent("""
    import ctypes, mmap, sys
    from memfs.client import Client
    from memfs._client import ffi, lib
    size = int(sys.argv[2])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    addr = libc.mmap(None, size, 3, 0x22 | 0x4000, -1, 0)  # MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE
    c = Client(sys.argv[1])
    rc = lib.predicomp_client_register_range(c._pc, ffi.cast("void *", addr), size, 3, ffi.NULL)
    if rc == 0:
        rc = lib.predicomp_client_start(c._pc)
    if rc:
        print("ERROR", -rc, ffi.string(lib.predicomp_client_last_error(c._pc)).decode(), flush=True)
        sys.exit(0)
    pages = [0, 1, 5000, size // 4096 // 2, size // 4096 - 1]
    for p in pages:
        ctypes.memmove(addr + p * 4096, bytes([p % 251 + 1]) * 4096, 4096)
    print("READY", flush=True)
    sys.stdin.readline()
    bad = sum(ctypes.string_at(addr + p * 4096, 4096) != bytes([p % 251 + 1]) * 4096 for p in pages)
    print("VERIFY bad=%d" % bad, flush=True)
    sys.stdin.readline()
""")


async def test_a_sparse_terabyte_costs_the_daemon_what_it_holds(fsd, public_tmp, unprivileged_userfaultfd):
    """A 1 TiB MAP_NORESERVE registration (a few pages touched): the daemon's memory
    grows by what the target touched, not by what it registered; and a user may not
    register past uid_registered_bytes_max."""
    d = await fsd(base=public_tmp)
    rss0 = rss_kb(d.proc.pid)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = await trio.lowlevel.open_process([sys.executable, "-c", SPARSE, d.sock, str(1 << 40)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        with trio.fail_after(30):
            first = await read_line(p.stdout)
            assert first.startswith("READY"), first
        sid = os.listdir(d.mnt / "sessions")[0]
        assert flat(d.mnt / "sessions" / sid / "stat")["registered_bytes"] == str(1 << 40)
        with trio.fail_after(30):
            assert await ctl(d.mnt / "sessions" / sid / "ctl", "evict") == 0
        st = flat(d.mnt / "sessions" / sid / "stat")
        assert int(st["pages_compressed"]) == 5  # and their faultaround neighbours, zero pages
        assert int(st["index_bytes"]) <= 8 << 20, st["index_bytes"]
        assert rss_kb(d.proc.pid) - rss0 < 32 * 1024, "the daemon grew with the registered size"
        await p.stdin.send_all(b"\n")
        with trio.fail_after(30):
            assert (await read_line(p.stdout)).strip() == "VERIFY bad=0"
    finally:
        p.kill()
    # another user, past the limit: refused with ENOMEM before anything is made
    u = await trio.lowlevel.open_process(
        ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
         sys.executable, "-c", SPARSE, d.sock, str(2 << 40)], stdout=subprocess.PIPE, env=env)
    with trio.fail_after(30):
        out = await read_line(u.stdout)
    u.kill()
    assert out.startswith(f"ERROR {errno.ENOMEM} "), out


# -- who may read memory ----------------------------------------------------------------

async def test_a_non_dumpable_target_is_read_only_by_root(fsd, targets, public_tmp, unprivileged_userfaultfd):
    """/proc/PID/mem's rule: its own user may not read a process that made itself
    non-dumpable (prctl PR_SET_DUMPABLE 0), nor may another; root may."""
    d = await fsd("--allow-other", base=public_tmp)
    as_user = ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups"]
    secret = await targets([*as_user, *c_target(d.sock, 1, "--no-dump")])
    plain = await targets([*as_user, *c_target(d.sock, 1)])
    for t, owner_may in ((secret, False), (plain, True)):
        data = d.session_dir(t.session_id) / "ranges" / "0" / "data"
        for who, may in ((OTHER_UID, owner_may), (NOBODY, False), (None, True)):
            rc, out, err = await sh(f"head -c 4096 {data} | wc -c", user=who)
            if may:
                assert out.split()[0] == "4096", (t.pid, who, err)
            else:
                assert "Permission denied" in err, (t.pid, who, out)
        for name in ("pages", "trace"):
            rc, _, err = await sh(f"timeout 1 head -c 1 {d.session_dir(t.session_id) / name if name == 'trace' else data.parent / name}",
                                  user=OTHER_UID)
            assert ("Permission denied" in err) != owner_may, (name, err)


# -- bad input: clear errors, nothing changed -------------------------------------------

async def test_bad_settings_and_selectors_get_einval_and_change_nothing(fsd, targets):
    d = await fsd("--policy", "off")
    cap = d.mnt / "config" / "store_cap_bytes"
    for bad in ("18446744073709551616", "-1", "1_000", "\u0661\u0662", "12Q", "", "max max"):
        assert await ctl(cap, bad) == errno.EINVAL, bad
        assert cap.read_text() == "max\n", bad
    assert await ctl(d.mnt / "config" / "cold_age_ms", "1_000") == errno.EINVAL
    t = await targets(c_target(d.sock, 1, "--pattern", "text"))
    sd = d.session_dir(t.session_id)
    assert await ctl(sd / "ctl", "evict pages=\u0661\u0662") == errno.EINVAL
    assert await ctl(sd / "ctl", "evict bytes=\u0664K") == errno.EINVAL
    assert set(page_states(d, t.session_id)) == {"resident"}
    # 0 is a cap of nothing, not "unlimited": no copy can be made, and evict says so
    assert await ctl(cap, "0") == 0 and cap.read_text() == "0\n"
    assert await ctl(sd / "ctl", "evict") == errno.EAGAIN
    assert set(page_states(d, t.session_id)) == {"resident"}
    assert await ctl(cap, "max") == 0
    assert await ctl(sd / "ctl", "evict") == 0
    assert await t.verify() == (t.npages, 0)


async def test_unmounting_the_filesystem_stops_the_daemon_and_hands_back(fsd, targets):
    d = await fsd()
    t = await targets(c_target(d.sock, 8))
    assert await ctl(d.session_dir(t.session_id) / "ctl", "evict") == 0
    subprocess.run(["fusermount3", "-u", "-z", str(d.mnt)], check=True)
    with trio.fail_after(60):
        await d.proc.wait()
    assert d.proc.returncode == 0
    assert "was unmounted: stopping" in d.log.read_text()
    assert await t.verify() == (t.npages, 0)
    assert (await t.command("stats"))["alone"] == "0", "handed back, not left to serve itself"


async def test_a_failing_uffd_ioctl_is_logged_by_name(daemon, sock_path, targets, tunables, caplog):
    from memfs import core, selection
    from memfs.core import lib
    t = await targets(c_target(sock_path, 1, "--pattern", "text"))
    s = daemon.sessions[t.session_id]
    tunables(debug_fail_ioctl=1 << lib.MC_IOCTL_WRITEPROTECT)
    res = await s.pager.compress(selection.all_runs(s.native))
    assert res.done == 0
    await wait_for(lambda: "UFFDIO_WRITEPROTECT failed" in caplog.text, timeout=5)
    line = next(x for x in caplog.text.splitlines() if "UFFDIO_WRITEPROTECT failed" in x)
    assert f"session {s.id}" in line and "EINVAL" in line
    await s.pager.compress(selection.all_runs(s.native))  # fails again: told later, not now
    await trio.sleep(1)
    assert caplog.text.count("UFFDIO_WRITEPROTECT failed") == 1
    assert core.set_tunables is not None
    tunables(debug_fail_ioctl=0)
    assert (await s.pager.compress(selection.all_runs(s.native))).done == t.npages
    assert await t.verify() == (t.npages, 0)
