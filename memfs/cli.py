"""The `memfs` command line: serve, demo, bench, test."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from . import __version__, protocol

log = logging.getLogger("memfs")


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("memfs: %(message)s"))
    root = logging.getLogger("memfs")
    root.handlers[:] = [handler]
    root.setLevel(level)
    # the session summary is always printed, as the prototype did
    logging.getLogger("memfs.summary").setLevel(logging.INFO)


def cmd_serve(args) -> int:
    import trio

    from .daemon import Daemon

    setup_logging(args.verbose)

    async def main():
        daemon = Daemon(args.socket)
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.warning("%s: shutting down", signal.Signals(signum).name)
                    await daemon.shutdown()
                    break
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except OSError as e:
        print(f"memfs serve: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_test(args) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *args.pytest_args])
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memfs", description="user-space compressed-memory pager")
    p.add_argument("--version", action="version", version=f"memfs {__version__} protocol {protocol.VERSION}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--socket", default=os.environ.get("PREDICOMP_SOCKET") or protocol.DEFAULT_SOCKET,
                   help=f"listening socket (default $PREDICOMP_SOCKET or {protocol.DEFAULT_SOCKET})")
    s.add_argument("-v", "--verbose", action="count", default=0, help="log session lifecycles (-vv: debug)")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("test", help="run the test suite (pytest arguments follow)")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_test)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
