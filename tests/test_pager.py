"""The pager core on real targets: eviction frees memory, restores are exact,
writes during eviction survive, sessions end cleanly whatever the target does."""
from __future__ import annotations

import errno
import os
import random
import signal

import pytest
import trio

from helpers import c_target, py_target, wait_for

from memfs import control, core, pager, selection

MB = 1024 * 1024


def session(daemon, target):
    return daemon.sessions[target.session_id]


def chunks_of(monkeypatch, pages: int | None) -> None:
    """Operations in chunks of `pages` (None: as shipped), so that even a
    small target keeps both of an operation's workers busy (Pager._spread)."""
    if pages:
        monkeypatch.setattr(pager, "CHUNK_PAGES", pages)
        monkeypatch.setattr(pager, "PREFETCH_CHUNK_PAGES", pages)


@pytest.mark.parametrize("kind", ["c", "python"])
async def test_evict_all_frees_memory_and_restores_every_byte(daemon, sock_path, targets, kind):
    argv = c_target(sock_path, 64) if kind == "c" else py_target(sock_path, 64, "--fill-after-start")
    t = await targets(argv)
    s = session(daemon, t)
    assert s.mode == "full"
    n = t.npages
    before = t.rss_kb()

    res = await s.pager.evict(selection.all_runs(s.native))

    assert res.done == n
    assert before - t.rss_kb() >= 0.9 * 64 * MB / 1024, "RssAnon must drop by 90% of the range"
    assert not any(t.present()), "evicted pages must be gone from pagemap"
    info = s.native.range_info(0)
    assert info.pages_in["zero"] == n // 4 and info.pages_in["compressed"] == n - n // 4
    pages = s.native.page_info(0, 0, n)
    assert all(pages[i].csize == 0 for i in range(n) if pages[i].state == 4), "zero pages hold no blob"
    assert core.store_stats()["blobs"] == n - n // 4
    c = s.counters()
    assert c["store_pages"] == n and c["store_bytes_logical"] == 64 * MB
    assert 0 < c["store_bytes_compressed"] < c["store_bytes_logical"]
    assert c["store_bytes_used"] >= c["store_bytes_compressed"]
    assert daemon.counters()["store_bytes_compressed"] == c["store_bytes_compressed"], "the top level sums once"

    ok, bad = await t.verify()

    assert (ok, bad) == (n, 0)
    c = s.counters()
    assert c["zero_fill"] == n // 4, "zero pages come back as zero pages, without a blob"
    assert c["restore_ok"] == n - n // 4 and c["restore_fail"] == 0
    assert c["faults_missing"] >= 1


async def test_eviction_in_small_chunks_frees_every_page(daemon, sock_path, targets, monkeypatch):
    """An eviction's two workers overlap: one write-protects its chunk while the
    agent's REMOVE of the other's waits to be read (EAGAIN).  The first must
    wait for the fault thread and go on, not leave its pages behind."""
    chunks_of(monkeypatch, 64)
    t = await targets(c_target(sock_path, 8))
    s = session(daemon, t)
    runs = selection.all_runs(s.native)
    for _ in range(5):
        res = await s.pager.evict(runs)
        assert res.done == t.npages, res
        assert (await s.pager.prefetch(runs)).done == t.npages
    assert await t.verify() == (t.npages, 0)


async def test_an_operation_wakes_the_idle_policy_once_a_period_at_most(daemon, sock_path, targets, tunables):
    """A prefetch notifies the session on every batch, and nothing faults: an idle
    policy woken by that must still go round once a period at most, not once a batch
    (which took most of a CPU from the prefetch)."""
    t = await targets(c_target(sock_path, 16))
    s = session(daemon, t)
    daemon.config.set("damon_read_ms", "100")
    runs = selection.all_runs(s.native)
    await s.pager.evict(runs)
    await wait_for(lambda: s.policy.idle, timeout=10)
    tunables(debug_prefetch_delay_us=10_000)  # 64 batches of 10 ms over two workers
    rounds, t0 = s.policy.rounds, trio.current_time()
    assert (await s.pager.prefetch(runs)).done == t.npages
    periods = (trio.current_time() - t0) / 0.1
    assert s.policy.rounds - rounds <= periods + 2, f"{s.policy.rounds - rounds} rounds in {periods:.1f} periods"


async def test_oldest_first_selection_counts_only_pages_it_may_take(daemon, sock_path, targets):
    """The policy's selection, oldest first and capped, skipping pages whose compression
    did not pay: when all of the oldest pages are such pages, the cap must still be
    filled from younger ones (the age classes are counted over the pages taken)."""
    t = await targets(c_target(sock_path, 1))  # mixed: every fourth page is random
    s = session(daemon, t)
    await s.pager.compress(selection.all_runs(s.native))  # the rest turns clean
    await trio.sleep(0.6)  # the random pages, still resident, are now in an older age class
    for i in range(1, 64, 4):
        await t.command(f"write {i} 170")  # young, resident, never tried
    resident = core.STATE_BITS["resident"]
    assert s.native.select(None, resident, skip=core.SKIP_INCOMPRESSIBLE)[1] == 16
    runs, n = s.native.select(None, resident, max_pages=4, order=1, skip=core.SKIP_INCOMPRESSIBLE)
    assert n == 4 and all(first % 4 == 1 for _, first, _ in runs), runs


async def test_compress_bytes_chooses_among_pages_compress_would_take(daemon, sock_path, targets):
    """`compress bytes=N`, oldest first, leaves out the pages compress itself would
    skip (their last compression did not pay): with only those older, it must take a
    younger page, not pick an old one, do nothing and answer EAGAIN."""
    t = await targets(c_target(sock_path, 1))  # mixed: every fourth page is random
    s = session(daemon, t)
    await s.pager.compress(selection.all_runs(s.native))  # the rest turns clean
    await trio.sleep(0.6)  # the random pages, still resident, are now in an older age class
    await t.command("write 1 170")  # young, resident, never tried
    res = await control.run_on_session(s, control.parse_command(f"compress bytes={core.PAGE_SIZE}"))
    assert res.done == 1 and s.native.range_info(0).pages_in["resident"] == t.npages // 4


def fault_thread_cpus() -> list[set[int]]:
    """The CPUs each fault thread (`memfs-fault`) of this process may run on."""
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == "memfs-fault":
                    out.append(os.sched_getaffinity(int(tid)))
        except OSError:
            pass  # a thread that just ended
    return out


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
async def test_the_fault_thread_follows_the_thread_that_faults(daemon, sock_path, targets):
    """Wherever the target's thread runs, the fault thread goes to that CPU (a
    cross-CPU wake-up costs more than a fault here); nobody pins it by hand.  A
    fault thread kept waiting by busy threads (the machine's, under a loaded CI)
    rightly gives that up for 0.2 s (fault_thread_starved), so a round may try
    again after that; one that never follows fails."""
    t = await targets(c_target(sock_path, 16))
    s = session(daemon, t)
    runs = selection.all_runs(s.native)
    seed = 0
    for cpu in (1, 0, 1):
        for _ in range(5):
            await s.pager.evict(runs)
            for tid in os.listdir(f"/proc/{t.pid}/task"):
                os.sched_setaffinity(int(tid), {cpu})
            seed += 1
            await t.command(f"touch rand 1024 {seed}")
            if {cpu} in fault_thread_cpus():
                break
            await trio.sleep(0.3)  # past the back-off
        else:
            raise AssertionError(f"target on CPU {cpu}, fault threads may run on {fault_thread_cpus()}; "
                                 f"starved {s.counters()['fault_thread_starved']} times")
    assert s.counters()["fault_thread_moves"] >= 2
    assert await t.verify() == (t.npages, 0)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
async def test_an_eviction_does_not_put_the_fault_thread_off_sched_idle(daemon, sock_path, targets):
    """Each REMOVE event the fault thread reads lets the target's agent go on
    zapping, and on their shared CPU the agent preempts the SCHED_IDLE thread:
    that wait is the eviction's handshake, not starving.  Counted as starving,
    it left the thread ordinary and unpinned for the first 0.2 s of the faults
    after an evict, served across vCPUs (random-fault p99 5x zram's)."""
    t = await targets(c_target(sock_path, 256))
    s = session(daemon, t)
    runs = selection.all_runs(s.native)
    for tid in os.listdir(f"/proc/{t.pid}/task"):  # the agent too: it zaps where the faults come from
        os.sched_setaffinity(int(tid), {0})
    await s.pager.evict(runs)
    await t.command("touch rand 1024 1")  # the fault thread follows the target to CPU 0
    before = s.counters()["fault_thread_starved"]
    for _ in range(4):
        await t.command("touch seq")  # every page back, its copy kept: the evict is the agent's zapping
        await s.pager.evict(runs)
        await t.command("touch rand 64 2")  # a fault after it, which runs the periodic check
    assert s.counters()["fault_thread_starved"] == before
    assert await t.verify() == (t.npages, 0)


async def test_a_target_in_another_session_does_not_make_a_look_per_fault(daemon, sock_path, targets):
    """In its own session (another autogroup) a target that works between faults does
    not preempt the SCHED_IDLE fault thread it wakes, so every answer looks 'apart':
    the fault thread must learn that its looks find the two together and look
    rarely, not read /proc (~25 us, while the target waits) after every fault."""
    t = await targets(["setsid", *c_target(sock_path, 4)])  # setsid execs in place: t.pid is the target
    s = session(daemon, t)
    for tid in os.listdir(f"/proc/{t.pid}/task"):
        os.sched_setaffinity(int(tid), {0})
    await s.pager.evict(selection.all_runs(s.native))
    c0 = s.counters()
    out = await t.command("touch rand 400 1 1000")  # ~0.4 s: 20 periodic looks, a few to learn
    c1 = s.counters()
    assert int(out["wall_ns"]) >= 400 * 1_000_000, "the target did not work between its faults"
    looks = c1["fault_thread_looks"] - c0["fault_thread_looks"]
    assert c1["faults_missing"] - c0["faults_missing"] >= 400
    assert looks < 100, f"{looks} looks for 400 faults"
    assert await t.verify() == (t.npages, 0)


async def test_fault_latency_counts_the_daemons_part_not_the_targets_work(daemon, sock_path, targets):
    """A fault's latency runs from reading it to issuing the answer.  The ioctl
    that wakes a faulting thread on the fault thread's own CPU returns only after
    that thread has run on to its next fault: timed after it, a target that works
    2 ms between faults showed 2 ms faults."""
    t = await targets(c_target(sock_path, 4))
    s = session(daemon, t)
    for tid in os.listdir(f"/proc/{t.pid}/task"):
        os.sched_setaffinity(int(tid), {0})  # the fault thread follows it there
    await s.pager.evict(selection.all_runs(s.native))
    c0, h0 = s.counters(), s.histogram()
    out = await t.command("touch rand 200 1 2000")
    c1, h1 = s.counters(), s.histogram()
    assert int(out["wall_ns"]) >= 200 * 2_000_000, "the target did not work between its faults"
    assert c1["faults_missing"] - c0["faults_missing"] >= 200
    p50 = core.percentile_ns([b - a for a, b in zip(h0, h1)], 0.5)
    assert p50 < 500_000, f"fault latency p50 {p50} ns: the target's 2 ms of work counted as the fault's"
    assert await t.verify() == (t.npages, 0)


async def test_compress_keeps_pages_and_evict_of_clean_pages_is_instant(daemon, sock_path, targets):
    t = await targets(c_target(sock_path, 8))
    s = session(daemon, t)
    n, random_pages = t.npages, t.npages // 4
    res = await s.pager.compress(selection.all_runs(s.native))
    # random pages do not compress: they stay resident, without a copy, until evicted
    assert res.done == n - random_pages
    assert all(t.present()), "compress must not evict"
    info = s.native.range_info(0)
    assert info.pages_in["clean"] == n - random_pages and info.pages_in["resident"] == random_pages
    c = s.counters()
    assert c["compress_incompressible"] == random_pages
    await s.pager.evict(selection.all_runs(s.native))
    c2 = s.counters()
    assert c2["compress_ok"] == c["compress_ok"] + random_pages, \
        "clean pages need no second compression; incompressible ones are kept raw to be freed"
    assert c2["evict_ok"] == n
    assert await t.verify() == (n, 0)


async def test_writes_after_compress_and_prefetch_are_tracked(daemon, sock_path, targets):
    t = await targets(c_target(sock_path, 4))
    s = session(daemon, t)
    runs = selection.all_runs(s.native)
    await s.pager.evict(runs)
    res = await s.pager.prefetch(runs)
    assert res.done == t.npages
    assert all(t.present())
    c = s.counters()
    assert c["prefetch_decode_ns"] > 0 and c["prefetch_copy_ns"] > 0, "where the prefetch's CPU went"
    info = s.native.range_info(0)
    # mixed data: each zero page sits between others, so it is copied in with them, clean
    assert info.pages_in["clean"] == t.npages
    await t.command("write 3 170")
    assert s.native.range_info(0).pages_in["clean"] == info.pages_in["clean"] - 1
    assert s.counters()["faults_wp"] == 1 and s.counters()["prefetch_hits"] == 1
    await s.pager.evict(runs)
    assert await t.verify() == (t.npages, 0)


async def test_prefetch_maps_long_zero_runs_to_the_zero_page(daemon, sock_path, targets):
    t = await targets(c_target(sock_path, 4, "--pattern", "zero"))
    s = session(daemon, t)
    runs = selection.all_runs(s.native)
    await s.pager.evict(runs)
    res = await s.pager.prefetch(runs)
    assert res.done == t.npages and all(t.present())
    info = s.native.range_info(0)
    assert info.pages_in["resident"] == t.npages and info.pages_in["clean"] == 0, \
        "a long run of zero pages is mapped to the zero page, without a copy"
    assert s.counters()["zero_fill"] == t.npages
    assert t.rss_kb() < 1024, "the zero page costs the target no memory"
    assert await t.verify() == (t.npages, 0)


async def test_pages_discarded_during_prefetch_stay_discarded(daemon, sock_path, targets, tunables):
    """Prefetch copies pages in without the session lock; a MADV_DONTNEED by the target
    meanwhile must win: a copy landing after the kernel zapped the range would bring
    back data the target threw away (the events gate orders the two).  Each batch
    waits 1 ms between its check and its copy, so that discards meet batches in that
    window; without the gate this fails within a few rounds."""
    tunables(debug_prefetch_delay_us=1000)
    t = await targets(c_target(sock_path, 2))  # 8 batches: a discard often meets one in flight
    s = session(daemon, t)
    runs = selection.all_runs(s.native)
    rng = random.Random(7)
    discards = 0
    for _ in range(100):
        await s.pager.evict(runs)
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            async def prefetch():
                await s.pager.prefetch(runs)
                done.set()
            nursery.start_soon(prefetch)
            while not done.is_set():  # discard pages ahead of and behind the prefetch
                r = await t.command(f"discard {rng.randrange(t.npages - 4)} 4")
                assert r == {"_": "DISCARD", "rc": "0"}
                discards += 1
        assert await t.verify() == (t.npages, 0), "a discarded page came back with old data"
    assert discards >= 100 and s.counters()["events_remove"] >= discards


async def stress(daemon, t, seconds: float, recompress: bool = False):
    """Writers in the target while the daemon evicts and prefetches everything in a
    loop (and, with `recompress`, recompresses the evicted copies in between)."""
    s = session(daemon, t)
    runs = selection.all_runs(s.native)
    rounds = 0
    async with trio.open_nursery() as nursery:
        async def churn():
            nonlocal rounds
            while True:
                await s.pager.evict(runs)
                if recompress:
                    await s.pager.recompress(runs)
                await s.pager.prefetch(runs)
                rounds += 1
                await trio.sleep(0)

        nursery.start_soon(churn)
        r = await t.command(f"stress {seconds} 4", timeout=seconds + 120)
        nursery.cancel_scope.cancel()
    return r, rounds, s.counters()


@pytest.mark.parametrize("access_source,chunk_pages", [("none", None), ("sampler", None), ("none", 64)])
async def test_writes_during_eviction_are_never_lost(daemon, sock_path, targets, monkeypatch, chunk_pages):
    """In chunks of 64 pages, an eviction's two workers overlap: one compresses
    (write-protecting) while the agent frees the other's chunk."""
    chunks_of(monkeypatch, chunk_pages)
    t = await targets(c_target(sock_path, 2))
    r, rounds, c = await stress(daemon, t, 5)
    assert int(r["writes"]) > 10000 and rounds >= 3
    assert c["faults_held"] > 0, "writes must have met pages being evicted"
    assert int(r["bad"]) == 0, f"lost writes: {r}"
    assert await t.verify() == (t.npages, 0)


async def test_writes_during_recompress_are_never_lost(daemon, sock_path, targets, monkeypatch):
    """Writes drop copies while a recompress has them pinned and unlocked: the
    new blob must not land on a page that was written meanwhile."""
    chunks_of(monkeypatch, 64)
    t = await targets(c_target(sock_path, 2))
    r, rounds, c = await stress(daemon, t, 5, recompress=True)
    assert int(r["writes"]) > 10000 and rounds >= 3
    assert c["recompress_ok"] > 0, "the copies must have been recompressed"
    assert int(r["bad"]) == 0, f"lost writes: {r}"
    assert await t.verify() == (t.npages, 0)
    assert (await t.command("stop"))["rc"] == "0"
    await wait_for(lambda: t.session_id not in daemon.sessions)
    assert core.store_stats()["blobs"] == 0, "a blob swapped or dropped meanwhile was leaked"


async def test_recompress_shrinks_copies_and_every_page_comes_back(daemon, sock_path, targets):
    t = await targets(c_target(sock_path, 4, "--pattern", "text"))
    s = session(daemon, t)
    runs = selection.all_runs(s.native)
    await s.pager.evict(runs)
    await s.pager.prefetch([(0, 0, 100)])  # some clean pages: resident, with a copy
    before = s.counters()["store_bytes_compressed"]
    res = await s.pager.recompress(runs)
    c = s.counters()
    assert res.done == c["recompress_ok"] == t.npages, "every text copy gets smaller with lz4hc"
    assert res.bytes_out < res.bytes_in and c["store_bytes_compressed"] == before - (res.bytes_in - res.bytes_out)
    assert (await s.pager.recompress(runs)).done == 0, "a recompressed copy stays as it is"
    assert s.counters()["recompress_attempts"] == c["recompress_attempts"], "and is not tried again"
    assert s.counters()["store_pages_recompressed"] == t.npages
    info = s.native.range_info(0)
    assert info.pages_in["clean"] == 100 and info.pages_in["compressed"] == t.npages - 100
    await s.pager.evict(runs)  # the clean pages go without compressing again: their copy is kept
    assert s.counters()["compress_attempts"] == t.npages
    assert await t.verify() == (t.npages, 0), "faults restore every page from the new copies"


@pytest.mark.parametrize("chunk_pages", [None, 64])
async def test_stress_catches_lost_writes_without_the_safety(daemon, sock_path, targets, tunables,
                                                            monkeypatch, chunk_pages):
    """The same stress with held writes switched off must see writes vanish:
    proof that the test above can fail."""
    chunks_of(monkeypatch, chunk_pages)
    tunables(debug_unsafe_evict=1)
    t = await targets(c_target(sock_path, 2))
    r, rounds, c = await stress(daemon, t, 5)
    assert int(r["bad"]) > 0, f"unsafe eviction lost nothing in {rounds} rounds: {r}"


async def test_wp_only_session_tracks_and_never_frees(daemon, sock_path, targets):
    t = await targets(c_target(sock_path, 8, agent=False))
    s = session(daemon, t)
    assert s.mode == "wp-only"
    runs = selection.all_runs(s.native)
    before = t.rss_kb()
    res = await s.pager.compress(runs)
    assert res.done == t.npages - t.npages // 4  # all but the incompressible quarter
    with pytest.raises(OSError) as e:
        await s.pager.evict(runs)
    assert e.value.errno == errno.EOPNOTSUPP
    assert all(t.present()) and t.rss_kb() >= before - 64
    await t.command("write 1 9")
    await t.command("write 1 10")
    c = s.counters()
    assert c["faults_wp"] == 1, "one write-protect fault per clean page dirtied"
    info = s.native.range_info(0)
    assert info.pages_in["clean"] == res.done - 1 and info.pages_in["resident"] == t.npages // 4 + 1
    assert await t.verify() == (t.npages, 0)
    r = await t.command("stop")
    assert r["rc"] == "0"
    assert await t.verify() == (t.npages, 0)


async def test_stop_gives_every_page_back(daemon, sock_path, targets):
    t = await targets(c_target(sock_path, 8))
    s = session(daemon, t)
    await s.pager.evict(selection.all_runs(s.native))
    r = await t.command("stop")
    assert r["rc"] == "0"
    await wait_for(lambda: t.session_id not in daemon.sessions)
    assert all(p for i, p in enumerate(t.present()) if i % 4), "non-zero pages must be back"
    assert core.store_stats()["blobs"] == 0
    assert await t.verify() == (t.npages, 0)
    # unregistered: writes and reads no longer involve the daemon
    await t.command("write 2 1")
    assert await t.verify() == (t.npages, 0)


async def test_target_killed_mid_eviction_leaves_daemon_healthy(daemon, sock_path, targets):
    t = await targets(c_target(sock_path, 64))
    s = session(daemon, t)
    os.kill(t.pid, signal.SIGSTOP)  # the agent cannot answer: the eviction stays in flight
    outcome = {}

    async def evict():
        try:
            outcome["result"] = await s.pager.evict(selection.all_runs(s.native))
        except OSError as e:
            outcome["error"] = e

    async with trio.open_nursery() as nursery:
        nursery.start_soon(evict)
        await wait_for(lambda: s.agent.in_flight)
        assert core.store_stats()["blobs"] > 0
        os.kill(t.pid, signal.SIGKILL)
    await wait_for(lambda: t.session_id not in daemon.sessions)
    assert outcome.get("error") is not None and outcome["error"].errno == errno.ESRCH
    st = core.store_stats()
    assert st["blobs"] == 0 and st["bytes_used"] == 0, "the dead session's store memory is freed"
    assert daemon.counters()["store_bytes_compressed"] == 0
    # and the daemon goes on serving
    t2 = await targets(c_target(sock_path, 4))
    s2 = session(daemon, t2)
    await s2.pager.evict(selection.all_runs(s2.native))
    assert await t2.verify() == (t2.npages, 0)


async def test_an_operation_fails_with_its_workers_error_not_a_group(daemon, sock_path, targets):
    """An operation's two workers meet the same end (a target killed mid-eviction
    fails the native call with ESRCH).  The caller -- a ctl write, whose errno the
    shell prints -- must get that OSError, not an exception group, which the
    filesystem can only report as EIO."""
    t = await targets(c_target(sock_path, 2))
    s = session(daemon, t)

    async def work(chunk):
        await trio.sleep(0)
        raise OSError(errno.ESRCH, "the target is gone")

    with pytest.raises(OSError) as e:
        await s.pager._spread([[1], [2], [3]], work)
    assert e.value.errno == errno.ESRCH


async def test_sixteen_targets_at_once(daemon, sock_path, targets):
    ts = []
    async with trio.open_nursery() as nursery:
        async def one(i):
            ts.append(await targets(c_target(sock_path, 8, "--seed", str(i + 1))))
        for i in range(16):
            nursery.start_soon(one, i)
    assert len(daemon.sessions) == 16
    results = {}
    async with trio.open_nursery() as nursery:
        async def cycle(t):
            s = session(daemon, t)
            res = await s.pager.evict(selection.all_runs(s.native))
            results[t.pid] = (res.done, not any(t.present()), await t.verify())
        for t in ts:
            nursery.start_soon(cycle, t)
    for t in ts:
        done, gone, (ok, bad) = results[t.pid]
        assert done == t.npages and gone and (ok, bad) == (t.npages, 0)
    assert len({t.session_id for t in ts}) == 16
