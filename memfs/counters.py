"""Every counter, once: its name, kind, unit and meaning.

`stat`, `metrics`, the session summary and the documentation check all
derive from this table: a counter's kind decides how the daemon sums it
over sessions and how Prometheus sees it, so it is said here and nowhere
else.  memfs(5), COUNTERS, explains each in full.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    TOTAL = "total"  # only grows; summed over every session, ended ones too (a Prometheus counter)
    LEVEL = "level"  # an amount now; summed over the live sessions (a gauge)
    MAX = "max"      # the highest seen; over every session, ended ones too (a gauge)
    VALUE = "value"  # a session's own value now (a setting in force, a rate): never summed (a gauge)


@dataclass(frozen=True)
class Counter:
    name: str
    kind: Kind
    unit: str
    doc: str
    scope: str = "both"  # "session": only a session's stat; "daemon": only the top-level stat


def _table(*rows: tuple) -> dict[str, Counter]:
    return {r[0]: Counter(*r) for r in rows}


T, L, M, V = Kind.TOTAL, Kind.LEVEL, Kind.MAX, Kind.VALUE

COUNTERS = _table(
    # the pager core (struct mc_counters)
    ("faults_missing", T, "faults", "faults on pages not in the target"),
    ("faults_wp", T, "faults", "write faults on write-protected pages"),
    ("faults_held", T, "faults", "writes held while their page was being evicted"),
    ("restore_ok", T, "pages", "pages put back from a copy"),
    ("restore_fail", T, "pages", "copies that could not be decoded (the target gets SIGBUS there)"),
    ("zero_fill", T, "pages", "evicted zero pages restored as zeros"),
    ("uffd_ioctl_fail", T, "ioctls", "userfaultfd ioctls that failed (other than EAGAIN and EEXIST)"),
    ("uffd_eagain", T, "ioctls", "userfaultfd ioctls refused while the target's layout was changing"),
    ("fault_latency_ns_total", T, "ns", "time spent serving faults, the daemon's part"),
    ("fault_latency_ns_max", M, "ns", "the longest fault, the daemon's part"),
    ("compress_attempts", T, "pages", "pages read and compressed"),
    ("compress_ok", T, "pages", "copies made"),
    ("compress_incompressible", T, "pages", "pages that did not shrink by min_savings_pct"),
    ("compress_same_filled", T, "pages", "pages of one repeated word: a copy without a blob"),
    ("compress_raced", T, "pages", "copies thrown away: the page was written meanwhile"),
    ("compress_store_full", T, "pages", "copies not made: the store reached store_cap_bytes"),
    ("evict_requests", T, "requests", "eviction requests answered by the agent, or cancelled"),
    ("evict_ok", T, "pages", "pages freed"),
    ("evict_fail", T, "pages", "pages the agent did not free (they stay clean)"),
    ("prefetch_issued", T, "pages", "evicted pages a prefetch asked for"),
    ("prefetch_restored", T, "pages", "pages a prefetch restored"),
    ("prefetch_hits", T, "pages", "prefetched pages later used"),
    ("prefetch_misses", T, "faults", "faults on pages a prefetch asked for but had not restored yet"),
    ("prefetch_decode_ns", T, "ns", "prefetch threads' CPU time decoding copies"),
    ("prefetch_copy_ns", T, "ns", "prefetch threads' CPU time copying pages in"),
    ("recompress_attempts", T, "pages", "copies a recompress decoded and encoded again"),
    ("recompress_ok", T, "pages", "copies recompress replaced with a smaller one"),
    ("readahead_pages", T, "pages", "pages restored after sequential faults"),
    ("faultaround_pages", T, "pages", "untouched pages mapped around a first touch"),
    ("fault_thread_moves", T, "times", "times the fault thread moved to the faulting thread's CPU"),
    ("fault_thread_starved", T, "times", "times it gave up SCHED_IDLE for 0.2 s"),
    ("fault_thread_looks", T, "times", "times it read where the faulting thread runs"),
    ("events_remove", T, "events", "times the target dropped registered memory (MADV_DONTNEED)"),
    ("events_unmap", T, "events", "times it unmapped registered memory"),
    ("events_remap", T, "events", "times it moved registered memory (mremap)"),
    ("anomalies", T, "events", "events the pager did not expect, handled safely"),
    ("promotions", T, "faults", "faults that had to restore an evicted page"),
    ("samples", T, "pages", "pages the sampler took out of the target"),
    ("sampler_faults", T, "faults", "faults on sampled pages: uses seen"),
    ("sampler_lost_slots", T, "slots", "staging slots given up: the target dropped a sampled page"),
    ("store_pages", L, "pages", "pages with a copy in the store"),
    ("store_pages_recompressed", L, "pages", "of those, copies recompress has dealt with"),
    ("store_bytes_logical", L, "bytes", "store_pages in bytes"),
    ("store_bytes_compressed", L, "bytes", "blob bytes"),
    ("store_bytes_used", L, "bytes", "store slots the blobs occupy (top level: store memory touched)"),
    ("store_bytes_peak", M, "bytes", "the highest store_bytes_used"),
    ("index_bytes", L, "bytes", "the page index in the store: 64 KiB per 4096-page block touched"),
    # a session taken back after its daemon died (reported by the target's client)
    ("takeovers", T, "times", "times the target served its own faults: its daemon was lost"),
    ("agent_faults", T, "faults", "faults the target served itself meanwhile"),
    ("resumes", T, "times", "times a restarted daemon took the session back"),
    # access sources
    ("sampler_cpu_ns", T, "ns", "time the sampler spent in the daemon"),
    ("sampler_regions", V, "regions", "regions the sampler tracks now", "session"),
    ("access_windows", T, "windows", "aggregation windows closed by the access source"),
    ("sampler_interval_ms", V, "ms", "the sampler's interval now", "session"),
    ("sampler_parked", T, "times", "times an idle session's samples stayed out for a window"),
    ("damon_snapshots", T, "times", "DAMON region snapshots read"),
    ("damon_regions_read", T, "regions", "DAMON regions read"),
    # the policy
    ("policy_rounds", T, "rounds", "policy rounds"),
    ("policy_compress_pages", T, "pages", "pages the policy compressed"),
    ("policy_evict_pages", T, "pages", "pages the policy evicted"),
    ("policy_recompress_pages", T, "pages", "copies the policy recompressed smaller"),
    ("cold_page_marks", T, "pages", "cold pages found, summed over rounds"),
    ("policy_backoffs", T, "times", "times the cold age was doubled"),
    ("policy_cold_age_ms", V, "ms", "the cold age in force", "session"),
    ("promotion_rate_ppm", V, "ppm", "the last promotion rate (millionths of the working set a minute)", "session"),
    ("policy_idle_waits", T, "times", "times the policy went idle"),
    # computed for stat
    ("registered_bytes", L, "bytes", "memory the session's ranges cover"),
    ("rss_anon_bytes", V, "bytes", "the target's RssAnon now (/proc)", "session"),
    ("prefetch_hit_pct", V, "pct", "prefetched pages later used, of those restored", "session"),
    ("fault_latency_ns_p50", V, "ns", "the median fault, the daemon's part"),
    ("fault_latency_ns_p90", V, "ns", "the 90th percentile fault"),
    ("fault_latency_ns_p99", V, "ns", "the 99th percentile fault"),
    ("fault_latency_ns_p999", V, "ns", "the 99.9th percentile fault"),
    # the daemon's own
    ("sessions_active", L, "sessions", "sessions running now", "daemon"),
    ("sessions_total", T, "sessions", "sessions ever started", "daemon"),
    ("store_blobs", L, "blobs", "blobs in the stores", "daemon"),
)
PAGE_STATE_COUNTER = Counter("pages_STATE", L, "pages", "pages in each state")  # pages_untouched, pages_resident, ...


def counter(name: str) -> Counter:
    if name.startswith("pages_"):
        return PAGE_STATE_COUNTER
    return COUNTERS[name]


def summed(name: str) -> bool:
    """Does the daemon's stat add this up over sessions?"""
    return counter(name).kind in (Kind.TOTAL, Kind.LEVEL) and counter(name).scope != "session"


def prometheus(name: str, prefix: str = "memfs_") -> tuple[str, str]:
    """The metric name and type: counters end in _total (once), the rest are gauges."""
    c = counter(name)
    if c.kind is Kind.TOTAL:
        return (f"{prefix}{name}" if name.endswith("_total") else f"{prefix}{name}_total"), "counter"
    return f"{prefix}{name}", "gauge"
