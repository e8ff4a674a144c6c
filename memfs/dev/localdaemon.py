"""`memfs serve` as a child process, its socket and mount in a private temporary
directory: what `memfs demo` and `memfs bench` run against.  Leaving the
context stops it (SIGTERM, then SIGKILL after 30 s), unmounts and removes
the directory, whatever happened; `keep()` leaves it running instead."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import native



class DaemonFailed(RuntimeError):
    pass


class LocalDaemon:
    def __init__(self, *serve_args: str, prefix: str = "memfs-", log_to_file: bool = False):
        self.serve_args = serve_args
        self.prefix = prefix
        self.log_to_file = log_to_file
        self.proc: subprocess.Popen | None = None
        self._kept = False

    @property
    def command(self) -> list[str]:
        return ["memfs", "serve", "--socket", str(self.sock), "--mount", str(self.mnt), *self.serve_args]

    def __enter__(self) -> "LocalDaemon":
        self.work = Path(tempfile.mkdtemp(prefix=self.prefix))
        self.sock, self.mnt, self.log = self.work / "memfs.sock", self.work / "mnt", self.work / "daemon.log"
        self._start()
        return self

    def restart(self) -> None:
        """Another daemon on the same socket and mountpoint (after this one died: kill())."""
        self._start()

    def kill(self) -> None:
        """SIGKILL: the daemon gets no chance to hand anything back."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _start(self) -> None:
        out = open(self.log, "a") if self.log_to_file else None
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", *self.command],
                                         env=dict(os.environ, MEMFS_NO_BOOTSTRAP="1"), cwd=native.checkout(),
                                         stdout=out, stderr=out)
        finally:
            if out:
                out.close()
        deadline = time.monotonic() + 30
        while not self._up():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = self.log.read_text() if self.log_to_file else "see its messages above"
                self.__exit__(None, None, None)
                raise DaemonFailed(f"the daemon did not start: {why}")
            time.sleep(0.05)

    def _up(self) -> bool:
        try:
            return (self.mnt / "version").exists()
        except OSError:
            return False  # the stale mount of a daemon that died: the new one clears it

    @property
    def pid(self) -> int:
        return self.proc.pid

    def session_stat(self, sid: str) -> dict[str, int]:
        """The numeric values of a session's `stat` file."""
        text = (self.mnt / "sessions" / str(sid) / "stat").read_text()
        return {k: int(v) for k, v in (line.split(None, 1) for line in text.splitlines())
                if v.strip().lstrip("-").isdigit()}

    def keep(self) -> None:
        """Leave the daemon running and mounted when the context ends."""
        self._kept = True

    def __exit__(self, *exc) -> None:
        if self._kept:
            return
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
        shutil.rmtree(self.work, ignore_errors=True)
