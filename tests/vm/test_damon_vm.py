"""DAMON vaddr as the access source, on a kernel that has it (run by `memfs test-vm`)."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from fsutil import flat, hot_and_cold_target, HOT_PART, wait_cold_part_evicted
from helpers import c_target, wait_for

KD = Path("/sys/kernel/mm/damon/admin/kdamonds")
DAMON = ("--access-source", "auto", "--sample-ms", "20", "--damon-read-ms", "1000")


def nr_kdamonds() -> int:
    return int((KD / "nr_kdamonds").read_text())


async def test_damon_finds_the_cold_part_and_the_policy_evicts_it(fsd, targets):
    """A target uses 16 MiB of 128 MiB; the rest must go, the hot part must stay."""
    assert nr_kdamonds() == 0
    d = await fsd(*DAMON, "--policy", "evict", "--cold-age-ms", "8000")
    assert (d.mnt / "access").read_text().startswith("damon available")
    t, cold = await hot_and_cold_target(d, targets, "zero")
    hot = HOT_PART
    s = d.session_dir(t.session_id)
    assert flat(s / "stat")["access_source"] == "damon"
    # the source is chosen at once; its kdamond is configured and turned on in a thread
    await wait_for(lambda: nr_kdamonds() == 1 and (KD / "0" / "state").read_text().strip() == "on",
                   timeout=30)
    pid_target = int((KD / "0" / "contexts" / "0" / "targets" / "0" / "pid_target").read_text())
    assert pid_target == t.pid
    await wait_cold_part_evicted(d, t, cold, timeout=240, linger=5)
    stat = flat(s / "stat")
    assert int(stat["damon_snapshots"]) > 0 and int(stat["damon_regions_read"]) > 0
    assert int(stat["promotions"]) <= 0.1 * len(hot)
    heat = [line.split() for line in (s / "ranges" / "0" / "heat").read_text().splitlines()]
    assert any(int(r[2]) > 0 for r in heat), "DAMON saw the hot part used"
    await t.command("hot off")
    assert await t.verify() == (t.npages, 0)
    await t.exit()
    await wait_for(lambda: nr_kdamonds() == 0, timeout=30)  # the session's kdamond went with it


async def test_kdamonds_of_a_crashed_daemon_are_torn_down(fsd, targets):
    d = await fsd(*DAMON)
    t = await targets(c_target(d.sock, 8))
    state_file = Path("/run/memfs/damon-kdamonds.json")
    await wait_for(lambda: state_file.exists(), timeout=30)  # written once the kdamond is on
    state = json.loads(state_file.read_text())
    assert len(state["kdamonds"]) == 1 and state["pid"] == d.proc.pid
    assert state["kdamonds"][0]["target"] == str(t.pid) and state["kdamonds"][0]["ops"] == "vaddr"
    d.proc.send_signal(signal.SIGKILL)
    await d.proc.wait()
    assert nr_kdamonds() == 1 and (KD / "0" / "state").read_text().strip() == "on", "left behind"
    await t.kill()
    d2 = await fsd(*DAMON)
    assert nr_kdamonds() == 0, "the next daemon stopped and removed it"
    assert "left by a memfs daemon that died" in d2.log.read_text()


async def test_kdamonds_of_others_are_left_alone(fsd, targets):
    """Someone else's kdamond exists: memfs does not touch it and uses the sampler,
    even when a crashed memfs left a record of a kdamond it once had."""
    Path("/run/memfs").mkdir(parents=True, exist_ok=True)
    Path("/run/memfs/damon-kdamonds.json").write_text(
        json.dumps({"pid": 999999, "kdamonds": [{"ops": "vaddr", "target": "4321", "update_us": "3600000000"}]}))
    (KD / "nr_kdamonds").write_text("1")
    try:
        ctx = KD / "0" / "contexts"
        ctx.joinpath("nr_contexts").write_text("1")
        ctx.joinpath("0", "operations").write_text("paddr")
        ctx.joinpath("0", "monitoring_attrs", "intervals", "aggr_us").write_text("123000")
        before = {p: p.read_text() for p in ctx.rglob("*") if p.is_file() and os.access(p, os.R_OK)}
        d = await fsd(*DAMON)
        access = dict(line.split(" ", 1) for line in (d.mnt / "access").read_text().splitlines())
        assert access["damon"] == "unavailable" and "kdamond(s) of others" in access["damon_reason"]
        t = await targets(c_target(d.sock, 8))
        assert flat(d.session_dir(t.session_id) / "stat")["access_source"] == "sampler"
        await t.exit()
        await d.stop()
        after = {p: p.read_text() for p in before}
        assert after == before and nr_kdamonds() == 1
    finally:
        (KD / "nr_kdamonds").write_text("0")
