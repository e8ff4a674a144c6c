"""A daemon that dies loses nothing: each target serves its own faults from the
store it holds, and a daemon started again takes the sessions back (RESUME).

The daemon is killed with SIGKILL, as the OOM killer would: it gets no chance
to hand anything back."""
from __future__ import annotations

import os
import random

import trio

from fsutil import FsDaemon, flat, page_states
from helpers import c_target, py_target, wait_for

MB = 1 << 20


async def write_ctl(path, text: str) -> int:
    """`echo text > path`; 0 or the errno (a daemon killed under the write answers with one)."""
    def write():
        try:
            with open(path, "w") as f:
                f.write(text + "\n")
            return 0
        except OSError as e:
            return e.errno
    return await trio.to_thread.run_sync(write)


async def restart(d: FsDaemon, base, *args: str) -> FsDaemon:
    """Kill the daemon (SIGKILL) and start another on the same socket and mountpoint."""
    await d.kill()
    return await FsDaemon(base, *args).start()


def sessions_by_pid(d: FsDaemon) -> dict[int, int]:
    return {int(pid): int(os.readlink(d.mnt / "by-pid" / pid).rsplit("/", 1)[1])
            for pid in os.listdir(d.mnt / "by-pid")}


async def wait_adopted(d: FsDaemon, ts, timeout: float = 10) -> dict[int, int]:
    """Until every target has a session in the new daemon (by-pid/<pid>); pid -> session id."""
    await wait_for(lambda: set(sessions_by_pid(d)) >= {t.pid for t in ts}, timeout=timeout, interval=0.1)
    return sessions_by_pid(d)


async def stats(t) -> dict[str, int]:
    r = await t.command("stats")
    assert r["_"] == "STATS" and r["rc"] == "0", r
    return {k: int(v) for k, v in r.items() if k not in ("_", "rc")}


async def test_sampled_pages_come_home_when_the_daemon_dies(fsd, targets, tmp_path):
    """Nothing evicted, the sampler running: the pages it parked in the staging
    area when the daemon dies are part of the store, and every one reads back."""
    d = await fsd("--access-source", "sampler", "--sample-ms", "20", "--damon-read-ms", "200", "--policy", "off")
    t = await targets(c_target(d.sock, 128))
    st = d.session_dir(t.session_id) / "stat"
    await wait_for(lambda: int(flat(st)["samples"]) >= 200, timeout=30)
    await wait_for(lambda: "sampled" in page_states(d, t.session_id), timeout=10)
    await d.kill()
    assert await t.verify() == (t.npages, 0), "a page parked by the sampler was lost with the daemon"
    s = await stats(t)
    assert s["takeovers"] == 1 and s["alone"] == 1


async def test_four_targets_survive_a_kill_and_are_taken_back(fsd, targets, tmp_path):
    """1 GiB evicted over four targets (C and Python clients), writers running in
    two: kill -9 the daemon, every target goes on and verifies; a new daemon takes
    all four back within 10 s, and evict and prefetch work again."""
    d = await fsd("--policy", "off")
    ts = [await targets(c_target(d.sock, 256, "--seed", str(i + 1))) for i in range(3)]
    ts.append(await targets(py_target(d.sock, 256)))
    for t in ts:
        assert await write_ctl(d.session_dir(t.session_id) / "ctl", "evict") == 0
    evicted = sum(int(flat(d.session_dir(t.session_id) / "stat")[f"pages_{s}"])
                  for t in ts for s in ("compressed", "zero"))
    assert evicted * 4096 >= 1 << 30
    writers = {}
    async with trio.open_nursery() as nursery:
        async def write_for(t, seconds):
            writers[t.pid] = await t.command(f"stress {seconds} 4", timeout=seconds + 120)
        for t in ts[:2]:
            nursery.start_soon(write_for, t, 6)
        await trio.sleep(1.5)
        await d.kill()
        for t in ts[2:]:  # served by their own keepers now
            assert await t.verify() == (t.npages, 0)
        await trio.sleep(1)
        d = await FsDaemon(tmp_path).start()
        with trio.fail_after(10):
            by_pid = await wait_adopted(d, ts)
    for t in ts[:2]:
        r = writers[t.pid]
        assert int(r["writes"]) > 1000 and int(r["bad"]) == 0, f"lost writes across the kill: {r}"
    for t in ts:
        s = await stats(t)
        assert s["takeovers"] == 1 and s["resumes"] == 1 and s["alone"] == 0, s
        sd = d.session_dir(by_pid[t.pid])
        assert int(flat(sd / "stat")["resumes"]) == 1
        assert await write_ctl(sd / "ctl", "evict") == 0
        assert await write_ctl(sd / "ctl", "prefetch") == 0
        assert await t.verify() == (t.npages, 0)
        assert await write_ctl(sd / "ctl", "evict") == 0
        assert await t.verify() == (t.npages, 0)


async def test_kills_at_random_moments_of_an_evict_loop_lose_nothing(fsd, targets, tmp_path):
    """Twenty kills, each at a random moment of an evict/prefetch loop with writers
    running: no write lost, no page wrong, every time taken back."""
    rng = random.Random(1)
    d = await fsd("--policy", "off", "--agent-timeout-ms", "2000")
    t = await targets(c_target(d.sock, 8, "--pattern", "text"))
    other = await targets(c_target(d.sock, 16, "--seed", "5"))  # evicted, untouched: must read back too
    assert await write_ctl(d.session_dir(other.session_id) / "ctl", "evict") == 0
    sid = t.session_id
    kills = 0
    for _ in range(20):
        async with trio.open_nursery() as nursery:
            stop = trio.Event()

            async def churn():
                while not stop.is_set():
                    for verb in ("evict", "prefetch"):
                        await write_ctl(d.session_dir(sid) / "ctl", verb)
                        await trio.sleep(0)

            async def kill_soon():
                await trio.sleep(rng.uniform(0.05, 1.0))
                await d.kill()
                stop.set()

            nursery.start_soon(churn)
            nursery.start_soon(kill_soon)
            r = await t.command("stress 1.5 4", timeout=120)
        kills += 1
        assert int(r["bad"]) == 0, f"kill {kills}: lost writes {r}"
        assert await t.verify() == (t.npages, 0), f"kill {kills}"
        d = await FsDaemon(tmp_path, "--policy", "off", "--agent-timeout-ms", "2000").start()
        with trio.fail_after(10):
            sid = (await wait_adopted(d, [t, other]))[t.pid]
    assert await other.verify() == (other.npages, 0)
    s = await stats(t)
    assert kills == 20 and s["takeovers"] == 20 and s["resumes"] == 20, s
    await d.stop()
