"""Control verbs: what `echo VERB [SEL] > ctl` does, at each level of the tree.

    compress [SEL]   give pages a compressed copy; they stay resident, write-protected
    evict    [SEL]   free pages from the target, compressing first where needed
    prefetch [SEL]   restore evicted pages before they are touched
    recompress [SEL] encode copies again with lz4hc, where that makes them smaller

One command per write.  Errors are OSError with the errno the shell shows:
EINVAL (unknown verb, malformed selector, several commands), ERANGE
(selector outside the pages), EAGAIN (bytes=N done only in part, or evict
freed fewer pages than it was asked to), ETIMEDOUT (the target's agent did
not answer), EOPNOTSUPP (evict in a wp-only session), ESRCH (the session
has ended).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

import trio

from . import selection
from .core import OpResult
from .pager import SessionEnded
from .states import State

VERBS = ("compress", "evict", "prefetch", "recompress")


@dataclass(frozen=True)
class Command:
    verb: str
    selector: selection.Selector


def parse_command(text: str) -> Command:
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) != 1:
        raise OSError(errno.EINVAL, "write exactly one command")
    words = lines[0].split()
    if words[0] not in VERBS:
        raise OSError(errno.EINVAL, f"unknown verb {words[0]!r} ({', '.join(VERBS)})")
    if len(words) > 2:
        raise OSError(errno.EINVAL, "a command takes one selector")
    return Command(words[0], selection.parse(words[1] if len(words) == 2 else "all"))


def _operation(session, verb: str):
    if session.state is not State.RUNNING or session.pager is None or session.pager.closed:
        raise SessionEnded()
    return {"compress": session.pager.compress, "evict": session.pager.evict,
            "prefetch": session.pager.prefetch, "recompress": session.pager.recompress}[verb]


async def run_on_session(session, cmd: Command, range_index: int | None = None,
                         max_pages: int | None = None) -> OpResult:
    """Apply a command to one session (or one of its ranges)."""
    op = _operation(session, cmd.verb)
    sel = cmd.selector
    if max_pages is not None:  # a share of a daemon-wide bytes=N
        sel = selection.Selector("bytes", nbytes=max_pages * selection.PAGE_SIZE)
    runs, wanted = selection.resolve(sel, session.native, cmd.verb, range_index,
                                     cold_age_ms=session.config.get("cold_age_ms"))
    if not wanted and cmd.verb == "evict":
        # every page there is to free is asked for; fewer freed is EAGAIN, as memory.reclaim
        wanted = session.native.count(runs, selection.CANDIDATES["evict"].states)
    result = await op(runs) if runs else OpResult()
    if wanted and result.done < wanted:
        raise OSError(errno.EAGAIN, f"{cmd.verb}: {result.done} of {wanted} pages")
    return result


def _shares(sessions, verb: str, wanted: int) -> dict:
    """Split `wanted` pages over sessions, oldest pages first across all of them."""
    cand = selection.CANDIDATES[verb]
    hists = {s: s.native.age_hist(None, cand.states, skip=cand.skip) for s in sessions}
    classes = len(next(iter(hists.values()))) if hists else 0
    order = range(classes - 1, -1, -1) if verb != "prefetch" else range(classes)
    share = dict.fromkeys(sessions, 0)
    left = wanted
    for c in order:
        in_class = sum(h[c] for h in hists.values())
        if not in_class or not left:
            continue
        if in_class <= left:
            for s, h in hists.items():
                share[s] += h[c]
            left -= in_class
        else:  # the class that straddles the limit: in proportion
            for s, h in hists.items():
                take = min(h[c], -(-h[c] * left // in_class))
                share[s] += take
            left = 0
    return share


async def run_on_all(daemon, cmd: Command) -> OpResult:
    """Apply a command to every running session (wp-only ones are skipped by evict)."""
    if cmd.selector.kind in ("pages", "addr"):
        raise OSError(errno.EINVAL, f"{cmd.selector.kind}= selects pages of one session: use its ctl")
    sessions = [s for s in list(daemon.sessions.values()) if s.state is State.RUNNING
                and not (cmd.verb == "evict" and not s.pager.can_free)]
    shares = None
    wanted = 0
    if cmd.selector.kind == "bytes":
        wanted = -(-cmd.selector.nbytes // selection.PAGE_SIZE)
        shares = _shares(sessions, cmd.verb, wanted)
    total = OpResult()
    errors: list[OSError] = []
    short: list[OSError] = []  # sessions that did less than asked (EAGAIN)

    async def one(s):
        if shares is not None and not shares[s]:
            return
        try:
            total.merge(await run_on_session(s, cmd, max_pages=None if shares is None else shares[s]))
        except SessionEnded:
            pass  # it ended meanwhile: nothing to do there
        except OSError as e:
            (short if e.errno == errno.EAGAIN else errors).append(e)

    async with trio.open_nursery() as nursery:
        for s in sessions:
            nursery.start_soon(one, s)
    if errors:
        raise errors[0]
    if wanted and total.done < wanted:
        raise OSError(errno.EAGAIN, f"{cmd.verb}: {total.done} of {wanted} pages")
    if short and not wanted:
        raise short[0]
    return total

