"""What the filesystem may see and do of the daemon, and nothing more.

The tree and the file kinds go through a `DaemonView`: live sessions by id
or pid, a range's geometry, the texts of the global files and the control
verbs.  Ended sessions are not there: every lookup of a session that has
ended, or of a range it does not have, is ENOENT here, once.
"""
from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import pyfuse3
import trio

from .. import control, report
from ..control import Command
from ..states import State

if TYPE_CHECKING:
    from ..config import Config
    from ..core import RangeInfo
    from ..daemon import Daemon
    from ..events import EventCounts
    from ..session import Session


def enoent() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.ENOENT)


def is_live(session: Session | None) -> bool:
    return session is not None and session.state is not State.ENDED


class DaemonView:
    def __init__(self, daemon: Daemon):
        self._daemon = daemon

    # -- sessions ------------------------------------------------------------------
    def sessions(self) -> list[Session]:
        """The live sessions, oldest first."""
        return [s for _, s in sorted(self._daemon.sessions.items()) if is_live(s)]

    def session(self, sid: int) -> Session:
        s = self._daemon.sessions.get(sid)
        if s is None or not is_live(s):
            raise enoent()
        return s

    def pids(self) -> dict[int, int]:
        """pid -> its newest live session."""
        return {s.pid: s.id for s in self.sessions()}

    def range(self, sid: int, n: int) -> RangeInfo:
        try:
            return self.session(sid).native.range_info(n)
        except OSError:
            raise enoent()

    def range_indexes(self, sid: int) -> list[int]:
        return list(self.session(sid).native.range_indexes())

    # -- the daemon's own files -------------------------------------------------------
    @property
    def config(self) -> Config:
        return self._daemon.config

    @property
    def events(self) -> EventCounts:
        return self._daemon.events

    @property
    def limiter(self) -> trio.CapacityLimiter:
        return self._daemon.limiter

    def stat_text(self) -> str:
        return report.flat(report.global_stat(self._daemon))

    def metrics_text(self) -> str:
        return report.metrics(self._daemon)

    def access_text(self) -> str:
        return "".join(f"{k} {v}\n" for k, v in self._daemon.access.describe().items())

    # -- control --------------------------------------------------------------------
    async def run_all(self, cmd: Command) -> None:
        await control.run_on_all(self._daemon, cmd)

    async def run(self, session: Session, cmd: Command, range_index: int | None = None) -> None:
        if not is_live(session):
            raise pyfuse3.FUSEError(errno.ESRCH)
        await control.run_on_session(session, cmd, range_index=range_index)
