"""memfs as an operator installs it: a wheel built from the source, installed
into a fresh venv outside the checkout; the systemd unit; the readiness
protocol and `memfs stop`."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import trio

from helpers import ROOT, c_target

UNIT = ROOT / "packaging" / "memfs.service"
MEMFS = Path(sys.executable).parent / "memfs"  # the venv's console script


def source_copy(dest: Path) -> Path:
    """The checkout's sources without its build, as a fresh clone has them."""
    junk = shutil.ignore_patterns(".git", ".venv", "build", "__pycache__", "*.so", "*.egg-info", ".pytest_cache",
                                  ".hypothesis", "results")
    shutil.copytree(ROOT, dest, ignore=junk)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip wheel` of the sources, then `pip install` of that wheel into a new venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = source_copy(tmp / "src")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                        "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    (wheel,) = (tmp / "dist").glob("memfs-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(wheel)],
                       capture_output=True, text=True, timeout=600, cwd=tmp)
    assert r.returncode == 0, r.stderr[-4000:]
    shutil.rmtree(src)  # nothing installed may lean on the sources
    yield wheel, venv


def test_wheel_holds_every_package_and_the_native_files(installed):
    wheel, _ = installed
    assert "linux_x86_64" in wheel.name, "the wheel carries native code: it must be a platform wheel"
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("memfs", "memfs/fs", "memfs/access", "memfs/bench", "memfs/dev"):
        assert f"{package}/__init__.py" in names, package
    assert any(n.startswith("memfs/_core.") and n.endswith(".so") for n in names)
    assert any(n.startswith("memfs/_client.") and n.endswith(".so") for n in names)
    for f in ("bin/memfs-target", "lib/libpredicomp_client.so", "lib/libpredicomp_client.a",
              "include/predicomp_client.h", "include/predicomp_proto.h", "include/predicomp_store.h"):
        assert f"memfs/_native/{f}" in names, f
    data = {n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n}
    assert {"share/man/man8/memfs.8", "share/man/man5/memfs.5", "share/man/man7/memfs.7",
            "share/man/man3/predicomp_client.3", "lib/systemd/system/memfs.service"} <= data


def test_installed_memfs_runs_the_demo_from_elsewhere(installed, tmp_path):
    _, venv = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MEMFS_NO_BOOTSTRAP")}
    env["PATH"] = f"{venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"
    r = subprocess.run(["memfs", "demo", "--mb", "16"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert str(venv) in r.stdout, "the demo must run the installed memfs-target"
    verified = [line for line in r.stdout.splitlines() if line.startswith("target: VERIFY")]
    assert len(verified) == 2 and all(" bad=0 " in line for line in verified), verified
    assert "savings" in r.stdout and "net" in r.stdout
    r = subprocess.run(["memfs", "test"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "source checkout" in r.stderr


def test_installed_c_library_links_and_runs(installed, tmp_path):
    """A C program built against the wheel's header and library, as a user's would be."""
    _, venv = installed
    (native,) = venv.glob("lib/python3*/site-packages/memfs/_native")
    prog = tmp_path / "prog.c"
    prog.write_text('#include <stdio.h>\n#include <predicomp_client.h>\n'
                    'int main(void) { struct predicomp_client *pc;\n'
                    '  int rc = predicomp_client_open(&pc, "/nonexistent/memfs.sock");\n'
                    '  printf("%d\\n", rc); return 0; }\n')
    subprocess.run(["cc", str(prog), f"-I{native / 'include'}", f"-L{native / 'lib'}", "-lpredicomp_client",
                    f"-Wl,-rpath,{native / 'lib'}", "-o", str(tmp_path / "prog")], check=True, timeout=60)
    out = subprocess.run([str(tmp_path / "prog")], capture_output=True, text=True, timeout=30).stdout
    assert int(out) < 0, "opening a socket that is not there must fail, with -errno"


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze here")
def test_unit_file_is_valid(tmp_path):
    """systemd-analyze verify, with ExecStart= pointing at this venv's memfs (the
    unit names `memfs`, found where pip installs it).  It reports bad settings
    on stderr and still exits 0: any output is a failure."""
    unit = tmp_path / "memfs.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=memfs ", f"ExecStart={MEMFS} ")
                    .replace("ExecStop=memfs ", f"ExecStop={MEMFS} "))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    text = UNIT.read_text()
    for line in ("Type=notify", "RuntimeDirectory=memfs", "ExecStart=memfs serve --socket /run/memfs/memfs.sock "
                 "--mount /run/predicomp", "ExecStop=memfs stop", "Restart=on-failure"):
        assert line in text, line


def recv_state(s: socket.socket) -> dict[str, str]:
    data = s.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if line)


def stat_of(path: Path) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in path.read_text().splitlines() if " " in line)


async def test_serve_notifies_ready_then_stop_hands_sessions_back(tmp_path, targets):
    """READY=1 comes when the socket accepts and the filesystem answers;
    `memfs stop` makes the daemon restore every page into its targets, say
    STOPPING=1, and exit; the target then reads all its data without a daemon."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    sock, mnt = tmp_path / "memfs.sock", tmp_path / "mnt"
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), MEMFS_NO_BOOTSTRAP="1")
    daemon = subprocess.Popen([sys.executable, "-m", "memfs", "serve", "--socket", str(sock), "--mount", str(mnt)],
                              env=env, cwd=ROOT)
    try:
        state = await trio.to_thread.run_sync(recv_state, notify)
        assert state["READY"] == "1" and state["MAINPID"] == str(daemon.pid)
        assert (mnt / "version").read_text(), "READY before the filesystem answers"
        t = await targets(c_target(str(sock), 8))
        sdir = mnt / "sessions" / str(t.session_id)
        await trio.to_thread.run_sync((sdir / "ctl").write_text, "evict\n")
        assert int(stat_of(sdir / "stat")["evict_ok"]) == t.npages
        r = await trio.to_thread.run_sync(lambda: subprocess.run(
            [str(MEMFS), "stop", "--socket", str(sock), "--timeout", "60"], capture_output=True, text=True,
            timeout=90))
        assert r.returncode == 0, r.stderr
        assert daemon.poll() == 0, "memfs stop returned before the daemon exited, or it failed"
        assert (await trio.to_thread.run_sync(recv_state, notify))["STOPPING"] == "1"
        assert t.present() == [True] * t.npages, "the daemon left without handing the pages back"
        assert await t.verify() == (t.npages, 0)
        # no daemon any more: stop says so and succeeds, as `systemctl stop` of a stopped unit
        r = subprocess.run([str(MEMFS), "stop", "--socket", str(sock)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "no daemon" in r.stderr
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        notify.close()


def test_stop_refuses_a_socket_served_by_another_user(public_tmp):
    """`memfs stop` signals whoever listens on the socket: not if that is another
    user's process (root must not be talked into killing it)."""
    path = public_tmp / "s"
    public_tmp.chmod(0o777)
    listener = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                                 "import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); "
                                 "s.listen(); print('up', flush=True); time.sleep(60)", str(path)],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "up"
        r = subprocess.run([str(MEMFS), "stop", "--socket", str(path)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "not ours" in r.stderr
        assert listener.poll() is None
    finally:
        listener.kill()
        listener.wait()
