"""`memfs bench --quick`: both systems and the bare-userfaultfd floor run on every
data set and every page verifies.

A smoke test only: nothing here asserts a speed (the numbers live in
bench/BENCHMARKS.md).  It also checks that the machine is put back."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from memfs import cli

ROOT = Path(__file__).resolve().parent.parent
ZRAM = Path("/sys/block/zram0")


def swaps() -> list[str]:
    return [line.split()[0] for line in Path("/proc/swaps").read_text().splitlines()[1:]]


@pytest.mark.skipif(not ZRAM.exists(), reason="no zram0 on this machine")
def test_quick_bench_runs_both_systems_and_restores_the_machine(tmp_path):
    assert not swaps() and (ZRAM / "initstate").read_text().strip() == "0", "zram0 must start unused"
    r = subprocess.run([sys.executable, "-m", "memfs", "bench", "--quick", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {(row["dataset"], row["system"]) for row in rows} == {
        (d, s) for d in ("mixed", "text", "random", "real") for s in ("zram", "memfs", "uffd-floor")}
    floors = [row for row in rows if row["system"] == "uffd-floor"]
    assert all(int(row["verify_bad"]) == 0 and float(row["rand_p50_us"]) > 0 for row in floors), floors
    for row in rows:
        if row["system"] == "uffd-floor":
            continue
        assert int(row["verify_bad"]) == 0, row
        assert int(row["rss_after_evict_kb"]) < int(row["rss_before_kb"]) // 4, f"nothing was evicted: {row}"
        assert float(row["seq_restore_gbps"]) > 0 and float(row["rand_p50_us"]) > 0
    assert all(float(row["rand_mean_us"]) > 0 for row in rows)
    if cli.load_bench().kernel_hz():  # CONFIG_HZ is known: the targets split slow touches by tick
        assert all(0 <= float(row["rand_slow_tick_per_s"]) <= float(row["rand_slow_per_s"]) for row in rows)
        assert "over a tick, per s" in r.stdout
    assert all(row["prefetch_gbps"] == row["pager_cpu_s"] == "" for row in rows if row["system"] == "zram")
    assert all(row["evict_mbps"] == row["ratio"] == "" for row in floors), "unmeasured is empty, not 0"
    # the reads with work between them: both systems, not the floor
    assert all(int(row["think_touches"]) > 0 and 0 < float(row["think_p50_us"]) <= float(row["think_p99_us"])
               for row in rows if row["system"] != "uffd-floor")
    assert all(row["think_p50_us"] == "" for row in floors)
    memfs = [row for row in rows if row["system"] == "memfs"]
    assert all(float(row["prefetch_decode_us"]) > 0 and float(row["prefetch_copy_us"]) > 0 for row in memfs)
    assert all(float(row["rc_prefetch_gbps"]) > 0 for row in memfs)
    assert all(float(row["recompressed_ratio"]) > float(row["ratio"]) for row in memfs
               if row["dataset"] in ("mixed", "text")), "recompress must have made the copies smaller"
    assert "Ratios memfs/zram" in r.stdout and "The floor" in r.stdout
    assert "Slow random reads" in r.stdout and "Prefetch: where its CPU goes" in r.stdout
    assert "Recompress: the same copies" in r.stdout
    assert "Random reads with work between them" in r.stdout
    assert not swaps(), "swap left on"
    assert (ZRAM / "initstate").read_text().strip() == "0", "zram0 not reset"


def test_bench_refuses_when_swap_is_in_use(tmp_path):
    """Someone else's swap: the benchmark must not touch it and say why."""
    if swaps():
        pytest.skip("swap already in use on this machine")
    img = tmp_path / "swapfile"
    subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", "count=16"], check=True, capture_output=True)
    img.chmod(0o600)
    subprocess.run(["mkswap", str(img)], check=True, capture_output=True)
    subprocess.run(["swapon", str(img)], check=True)
    try:
        r = subprocess.run([sys.executable, "-m", "memfs", "bench", "--quick", "--datasets", "mixed",
                            "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "swap is in use" in r.stderr
        assert swaps() == [str(img)], "the benchmark touched someone else's swap"
    finally:
        subprocess.run(["swapoff", str(img)], check=False)


def test_random_reads_prints_a_row_per_read_with_both_threads_cpu():
    """memfs bench random-reads (with zram's steps between reads, --hog): one row per
    read, each with the CPU both threads of the fault path used in it (a thread it
    could not find would be 0 or an error) and the fault thread's policy."""
    r = subprocess.run([sys.executable, "-m", "memfs", "bench", "random-reads", "--dataset", "mixed",
                        "--mb", "16", "--reads", "3", "--hog"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["0", "1", "2"], r.stdout
    for _, p50, p99, slow, fault_ms, target_ms, policy, starved in rows:
        assert 0 < float(p50) <= float(p99) and 0 <= float(slow) <= 100
        assert float(fault_ms) > 0 and float(target_ms) > 0, r.stdout
        assert policy in ("idle", "other") and int(starved) >= 0, r.stdout
    assert "reads with over 1 % slow touches:" in r.stdout


def test_socket_fuzz_leaves_the_daemon_as_it_found_it(tmp_path):
    """memfs bench fuzz, small: generated frames, then the daemon's descriptors and
    memory as before and a good client served (the full run is 10^5 frames: bench/FUZZ.md)."""
    out = tmp_path / "FUZZ.md"
    r = subprocess.run([sys.executable, "-m", "memfs", "bench", "fuzz", "--frames", "5000", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict: passed" in r.stdout and "| frames sent | " in out.read_text()
