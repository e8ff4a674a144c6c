"""Numbers for people and programs: the `stat` files, `metrics`, the session summary.

Every value comes from the pager's counters (native/core) or from /proc;
this module only names and formats them, in one place.
"""
from __future__ import annotations

from . import core
from .counters import prometheus
from .states import State

PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999))


def flat(values: dict) -> str:
    return "".join(f"{k} {v}\n" for k, v in values.items())


def latency(hist: list[int]) -> dict[str, int]:
    return {f"fault_latency_ns_{name}": core.percentile_ns(hist, q) for name, q in PERCENTILES}


def _sizes(lines) -> dict[str, int]:
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def proc_status(pid: int) -> dict[str, int]:
    """The sizes in /proc/<pid>/status (VmRSS, RssAnon, VmHWM...), in bytes; {} if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return _sizes(f)
    except OSError:
        return {}


def rss_anon_bytes(session) -> int:
    """The target's RssAnon, read only while it is the session's own process (its pidfd)."""
    try:
        return _sizes(session.peer.lines("status")).get("RssAnon", 0) if session.peer else 0
    except OSError:
        return 0


def range_stat(info: core.RangeInfo) -> dict[str, int]:
    out = {f"pages_{state}": n for state, n in info.pages_in.items()}
    out["pages"] = info.npages
    out["bytes_logical"] = info.npages * core.PAGE_SIZE
    out["bytes_compressed"] = info.bytes_compressed
    return out


def session_stat(session) -> dict[str, int]:
    """Everything the pager counts for a session, plus what /proc says of the target."""
    out = dict(session.counters())
    out.update(latency(session.histogram()))
    pages = dict.fromkeys(core.STATES, 0)
    registered = 0
    if session.native is not None and session.state is not State.ENDED:
        for info in session.native.ranges():
            registered += info.length
            for state, n in info.pages_in.items():
                pages[state] += n
    out.update({f"pages_{state}": n for state, n in pages.items()})
    out["registered_bytes"] = registered
    out["rss_anon_bytes"] = rss_anon_bytes(session)
    out["prefetch_hit_pct"] = 100 * out.get("prefetch_hits", 0) // max(1, out.get("prefetch_restored", 0))
    return out


def global_stat(daemon) -> dict[str, int]:
    out = daemon.counters()
    out.update(latency(daemon.histogram()))
    return out


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _metric_name(name: str) -> tuple[str, str]:
    """Prometheus name and type for a stat name (session_NAME: a session's)."""
    base = name.removeprefix("session_")
    return prometheus(base, "memfs_session_" if name.startswith("session_") else "memfs_")


def metrics(daemon) -> str:
    """Every global and per-session counter, Prometheus text exposition format 0.0.4."""
    families: dict[str, tuple[str, list[str]]] = {}

    def add(name: str, value: int, labels: str = "") -> None:
        mname, mtype = _metric_name(name)
        families.setdefault(mname, (mtype, []))[1].append(f"{mname}{labels} {value}")

    for k, v in global_stat(daemon).items():
        add(k, v)
    for s in list(daemon.sessions.values()):
        labels = f'{{session="{s.id}",pid="{s.pid}",comm="{_escape(s.comm)}"}}'
        for k, v in session_stat(s).items():
            add(f"session_{k}", v, labels)
        if s.access is not None:
            families.setdefault("memfs_session_access_source_info", ("gauge", []))[1].append(
                f'memfs_session_access_source_info{labels[:-1]},source="{s.access.name}"}} 1')
    lines = []
    for mname, (mtype, samples) in families.items():
        lines.append(f"# TYPE {mname} {mtype}")
        lines.extend(samples)
    return "\n".join(lines) + "\n"


def summary(session) -> str:
    """What `memfs serve` prints when a session ends (as the C prototype did)."""
    c = session.final_counters
    keys = ("faults_missing", "faults_wp", "faults_held", "restore_ok", "restore_fail", "zero_fill",
            "uffd_ioctl_fail", "compress_attempts", "compress_ok", "compress_incompressible",
            "evict_ok", "evict_fail", "prefetch_issued", "prefetch_hits", "prefetch_misses",
            "store_bytes_peak")
    lines = [f"session {session.id} pid {session.pid} ({session.comm}) ended: {session.end_reason}; "
             f"mode {session.mode}",
             "  " + " ".join(f"{k}={c.get(k, 0)}" for k in keys)]
    lat = latency(session.histogram())
    n = c.get("faults_missing", 0) + c.get("faults_wp", 0)
    if n:
        lines.append(f"  fault_latency_ns mean={c.get('fault_latency_ns_total', 0) // n} "
                     + " ".join(f"{k.rsplit('_', 1)[1]}={v}" for k, v in lat.items())
                     + f" max={c.get('fault_latency_ns_max', 0)}")
    return "\n".join(lines)
