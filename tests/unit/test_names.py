"""Names people and programs read: metric names (no root needed)."""
from __future__ import annotations

import re

from memfs import core, report


def test_metric_names_are_prometheus_names_and_counters_end_in_total_once():
    names = list(core.COUNTER_NAMES) + ["sessions_active", "sessions_total", "store_blobs"]
    for n in names:
        for name in (n, f"session_{n}"):
            mname, mtype = report._metric_name(name)
            assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", mname)
            assert not mname.endswith("_total_total"), mname
            assert mtype in ("counter", "gauge")


def test_every_counter_the_pager_or_a_component_keeps_is_in_the_table():
    from memfs.access.damon import DamonSource
    from memfs.access.sampler import Sampler
    from memfs.counters import COUNTERS
    from memfs.policy import Policy
    from memfs.session import RESUMED
    kept = set(core.COUNTER_NAMES) | set(DamonSource.COUNTERS) | set(Sampler.COUNTERS) | set(Policy.COUNTERS) | set(RESUMED)
    assert not kept - set(COUNTERS), f"not in memfs/counters.py: {sorted(kept - set(COUNTERS))}"
