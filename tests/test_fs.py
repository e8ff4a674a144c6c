"""The control filesystem, driven the way people and scripts drive it: bash, cat, echo, awk."""
from __future__ import annotations

import errno
import os
import re
import select
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from fsutil import NOBODY, OTHER_UID, flat, is_mounted, page_states, sh
from helpers import C_TARGET, PAGE, ROOT, c_target, pages_present, proc_status_kb, wait_for

from memfs import PROTOCOL_VERSION, __version__

SHELL_ERRORS = {errno.EINVAL: "Invalid argument", errno.ERANGE: "Numerical result out of range",
                errno.EAGAIN: "Resource temporarily unavailable", errno.EOPNOTSUPP: "Operation not supported",
                errno.ESRCH: "No such process", errno.EACCES: "Permission denied"}


async def write(path, text, user=None):
    """`echo TEXT > PATH` in bash; returns the errno the shell reported (0 if none)."""
    rc, _, err = await sh(f"echo '{text}' > {path}", user=user)
    if rc == 0:
        return 0
    for e, msg in SHELL_ERRORS.items():
        if msg in err:
            return e
    raise AssertionError(f"unexpected shell error for {text!r} > {path}: {err}")


async def test_tree_follows_sessions(fsd, targets):
    d = await fsd()
    assert (d.mnt / "version").read_text() == f"memfs {__version__} protocol {PROTOCOL_VERSION}\n"
    assert os.listdir(d.mnt / "sessions") == []
    t = await targets(c_target(d.sock, 4, "--ranges", "2"))
    s = d.session_dir(t.session_id)
    assert os.readlink(d.mnt / "by-pid" / str(t.pid)) == f"../sessions/{t.session_id}"
    assert (d.mnt / "by-pid" / str(t.pid) / "pid").read_text() == f"{t.pid}\n"
    assert (s / "comm").read_text() == "memfs-target\n"
    assert (s / "mode").read_text() == "full\n" and (s / "state").read_text() == "running\n"
    assert sorted(os.listdir(s / "ranges")) == ["0", "1"]
    r1 = s / "ranges" / "1"
    assert int((r1 / "start").read_text(), 16) == t.addr + 512 * PAGE
    assert int((r1 / "length").read_text()) == 512 * PAGE and os.path.getsize(r1 / "data") == 512 * PAGE
    # the usual tools
    rc, out, _ = await sh(f"find {d.mnt} | wc -l; ls -l {s}/ranges/0; grep -r faults_wp {d.mnt}/stat {s}/stat; "
                          f"stat -c %s {s}/ranges/0/pages; cat {s}/stat | wc -l")
    assert rc == 0 and "faults_wp 0" in out and "-r--------" in out
    # sizes do not lie cat into printing nothing
    rc, out, _ = await sh(f"cat {s}/stat")
    assert "rss_anon_bytes" in out
    assert flat(s / "stat")["registered_bytes"] == str(4 << 20)
    await t.exit()
    await wait_for(lambda: not os.path.exists(s))
    assert os.listdir(d.mnt / "by-pid") == []


async def test_verbs_change_exactly_the_pages_named(fsd, targets):
    d = await fsd()
    t = await targets(c_target(d.sock, 4))  # 1024 pages: zero, text, ints, random in turn
    s = d.session_dir(t.session_id)
    r = s / "ranges" / "0"

    assert await write(r / "ctl", "evict pages=10-19") == 0
    st = page_states(d, t.session_id)
    assert all(st[i] in ("compressed", "zero") for i in range(10, 20)), st[10:20]
    assert all(x == "resident" for i, x in enumerate(st) if not 10 <= i < 20), \
        {i: x for i, x in enumerate(st) if x != "resident" and not 10 <= i < 20}
    present = t.present()
    assert [i for i, p in enumerate(present) if not p] == list(range(10, 20)), "pagemap agrees with pages"

    lo, hi = t.addr + 100 * PAGE, t.addr + 108 * PAGE
    assert await write(s / "ctl", f"compress addr=0x{lo:x}-0x{hi:x}") == 0
    st = page_states(d, t.session_id)
    assert {st[i] for i in range(100, 108)} == {"clean", "resident"}  # random pages stay resident
    assert [i for i, x in enumerate(st) if x == "clean"] == [i for i in range(100, 108) if i % 4 != 3]

    assert await write(r / "ctl", "prefetch pages=10-14") == 0
    st = page_states(d, t.session_id)
    assert all(st[i] in ("clean", "resident") for i in range(10, 15))
    assert all(st[i] in ("compressed", "zero") for i in range(15, 20))

    # bytes=N: coldest first.  Dirty some text pages through write faults: the youngest.
    assert await write(r / "ctl", "compress") == 0
    young = list(range(101, 201, 4))
    for i in young:
        await t.command(f"write {i} 7")
    await trio.sleep(0.05)
    n_evict = 800
    assert await write(s / "ctl", f"evict bytes={n_evict * PAGE}") == 0
    st = page_states(d, t.session_id)
    out = [i for i, x in enumerate(st) if x in ("compressed", "zero")]
    assert len(out) == n_evict + 5, (len(out), flat(s / "stat"))  # and 15-19 evicted before
    assert not set(young) & set(out), "recently written pages go last"
    assert await t.verify() == (t.npages, 0)


async def test_cold_selector_and_live_config(fsd, targets):
    d = await fsd("--cold-age-ms", "100000")
    t = await targets(c_target(d.sock, 1))
    s = d.session_dir(t.session_id)
    await trio.sleep(0.3)
    assert await write(s / "ctl", "evict cold") == 0
    assert "compressed" not in page_states(d, t.session_id), "nothing is 100 s old yet"
    assert await write(d.mnt / "config" / "cold_age_ms", "200") == 0
    assert (s / "config" / "cold_age_ms").read_text() == "200\n"
    assert await write(s / "ctl", "evict cold") == 0
    assert page_states(d, t.session_id).count("resident") == 0
    # a per-session override, then back to the daemon's value
    assert await write(s / "config" / "cold_age_ms", "999999") == 0
    assert (s / "config" / "cold_age_ms").read_text() == "999999\n"
    assert await write(s / "config" / "cold_age_ms", "inherit") == 0
    assert (s / "config" / "cold_age_ms").read_text() == "200\n"


async def test_data_is_the_targets_memory_in_every_state(fsd, targets):
    d = await fsd()
    t = await targets(c_target(d.sock, 2, "--pattern", "mixed"))
    s = d.session_dir(t.session_id)
    r = s / "ranges" / "0"
    with open(f"/proc/{t.pid}/mem", "rb") as f:  # all pages resident now: safe to read
        f.seek(t.addr)
        truth = f.read(t.npages * PAGE)
    assert await write(r / "ctl", "compress pages=0-99") == 0
    assert await write(r / "ctl", "evict pages=200-399") == 0
    assert await write(r / "ctl", "prefetch pages=300-309") == 0
    assert {"resident", "clean", "compressed", "zero"} <= set(page_states(d, t.session_id))
    before_states = page_states(d, t.session_id)
    before_faults = flat(s / "stat")["faults_missing"]
    before_present = t.present()

    data = (r / "data").read_bytes()

    assert data == truth
    assert page_states(d, t.session_id) == before_states, "reading data changes no page"
    assert flat(s / "stat")["faults_missing"] == before_faults, "reading data faults nothing in"
    assert t.present() == before_present
    rc, out, _ = await sh(f"dd if={r}/data bs=4096 skip=201 count=1 status=none | cmp - <(dd if={r}/data bs=1 skip={201 * PAGE} count=4096 status=none) && echo same")
    assert out.strip() == "same"


async def test_errors_reach_the_shell(fsd, targets):
    d = await fsd()
    t = await targets(c_target(d.sock, 1))
    s = d.session_dir(t.session_id)
    r = s / "ranges" / "0"
    assert await write(s / "ctl", "bogus") == errno.EINVAL
    assert await write(s / "ctl", "evict pages=x") == errno.EINVAL
    assert await write(s / "ctl", "evict bytes=12Q") == errno.EINVAL
    assert await write(s / "ctl", "evict all extra") == errno.EINVAL
    assert await write(r / "ctl", "evict pages=250-300") == errno.ERANGE
    assert await write(s / "ctl", f"evict addr=0x10-0x{PAGE * 4:x}") == errno.ERANGE
    assert await write(r / "ctl", "compress bytes=1G") == errno.EAGAIN
    assert await write(d.mnt / "ctl", "evict pages=1-2") == errno.EINVAL
    assert await write(d.mnt / "config" / "cold_age_ms", "-5") == errno.EINVAL
    assert await write(d.mnt / "config" / "soft_cap_bytes", "lots") == errno.EINVAL
    assert (d.mnt / "config" / "soft_cap_bytes").read_text() == "max\n", "old value kept"
    assert await write(s / "stat", "1") == errno.EACCES
    # several commands in one write, or a write past offset 0: refused, nothing done
    rc, _, err = await sh(f"printf 'evict\\nevict\\n' | dd of={s}/ctl bs=64 status=none")
    assert "Invalid argument" in err
    assert "compressed" not in page_states(d, t.session_id)
    rc, _, err = await sh(f"exec 3>{s}/ctl; printf 'evict' | dd of={s}/ctl bs=1 seek=3 conv=notrunc status=none")
    assert rc != 0 and "Invalid argument" in err
    # evict in wp-only mode
    w = await targets(c_target(d.sock, 1, agent=False))
    ws = d.session_dir(w.session_id)
    assert (ws / "mode").read_text() == "wp-only\n"
    assert await write(ws / "ctl", "evict") == errno.EOPNOTSUPP
    assert await write(ws / "ctl", "compress") == 0
    # the session ended while a ctl stayed open
    fd = os.open(s / "ctl", os.O_WRONLY)
    await t.kill()
    await wait_for(lambda: not os.path.exists(s))
    with pytest.raises(OSError) as e:
        os.write(fd, b"evict\n")
    os.close(fd)
    assert e.value.errno in (errno.ESRCH, errno.ENOENT)


async def test_poll_on_events_wakes_on_change(fsd, targets):
    d = await fsd()
    t = await targets(c_target(d.sock, 1))
    s = d.session_dir(t.session_id)
    for path in (s / "events", d.mnt / "events"):
        fd = os.open(path, os.O_RDONLY)
        try:
            first = os.pread(fd, 4096, 0).decode()
            assert "evict 0" in first or "evict" in first
            p = select.poll()
            p.register(fd, select.POLLIN | select.POLLPRI)
            assert await trio.to_thread.run_sync(p.poll, 200) == [], "no change, no wakeup"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write, s / "ctl", "compress")
                ready = await trio.to_thread.run_sync(p.poll, 10000)
            assert ready and ready[0][1] & select.POLLIN
            again = os.pread(fd, 4096, 0).decode()
            assert flat_text(again)["compress"] == str(int(flat_text(first)["compress"]) + 1)
            assert await trio.to_thread.run_sync(p.poll, 200) == [], "re-armed by reading again"
        finally:
            os.close(fd)


def flat_text(text):
    return dict(line.split() for line in text.splitlines())


async def test_metrics_parse_as_prometheus(fsd, targets):
    from prometheus_client.parser import text_string_to_metric_families
    d = await fsd()
    t = await targets(c_target(d.sock, 1))
    await write(d.session_dir(t.session_id) / "ctl", "evict")
    families = {f.name: f for f in text_string_to_metric_families((d.mnt / "metrics").read_text())}
    assert families["memfs_sessions_active"].samples[0].value == 1
    evicted = [smp for smp in families["memfs_session_evict_ok"].samples]
    assert evicted and evicted[0].labels == {"session": str(t.session_id), "pid": str(t.pid), "comm": "memfs-target"}
    assert evicted[0].value == t.npages
    assert families["memfs_session_rss_anon_bytes"].type == "gauge"


async def test_trace_streams_events(fsd, targets):
    d = await fsd("--readahead-max-pages", "0")  # one fault line per page read back
    t = await targets(c_target(d.sock, 1))
    s = d.session_dir(t.session_id)
    await write(s / "ctl", "evict")
    proc = await trio.lowlevel.open_process(["cat", str(s / "trace")], stdout=subprocess.PIPE)
    try:
        await t.verify()
        buf = b""
        with trio.fail_after(10):
            while buf.count(b" fault ") < 50:
                buf += await proc.stdout.receive_some(65536)
    finally:
        proc.kill()
        await proc.wait()
    line = next(x for x in buf.decode().splitlines() if " fault " in x)
    assert re.fullmatch(r"\d+\.\d{6} fault range=0 page=\d+ count=1 latency_ns=\d+ tid=\d+", line)


async def test_permissions(fsd, targets, public_tmp, unprivileged_userfaultfd):
    d = await fsd("--allow-other", base=public_tmp)  # others must reach the socket and the mountpoint
    root_t = await targets(c_target(d.sock, 1))
    user_t = await targets(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                            *c_target(d.sock, 1)])
    rs, us = d.session_dir(root_t.session_id), d.session_dir(user_t.session_id)
    # every file is root's, but for the memory-revealing ones of a user's session
    assert os.stat(rs / "ctl").st_uid == 0 and os.stat(us / "stat").st_uid == 0
    assert os.stat(us / "ranges" / "0" / "data").st_uid == OTHER_UID
    for who in (NOBODY, OTHER_UID):
        rc, out, _ = await sh(f"cat {d.mnt}/stat {rs}/stat {us}/stat", user=who)
        assert rc == 0 and "faults_wp" in out, "anyone may read counters"
        assert await write(rs / "ctl", "evict", user=who) == errno.EACCES
        assert await write(d.mnt / "config" / "cold_age_ms", "5", user=who) == errno.EACCES
        rc, _, err = await sh(f"cat {rs}/ranges/0/data {rs}/ranges/0/pages", user=who)
        assert "Permission denied" in err, "nobody reads root's memory"
    rc, out, err = await sh(f"head -c 4096 {us}/ranges/0/data | wc -c; head -1 {us}/ranges/0/pages", user=OTHER_UID)
    assert rc == 0 and out.split()[0] == "4096", "the owner reads its own session"
    rc, _, err = await sh(f"cat {us}/ranges/0/data", user=NOBODY)
    assert "Permission denied" in err
    assert await write(us / "ctl", "evict") == 0  # root steers everyone
    assert await user_t.verify() == (user_t.npages, 0)


async def test_without_allow_other_only_root_gets_in(fsd, public_tmp):
    d = await fsd(base=public_tmp)
    rc, out, err = await sh(f"ls -d {public_tmp}; cat {d.mnt}/stat", user=NOBODY)
    assert out.strip() == str(public_tmp), "the way there is open"
    assert rc != 0 and "Permission denied" in err, "the kernel keeps others out of a FUSE mount"


async def test_a_line_of_pages_split_between_reads_stays_whole(fsd, targets):
    """`pages` is made per read; a line cut by one read and finished by the next
    must show one state of its page even if the page changed in between."""
    d = await fsd()
    t = await targets(c_target(d.sock, 1, "--pattern", "text"))  # 256 pages, all resident
    s = d.session_dir(t.session_id)
    fd = os.open(s / "ranges" / "0" / "pages", os.O_RDONLY)
    try:
        head = os.read(fd, 10)  # direct_io: exactly this read reaches the daemon
        assert head == b"  0 reside"
        assert await write(s / "ctl", "evict") == 0
        rest = b""
        while chunk := os.read(fd, 7):  # cut every line somewhere
            rest += chunk
    finally:
        os.close(fd)
    lines = (head + rest).decode().splitlines()
    assert len(lines) == t.npages and all(len(line.split()) == 4 for line in lines), lines[:3]
    assert lines[0].split()[1] == "resident", "the first line keeps the state it started with"
    assert {line.split()[1] for line in lines[1:]} == {"compressed"}, "later lines are read afresh"


async def test_pages_of_a_huge_range_streams(fsd, targets):
    d = await fsd()
    t = await targets(c_target(d.sock, 4096, "--pattern", "none"))  # 4 GiB, never touched
    s = d.session_dir(t.session_id)

    def hwm_kb():
        return proc_status_kb(d.proc.pid, "VmHWM")

    before = hwm_kb()
    rc, out, _ = await sh(f"wc -l < {s}/ranges/0/pages; awk 'NR==1048576 {{print $1, $2}}' {s}/ranges/0/pages")
    assert out.split() == ["1048576", "1048575", "untouched"]
    grown = hwm_kb() - before
    assert grown < 64 * 1024, f"the daemon grew {grown} kB while streaming 1 Mi lines"
    st = flat(s / "stat")
    assert st["pages_untouched"] == str(1 << 20)


async def test_man_page_example_script(fsd, targets, tmp_path):
    d = await fsd()
    rendered = subprocess.run(["man", "-l", str(ROOT / "man" / "memfs.5")], capture_output=True, text=True,
                              env=dict(os.environ, LC_ALL="C", MANWIDTH="120"), check=True).stdout
    m = re.search(r"^( *)#!/bin/sh\n.*?^ *done$", rendered, re.S | re.M)
    assert m, "man/memfs.5 lacks the example script"
    script = tmp_path / "evict-coldest.sh"
    script.write_text(textwrap.dedent(m.group(0)) + "\n")
    ts = [await targets(c_target(d.sock, 96)), await targets(c_target(d.sock, 96))]
    other_prog = tmp_path / "other-prog"  # another comm
    other_prog.symlink_to(C_TARGET)
    other = await targets([str(other_prog), "--mb", "8", "--socket", d.sock])
    rc, out, err = await sh(f"MEMFS={d.mnt} sh {script} memfs-target")
    assert rc == 0, err
    lines = [x for x in out.splitlines() if "saved" in x]
    assert len(lines) == 2, out
    for t in ts:
        st = flat(d.session_dir(t.session_id) / "stat")
        evicted = sum(int(st[f"pages_{k}"]) for k in ("compressed", "zero"))
        assert evicted == 64 * 256, "the coldest 64 MiB of each matching session"
        assert f"{t.pid} memfs-target: saved" in out
    assert "compressed" not in page_states(d, other.session_id), "other programs are left alone"


async def test_sigterm_unmounts_and_a_stale_mount_is_cleaned(fsd, targets, tmp_path):
    d = await fsd()
    t = await targets(c_target(d.sock, 2))
    await write(d.session_dir(t.session_id) / "ctl", "evict")
    d.proc.send_signal(signal.SIGTERM)
    await d.proc.wait()
    assert not is_mounted(d.mnt)
    assert await t.verify() == (t.npages, 0), "shutdown gave the target its memory back"
    d2 = await fsd()
    d2.proc.kill()
    await d2.proc.wait()
    with pytest.raises(OSError) as e:
        os.stat(d2.mnt / "version")
    assert e.value.errno == errno.ENOTCONN
    d3 = await fsd()
    assert (d3.mnt / "version").exists()
    assert "stale mount" in d3.log.read_text()


SELECTORS = ("all", "cold", "pages", "addr", "bytes")


@pytest.mark.parametrize("verb", ["compress", "evict", "prefetch"])
async def test_each_verb_with_each_selector(fsd, targets, verb):
    """Text pages only (all compressible, none zero), so every named page must change."""
    # the young pages must stay young while 32 of them are evicted and written one by one,
    # which took over 400 ms once on a fresh clone: a cold age with room to spare
    d = await fsd("--cold-age-ms", "1500")
    for sel in SELECTORS:
        t = await targets(c_target(d.sock, 1, "--pattern", "text"))
        s = d.session_dir(t.session_id)
        n = t.npages
        young = set(range(0, n, 8))  # used just now; the rest was registered >1500 ms ago
        await trio.sleep(1.6)
        # the young pages are evicted and written back by the target: their age restarts
        for i in sorted(young):
            assert await write(s / "ctl", f"evict pages={i}") == 0
            await t.command(f"write {i} {i % 200 + 1}")
        if verb == "prefetch":  # something to prefetch: everything evicted, ages kept
            assert await write(s / "ctl", "evict") == 0
        before = page_states(d, t.session_id)
        arg = {"all": "all", "cold": "cold", "pages": "pages=10-29",
               "addr": f"addr=0x{t.addr + 40 * PAGE + 100:x}-0x{t.addr + 50 * PAGE:x}",
               "bytes": f"bytes={64 * PAGE}"}[sel]
        want = {"all": set(range(n)), "cold": set(range(n)) - young, "pages": set(range(10, 30)),
                "addr": set(range(40, 50)), "bytes": None}[sel]

        assert await write(s / "ctl", f"{verb} {arg}") == 0

        after = page_states(d, t.session_id)
        changed = {i for i in range(n) if after[i] != before[i]}
        present = t.present()
        if sel == "bytes":
            assert len(changed) == 64
            if verb != "prefetch":
                assert not changed & young, "the coldest go first"
            else:
                assert young <= changed, "prefetch takes the most recently used first"
        else:
            if verb == "prefetch":
                want &= {i for i in range(n) if before[i] in ("compressed", "zero")}
            assert changed == want, f"{verb} {arg}: changed {sorted(changed ^ want)[:10]}..."
        target_state = {"compress": "clean", "evict": "compressed", "prefetch": "clean"}[verb]
        assert all(after[i] == target_state for i in changed)
        assert all(present[i] == (after[i] in ("resident", "clean")) for i in range(n)), \
            "pages and pagemap agree"
        assert await t.verify() == (n, 0)
        await t.exit()
