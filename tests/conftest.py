"""Fixtures: a daemon in the test's own trio loop, real target processes.

Every target a test starts is killed by pid at the end of the test, even
when the test fails; temp dirs go with pytest's tmp_path.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import Target  # noqa: E402

from memfs import core  # noqa: E402
from memfs.config import Config  # noqa: E402
from memfs.daemon import Daemon  # noqa: E402


# tests/vm need DAMON vaddr: they run inside the VM (`memfs test-vm`), not here
collect_ignore = [] if os.environ.get("MEMFS_IN_VM") else ["vm"]


UNIT = Path(__file__).resolve().parent / "unit"


def pytest_configure(config):
    # tests/unit needs no root (modules that do no I/O); everything else does
    unit_only = config.args and all(Path(a.split("::")[0]).resolve().is_relative_to(UNIT) for a in config.args)
    if os.geteuid() != 0 and not unit_only:
        raise pytest.UsageError("the memfs tests need root (userfaultfd, FUSE, /proc of other processes); "
                                "without it: python3 -m pytest tests/unit")


@pytest.fixture
def sock_path(tmp_path) -> str:
    return str(tmp_path / "memfs.sock")


@pytest.fixture
def access_source() -> str:
    """The in-process daemon's access source: none, so page states change only when a
    test acts (tests of the sampler override this fixture)."""
    return "none"


@pytest.fixture
async def daemon(sock_path, nursery, access_source):
    d = Daemon(sock_path, Config(access_source=access_source))
    await nursery.start(d.serve)
    yield d
    await d.shutdown()


@pytest.fixture
def tunables():
    """Set native tunables for one test; the defaults come back afterwards."""
    saved = core.get_tunables()
    yield core.set_tunables
    core.set_tunables(**saved)


@pytest.fixture
async def targets():
    """Start targets with `await targets(argv)`; all are killed at the end."""
    started: list[Target] = []

    async def start(argv, env=None) -> Target:
        t = await Target.start(argv, env=env)
        started.append(t)
        return t

    yield start
    for t in started:
        await t.kill()


@pytest.fixture
async def fsd(tmp_path):
    """Start daemons with a mounted filesystem: `await fsd(*serve_args, base=dir)`."""
    from fsutil import FsDaemon
    started = []

    async def start(*args, base=None, wrap=()):
        d = FsDaemon(base or tmp_path, *args, wrap=wrap)
        started.append(d)  # stopped at the end even if it fails to come up
        return await d.start()

    yield start
    for d in started:
        await d.stop()


@pytest.fixture
def public_tmp():
    """A temp dir other users can traverse (pytest's own are root's alone)."""
    import shutil
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="memfs-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def unprivileged_userfaultfd():
    """Let non-root targets create a userfaultfd for one test (restored afterwards)."""
    path = "/proc/sys/vm/unprivileged_userfaultfd"
    with open(path) as f:
        saved = f.read().strip()
    with open(path, "w") as f:
        f.write("1")
    yield
    with open(path, "w") as f:
        f.write(saved)


DAMON = Path("/sys/kernel/mm/damon/admin/kdamonds")


def _damon_snapshot() -> dict[str, str]:
    """Every readable value under the kdamonds tree (the system's kdamond 0 included)."""
    out = {}
    if not DAMON.exists():
        return out
    for root, dirs, files in os.walk(DAMON):
        for name in files:
            path = os.path.join(root, name)
            if "tried_regions" in path or name in ("stats", "nr_tried", "sz_tried", "nr_applied",
                                                   "sz_applied", "qt_exceeds", "sz_ops_filter_passed",
                                                   "total_bytes", "effective_bytes", "current_value",
                                                   "pid", "refresh_ms"):
                continue  # what kdamond 0 itself changes as it runs
            try:
                with open(path) as f:
                    out[path] = f.read()
            except OSError:
                pass
    return out


@pytest.fixture(scope="session", autouse=True)
def damon_untouched():
    """No kdamond of ours is left, and the system's are as they were."""
    before = _damon_snapshot()
    yield
    after = _damon_snapshot()
    changed = {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert not changed, f"the test suite changed DAMON's sysfs tree: {changed}"
