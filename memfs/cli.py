"""The `memfs` command line: serve, demo, bench, test."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from . import __version__, protocol
from .config import SETTINGS
from .errors import first_oserror

DEFAULT_MOUNTPOINT = "/run/predicomp"

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

    from .config import SETTINGS, Config
    from .daemon import Daemon
    from .fs import serve_fs
    from .notify import notify

    setup_logging(args.verbose)
    try:
        config = Config(**{name: getattr(args, name) for name in SETTINGS})
    except OSError as e:
        print(f"memfs serve: {e.strerror}", file=sys.stderr)
        return 2

    async def main():
        daemon = Daemon(args.socket, config)
        stop = trio.Event()  # SIGINT, SIGTERM, or the mount unmounted from outside

        async def on_signals():
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.warning("%s: shutting down", signal.Signals(signum).name)
                    stop.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve)
            if args.mount:
                await nursery.start(serve_fs, daemon, args.mount, args.allow_other, stop.set)
            nursery.start_soon(on_signals)
            notify(READY=1, MAINPID=os.getpid(), STATUS=f"listening on {args.socket}"
                   + (f", mounted at {args.mount}" if args.mount else ""))
            await stop.wait()
            notify(STOPPING=1, STATUS=f"handing {len(daemon.sessions)} sessions back")
            await daemon.shutdown()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except (OSError, BaseExceptionGroup) as e:
        err = first_oserror(e)
        if err is None:
            raise
        print(f"memfs serve: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


def cmd_stop(args) -> int:
    """SIGTERM to the daemon listening on --socket (found by SO_PEERCRED, signalled
    through a pidfd: no pid is reused under us), then wait until it has exited."""
    import select
    import socket
    import struct

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(5)
        try:
            s.connect(args.socket)
        except OSError as e:
            print(f"memfs stop: {args.socket}: {e.strerror or e}: no daemon listening", file=sys.stderr)
            return 0 if isinstance(e, (FileNotFoundError, ConnectionRefusedError)) else 1
        pid, uid, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.geteuid():
            print(f"memfs stop: {args.socket} is served by pid {pid} of uid {uid}, not ours", file=sys.stderr)
            return 1
        pidfd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not select.select([pidfd], [], [], args.timeout)[0]:
            print(f"memfs stop: pid {pid} still running after {args.timeout:g} s", file=sys.stderr)
            return 1
    finally:
        os.close(pidfd)
    return 0


def cmd_demo(args) -> int:
    from .dev.demo import run
    return run(args.mb, args.pattern, args.keep)


def load_bench():
    """The side-by-side benchmark (memfs/bench/zram_vs_memfs.py)."""
    from .bench import zram_vs_memfs
    return zram_vs_memfs


def cmd_bench(args) -> int:
    from . import bench
    return bench.main(args.bench_args)


def cmd_test(args) -> int:
    from . import native
    root = native.checkout()
    if root is None:
        print("memfs test: the tests run from a source checkout (python3 -m memfs test there)", file=sys.stderr)
        return 2
    os.chdir(root)
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *args.pytest_args])
    return 1


def cmd_test_vm(args) -> int:
    from .dev.vm import main
    return main(args.pytest_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memfs", description="user-space compressed-memory pager")
    p.add_argument("--version", action="version", version=f"memfs {__version__} protocol {protocol.VERSION}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--socket", default=os.environ.get("PREDICOMP_SOCKET") or protocol.DEFAULT_SOCKET,
                   help=f"listening socket (default $PREDICOMP_SOCKET or {protocol.DEFAULT_SOCKET})")
    s.add_argument("--mount", default=DEFAULT_MOUNTPOINT, metavar="DIR",
                   help=f"where to mount the control filesystem (default {DEFAULT_MOUNTPOINT})")
    s.add_argument("--no-mount", dest="mount", action="store_const", const=None,
                   help="run without the filesystem")
    s.add_argument("--allow-other", action="store_true",
                   help="let other users read the filesystem's counters (never write)")
    s.add_argument("-v", "--verbose", action="count", default=0, help="log session lifecycles (-vv: debug)")
    for name, setting in SETTINGS.items():
        s.add_argument("--" + name.replace("_", "-"), dest=name, metavar="VALUE",
                       help=f"{setting.doc} (default {setting.format(setting.default)})")
    s.set_defaults(func=cmd_serve)

    st = sub.add_parser("stop", help="stop the daemon: it hands every session back, then exits")
    st.add_argument("--socket", default=os.environ.get("PREDICOMP_SOCKET") or protocol.DEFAULT_SOCKET,
                    help=f"the daemon's socket (default $PREDICOMP_SOCKET or {protocol.DEFAULT_SOCKET})")
    st.add_argument("--timeout", type=float, default=90, metavar="SECONDS",
                    help="how long to wait for it to exit (default 90)")
    st.set_defaults(func=cmd_stop)

    d = sub.add_parser("demo", help="start a daemon and a target, then compress, evict, prefetch and recompress through the filesystem")
    d.add_argument("--mb", type=int, default=256, help="size of the demo target's memory (default 256)")
    d.add_argument("--pattern", default="mixed", choices=("mixed", "text", "ints", "random", "zero"),
                   help="its data set (default mixed)")
    d.add_argument("--keep", action="store_true", help="leave the daemon running and mounted at the end")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="memfs and zram side by side on the same data (its options follow), "
                       "or `bench TOOL`: fuzz, alone, compare-builds, random-reads", add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("test", help="run the test suite (pytest arguments follow)")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_test)

    v = sub.add_parser("test-vm", help="run the DAMON vaddr tests in a VM with Debian's 6.12 kernel")
    v.add_argument("pytest_args", nargs=argparse.REMAINDER)
    v.set_defaults(func=cmd_test_vm)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in ("test", "test-vm", "bench"):
        # everything after the subcommand is pytest's (or the benchmark's), options included
        args = parser.parse_args(argv[:1])
        args.pytest_args = args.bench_args = argv[1:]
    else:
        args = parser.parse_args(argv)
    return args.func(args)
