"""Settings: one place defines each knob, its format, its default and its meaning.

The same definitions serve `memfs serve --NAME`, the files of `config/`
(one value per file; writes use the read format; "max" means unlimited;
a bad value fails with EINVAL and keeps the old one) and, for the
settings a session may override, `sessions/<id>/config/`.  Settings the
native core needs are pushed to it whenever they change.
"""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass
from typing import Callable

from . import core
from .events import EventCounts, first_of
from .selection import parse_size

MAX = None  # "max": unlimited


def _number_range(kind: type, lo, hi) -> Callable[[str], object]:
    """A parser of numbers of `kind` (int: decimal only) between lo and hi."""
    what = "an integer" if kind is int else "a number"

    pattern = r"[0-9]+" if kind is int else r"[0-9]+(\.[0-9]*)?|\.[0-9]+"

    def parse(text: str):
        if not re.fullmatch(pattern, text, re.ASCII):  # no signs, underscores, other scripts' digits
            raise ValueError(f"not {what}: {text!r}")
        v = int(text, 10) if kind is int else kind(text)
        if not lo <= v <= hi:
            raise ValueError(f"{v} is outside {lo}..{hi}")
        return v
    return parse


def _bytes(text: str) -> int:
    try:
        return parse_size(text)
    except OSError:
        raise ValueError(f"not a size: {text!r} (bytes, with K/M/G suffix)")


def _or_max(parse: Callable[[str], object]) -> Callable[[str], object]:
    """`parse`, or "max" (unlimited)."""
    def parse_or_max(text: str):
        if text == "max":
            return MAX
        try:
            return parse(text)
        except ValueError as e:
            raise ValueError(f"{e} (or max)")
    return parse_or_max


def _choice(*names: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in names:
            raise ValueError(f"{text!r} is not one of {' '.join(names)}")
        return text
    return parse


def _fmt(v) -> str:
    return "max" if v is MAX else str(v)


@dataclass(frozen=True)
class Setting:
    name: str
    default: object
    parse: Callable[[str], object]
    doc: str
    per_session: bool = False  # may be overridden in sessions/<id>/config/
    native: str = ""  # the native tunable it sets, if any

    def format(self, value) -> str:
        return _fmt(value)


SETTINGS = {s.name: s for s in [
    Setting("cold_age_ms", 30_000, _number_range(int, 1, 86_400_000),
            "a page idle this long is cold", per_session=True),
    Setting("damon_read_ms", 1000, _number_range(int, 10, 60_000),
            "how often the access source is read: its aggregation window, and the policy's round"),
    Setting("access_source", "auto", _choice("auto", "sampler", "none"),
            "where evidence of use comes from for new sessions: auto (DAMON if it can be used, "
            "else the sampler), sampler, or none (the pager's faults only)"),
    Setting("sample_ms", 100, _number_range(int, 1, 10_000),
            "how often the access source samples a page of each region"),
    Setting("max_regions", 200, _number_range(int, 4, 10_000),
            "most regions the access source tracks per session"),
    Setting("soft_cap_bytes", MAX, _or_max(_bytes),
            "resident registered memory a session may keep before its coldest pages are evicted",
            per_session=True),
    Setting("store_cap_bytes", MAX, _or_max(_bytes),
            "memory the compressed store may use (all sessions together); compressing stops there",
            native="store_cap_bytes"),
    Setting("codec", "lz4", _choice(*core.CODECS),
            "compressor for new copies: lz4, lz4hc (smaller, slower), lz4fast", native="codec"),
    Setting("min_savings_pct", 12, _number_range(int, 0, 99),
            "a page must shrink by this much to count as compressible (else it is kept raw)",
            native="min_savings_pct"),
    Setting("spin_us", 0, _number_range(int, 0, 10_000),
            "the fault thread keeps polling this long after a fault before it sleeps",
            native="spin_us"),
    Setting("faultaround_pages", 16, _number_range(int, 1, 512),
            "zero pages mapped around a first touch of untouched memory", native="faultaround_pages"),
    Setting("readahead_max_pages", 64, _number_range(int, 0, 256),
            "most pages restored after a sequential fault (0: off)", native="readahead_max_pages"),
    Setting("follow_fault_cpu", 1, _number_range(int, 0, 1),
            "1: each session's fault thread moves to the CPU where the faulting thread runs",
            native="follow_fault_cpu"),
    Setting("policy", "compress", _choice("off", "compress", "evict"),
            "what the daemon does by itself with cold pages: nothing, give them compressed copies, "
            "or evict them (above the soft cap the coldest are evicted unless off)", per_session=True),
    Setting("recompress_age_ms", MAX, _or_max(_number_range(int, 1, 86_400_000)),
            "copies of pages idle this long are encoded again with lz4hc by the policy, where that "
            "makes them smaller, once per copy (max: never)", per_session=True),
    Setting("promotion_target_pct", 0.2, _number_range(float, 0.0, 100.0),
            "promotions (faults that restore an evicted page) per minute, in percent of the working "
            "set, above which the policy backs off", per_session=True),
    Setting("degraded_fault_rate", 2000, _number_range(int, 1, 10_000_000),
            "faults per second above which a session is marked degraded", per_session=True),
    Setting("agent_timeout_ms", 10_000, _number_range(int, 100, 3_600_000),
            "how long a target's agent has to answer a request: past it, a request it never began is "
            "cancelled and the operation fails with ETIMEDOUT"),
    Setting("uid_connections_max", 256, _or_max(_number_range(int, 1, 1_000_000)),
            "connections one user (other than root) may have open at once"),
    Setting("uid_sessions_max", 128, _or_max(_number_range(int, 1, 1_000_000)),
            "sessions one user (other than root) may have running at once"),
    Setting("uid_registered_bytes_max", 1 << 40, _or_max(_bytes),
            "memory one user's (other than root's) sessions may register in all"),
    Setting("limit_root", 0, _number_range(int, 0, 1),
            "1: the uid_* limits apply to root too"),
]}


class Config:
    """Current values; `set` validates, keeps the old value on error, pushes native ones."""

    def __init__(self, **overrides):
        self.changes = EventCounts()  # bumped by every set: an idle policy waits on it
        self.values = {name: s.default for name, s in SETTINGS.items()}
        for name, value in overrides.items():
            if value is not None:
                self.set(name, str(value))
        self._apply_native()

    def get(self, name: str):
        return self.values[name]

    def render(self, name: str) -> str:
        return SETTINGS[name].format(self.values[name]) + "\n"

    def set(self, name: str, text: str) -> None:
        s = SETTINGS.get(name)
        if s is None:
            raise OSError(errno.ENOENT, f"no setting {name}")
        try:
            value = s.parse(text.strip())
        except (ValueError, OSError) as e:
            raise OSError(errno.EINVAL, f"{name}: {e}")
        if s.native:
            self._apply_native({**self.values, name: value})  # a value it refuses is never stored
        self.values[name] = value
        self.changes.bump("set")

    async def wait_changed(self) -> None:
        await self.changes.wait_changed(self.changes.generation)

    def _apply_native(self, values: dict | None = None) -> None:
        values = self.values if values is None else values
        t = {}
        for n, s in SETTINGS.items():
            if s.native:
                v = values[n]
                t[s.native] = core.CODECS[v] if n == "codec" else core.UNLIMITED if v is MAX else v
        try:
            core.set_tunables(**t)
        except (OverflowError, TypeError) as e:
            raise OSError(errno.EINVAL, f"the pager core refuses it: {e}")


class SessionConfig:
    """A session's overrides of the per-session settings; the rest is inherited."""

    def __init__(self, parent: Config):
        self.changes = EventCounts()
        self.parent = parent
        self.overrides: dict[str, object] = {}

    def get(self, name: str):
        return self.overrides.get(name, self.parent.get(name))

    def render(self, name: str) -> str:
        return SETTINGS[name].format(self.get(name)) + "\n"

    def set(self, name: str, text: str) -> None:
        s = SETTINGS.get(name)
        if s is None or not s.per_session:
            raise OSError(errno.ENOENT, f"no per-session setting {name}")
        if text.strip() == "inherit":
            self.overrides.pop(name, None)
        else:
            try:
                self.overrides[name] = s.parse(text.strip())
            except ValueError as e:
                raise OSError(errno.EINVAL, f"{name}: {e}")
        self.changes.bump("set")

    async def wait_changed(self) -> None:
        """Until one of this session's settings, or the daemon's, changes."""
        since = self.changes.generation
        await first_of(lambda: self.changes.wait_changed(since), self.parent.wait_changed)
