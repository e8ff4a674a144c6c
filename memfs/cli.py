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
            await stop.wait()
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


def cmd_demo(args) -> int:
    from .demo import run
    return run(args.mb, args.pattern, args.keep)


def load_bench():
    """bench/zram_vs_memfs.py, which lives beside the package, not in it."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("zram_vs_memfs", os.path.join(root, "bench", "zram_vs_memfs.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def cmd_bench(args) -> int:
    return load_bench().main(args.bench_args)


def cmd_test(args) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    os.execv(sys.executable, [sys.executable, "-m", "pytest", *args.pytest_args])
    return 1


def cmd_test_vm(args) -> int:
    from .vm import main
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

    d = sub.add_parser("demo", help="start a daemon and a target, then compress, evict, prefetch and recompress through the filesystem")
    d.add_argument("--mb", type=int, default=256, help="size of the demo target's memory (default 256)")
    d.add_argument("--pattern", default="mixed", choices=("mixed", "text", "ints", "random", "zero"),
                   help="its data set (default mixed)")
    d.add_argument("--keep", action="store_true", help="leave the daemon running and mounted at the end")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="memfs and zram side by side on the same data (bench/zram_vs_memfs.py; "
                       "its options follow)", add_help=False)
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
