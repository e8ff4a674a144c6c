"""Finding cold pages (the sampler; DAMON where the kernel allows) and the policy acting on them.

These run a real daemon and real targets with a known hot set, and judge
the daemon against that ground truth through the filesystem."""
from __future__ import annotations

import os
import time

import pytest
import trio

from fsutil import evicted_share, flat, hot_and_cold_target, HOT_PART, page_states, PAGES_PER_MB as MB, sh, wait_cold_part_evicted
from helpers import c_target, wait_for

from memfs import core, selection

SAMPLER = ("--access-source", "sampler", "--sample-ms", "50", "--damon-read-ms", "500")


async def test_sampler_and_policy_evict_the_cold_part_only(fsd, targets):
    """A target uses 16 MiB of 128 MiB; the rest must go, the hot part must stay."""
    d = await fsd(*SAMPLER, "--policy", "evict", "--cold-age-ms", "3000")
    t, cold = await hot_and_cold_target(d, targets, "text")
    hot = HOT_PART
    s = d.session_dir(t.session_id)
    assert flat(s / "stat")["access_source"] == "sampler"
    await wait_cold_part_evicted(d, t, cold, timeout=60, linger=2)
    stat = flat(s / "stat")
    assert int(stat["samples"]) > 0 and int(stat["sampler_cpu_ns"]) > 0, "overhead is reported"
    assert int(stat["policy_evict_pages"]) >= 0.9 * len(cold)
    assert int(stat["promotions"]) <= 0.1 * len(hot), "hot pages were not evicted and faulted back either"
    heat = [line.split() for line in (s / "ranges" / "0" / "heat").read_text().splitlines()]
    # Regions seen used must cover the hot part and little else.  Not "every such region
    # overlaps it": a region split off a used one inherits its frequency (as in DAMON)
    # and keeps it for a window or two, so a piece just past the edge may show as used.
    seen_used = set()
    for r in heat:
        if int(r[3]) > 50:
            seen_used.update(range(int(r[0]), int(r[0]) + int(r[1])))
    assert len(seen_used & set(hot)) >= 0.9 * len(hot), "regions seen used cover the hot part"
    assert len(seen_used - set(hot)) <= 0.05 * len(cold), "regions seen used lie (mostly) in the hot part"
    await t.command("hot off")
    assert await t.verify() == (t.npages, 0)


async def test_soft_cap_keeps_resident_memory_under_it(fsd, targets):
    d = await fsd(*SAMPLER, "--policy", "compress", "--soft-cap-bytes", "24M")
    t = await targets(c_target(d.sock, 64, "--pattern", "text"))
    await t.command(f"hot 0 {8 * MB}")
    s = d.session_dir(t.session_id)

    def resident():
        st = flat(s / "stat")
        return (int(st["pages_resident"]) + int(st["pages_clean"])) * 4096

    await wait_for(lambda: resident() <= 24 << 20, timeout=30, interval=0.2)
    samples = []
    for _ in range(20):  # it stays there while the target runs
        await trio.sleep(0.25)
        samples.append(resident())
    assert max(samples) <= 24 << 20, f"resident went up to {max(samples) >> 20} MiB"
    st = page_states(d, t.session_id)
    assert evicted_share(st, range(8 * MB)) <= 0.05, "the hot 8 MiB stays"
    await t.command("hot off")
    assert await t.verify() == (t.npages, 0)


async def test_changing_cold_age_takes_effect_at_once(fsd, targets):
    d = await fsd(*SAMPLER, "--policy", "evict", "--cold-age-ms", "3600000")
    t = await targets(c_target(d.sock, 8, "--pattern", "text"))
    await trio.sleep(2)
    assert evicted_share(page_states(d, t.session_id), range(t.npages)) == 0, "nothing is an hour old"
    await sh(f"echo 500 > {d.mnt}/config/cold_age_ms", check=True)
    await wait_for(lambda: evicted_share(page_states(d, t.session_id), range(t.npages)) > 0.9, timeout=20)
    # and back for one session only
    await sh(f"echo 3600000 > {d.session_dir(t.session_id)}/config/cold_age_ms", check=True)
    await sh(f"echo prefetch > {d.session_dir(t.session_id)}/ctl", check=True)
    await trio.sleep(2)
    assert evicted_share(page_states(d, t.session_id), range(t.npages)) == 0


async def test_an_idle_session_costs_no_rounds_until_its_target_acts(fsd, targets):
    """Once everything compressible is compressed and nothing faults, the policy and
    the sampler stop working; the target's first write brings both back."""
    d = await fsd("--access-source", "sampler", "--sample-ms", "10", "--damon-read-ms", "100",
                  "--policy", "compress", "--cold-age-ms", "200")
    t = await targets(c_target(d.sock, 8))  # mixed: a quarter does not compress, and is left alone
    s = d.session_dir(t.session_id)
    await wait_for(lambda: int(flat(s / "stat")["policy_idle_waits"]) >= 1
                   and int(flat(s / "stat")["sampler_parked"]) >= 1, timeout=30, interval=0.1)
    before = flat(s / "stat")
    await trio.sleep(2)  # twenty periods
    idle = flat(s / "stat")
    assert int(idle["policy_rounds"]) - int(before["policy_rounds"]) <= 1, "an idle policy does not go round"
    assert int(idle["access_windows"]) - int(before["access_windows"]) <= 1, "a parked sampler does not sample"
    assert int(idle["compress_attempts"]) == int(before["compress_attempts"]), \
        "pages that did not compress are not offered again"

    await t.command("write 1 170")  # page 1 holds text: clean until this write
    await wait_for(lambda: int(flat(s / "stat")["policy_rounds"]) > int(idle["policy_rounds"]) + 2,
                   timeout=10, interval=0.1)
    await wait_for(lambda: int(flat(s / "stat")["policy_compress_pages"]) > int(idle["policy_compress_pages"]),
                   timeout=10, interval=0.1)  # the written page, once cold again
    assert await t.verify() == (t.npages, 0)


async def test_promotions_make_the_policy_back_off_and_degraded_is_signalled(fsd, targets):
    """Pages that are evicted as cold and then used again: promotions above the
    target rate double the cold age; a fault storm marks the session degraded."""
    d = await fsd("--access-source", "none", "--policy", "evict", "--cold-age-ms", "300",
                  "--damon-read-ms", "300", "--degraded-fault-rate", "200",
                  "--readahead-max-pages", "0")  # every page touched is a fault: a storm
    t = await targets(c_target(d.sock, 8, "--pattern", "text"))
    s = d.session_dir(t.session_id)
    events = os.open(s / "events", os.O_RDONLY)
    try:
        os.pread(events, 4096, 0)
        cold_ages = []
        for _ in range(8):  # touch everything again and again: each round promotes what was evicted
            await wait_for(lambda: evicted_share(page_states(d, t.session_id), range(t.npages)) > 0.5, timeout=20)
            await t.command("touch seq 0 1")
            await trio.sleep(0.4)  # a policy round sees the promotions
            cold_ages.append(int(flat(s / "stat")["policy_cold_age_ms"]))
        stat = flat(s / "stat")
        assert int(stat["promotions"]) > 0 and int(stat["policy_backoffs"]) > 0
        assert max(cold_ages) > 300, "promotions above the target rate lengthen the cold age"
        seen = dict(line.split() for line in os.pread(events, 4096, 0).decode().splitlines())
        assert seen["degraded"] == "1" or int(flat(d.mnt / "events")["degraded"]) >= 1
        await wait_for(lambda: flat(s / "events")["degraded"] == "0", timeout=20)  # quiet again
    finally:
        os.close(events)
    assert seen is not None


async def test_policy_recompresses_idle_copies_once_each(fsd, targets):
    """With recompress_age_ms set (here for one session), idle copies get lz4hc in
    rounds of at most 8 MiB, each copy once: the policy then goes idle, and only a
    new copy (after a write) is encoded again."""
    d = await fsd("--access-source", "none", "--policy", "compress", "--damon-read-ms", "100")
    t = await targets(c_target(d.sock, 32, "--pattern", "text"))  # 8192 pages: four rounds at least
    s = d.session_dir(t.session_id)
    setting = s / "config" / "recompress_age_ms"
    assert setting.read_text() == "max\n", "off unless asked for"
    await sh(f"echo evict > {s}/ctl", check=True)
    before = flat(s / "stat")
    assert int(before["store_bytes_compressed"]) > 0 and int(before["recompress_attempts"]) == 0
    rc, _, err = await sh(f"echo -5 > {setting}")
    assert rc and "Invalid argument" in err, "a bad age is refused with EINVAL"
    await sh(f"echo 300 > {setting}", check=True)
    await wait_for(lambda: int(flat(s / "stat")["policy_recompress_pages"]) == t.npages, timeout=30, interval=0.1)
    done = flat(s / "stat")
    assert int(done["recompress_attempts"]) == int(done["recompress_ok"]) == t.npages, "each copy once"
    assert int(done["store_pages_recompressed"]) == int(done["store_pages"]) == t.npages
    assert int(done["store_bytes_compressed"]) < int(before["store_bytes_compressed"])
    assert int(flat(s / "events")["recompress"]) >= 4, "at most 8 MiB a round"
    await wait_for(lambda: int(flat(s / "stat")["policy_idle_waits"]) > int(done["policy_idle_waits"]),
                   timeout=10, interval=0.1)
    idle = flat(s / "stat")
    await trio.sleep(1)  # ten periods
    assert int(flat(s / "stat")["policy_rounds"]) - int(idle["policy_rounds"]) <= 1, "nothing left: idle"
    rc, _, err = await sh(f"echo recompress bytes=4K > {s}/ctl")
    assert rc and "Resource temporarily unavailable" in err, "no copy is left for the verb either"

    await t.command("hot 5 1")  # rewrites a word of page 5 (same value): its copy goes
    await wait_for(lambda: page_states(d, t.session_id)[5] == "resident", timeout=10, interval=0.05)
    await t.command("hot off")
    assert int(flat(s / "stat")["store_pages_recompressed"]) == t.npages - 1, "the mark goes with the copy"
    await sh(f"echo evict pages=5 > {s}/ctl", check=True)  # a new lz4 copy
    await wait_for(lambda: int(flat(s / "stat")["recompress_attempts"]) == t.npages + 1, timeout=10, interval=0.1)
    assert int(flat(s / "stat")["store_pages_recompressed"]) == t.npages
    await sh(f"echo max > {setting}", check=True)
    assert await t.verify() == (t.npages, 0)


@pytest.mark.parametrize("access_source", ["sampler"])
async def test_prefetch_hits_and_misses(daemon, sock_path, targets):
    t = await targets(c_target(sock_path, 4, "--pattern", "text"))
    s = daemon.sessions[t.session_id]
    runs = selection.all_runs(s.native)
    await s.pager.evict(runs)
    # a miss: asked for, touched before it was restored
    s.native.mark_prefetch([(0, 5, 1)])
    await t.command("write 5 1")
    assert s.counters()["prefetch_misses"] == 1
    # hits: restored ahead, then used (a write fault, or the sampler seeing a read)
    await s.pager.prefetch([(0, 10, 20)])
    for i in range(10, 20):
        await t.command(f"write {i} 2")
    c = s.counters()
    assert c["prefetch_hits"] >= 10 and c["prefetch_restored"] == 20
    assert await t.verify() == (t.npages, 0)


async def test_sampled_pages_are_never_lost(fsd, targets):
    """The sampler moves pages out and back while the target writes everywhere."""
    d = await fsd("--access-source", "sampler", "--sample-ms", "5", "--damon-read-ms", "50",
                  "--policy", "off")
    t = await targets(c_target(d.sock, 4))
    r = await t.command("stress 4 4", timeout=120)
    assert int(r["bad"]) == 0
    stat = flat(d.session_dir(t.session_id) / "stat")
    assert int(stat["samples"]) > 100 and int(stat["sampler_faults"]) > 10, "pages went out and came back under the writers"
    assert await t.verify() == (t.npages, 0)


def test_damon_is_only_read_here():
    """This kernel has DAMON paddr only, run by the system: memfs must say why it
    cannot use it and write nothing (the suite-wide fixture checks kdamond 0)."""
    from memfs.access.damon import Damon
    from memfs.config import Config
    reason = Damon(Config()).probe()
    assert "vaddr" in reason or "kdamond" in reason or "DAMON" in reason
