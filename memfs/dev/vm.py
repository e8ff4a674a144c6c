"""`memfs test-vm`: the test suite that needs real DAMON vaddr, in a VM.

This machine's kernel has DAMON's paddr operations only, so the DAMON
source is tested under Debian's 6.12 kernel (DAMON vaddr, FUSE and
userfaultfd built in), booted with virtme-ng under QEMU without KVM, on a
snapshot of this very system (the checkout and its venv included).  Set-up,
each step skipped when done: Debian's qemu-system-x86, busybox-static and
kmod; virtme-ng in the venv; the kernel package, unpacked into
/var/cache/memfs/vm, its modules into /usr/lib/modules (the host's own
kernel does not use them).  Then `pytest tests/vm` runs inside the guest.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = Path("/var/cache/memfs/vm")
DEBS = ["qemu-system-x86", "busybox-static", "kmod"]
KERNEL_PACKAGE = r"linux-image-(6\.12\.\d+\+deb12-amd64)-unsigned"
RC_MARK = "MEMFS-VM-RC="


def say(msg: str) -> None:
    print(f"memfs test-vm: {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    say(" ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def ensure_packages() -> None:
    from .bootstrap import missing_debs
    missing = missing_debs(DEBS)
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
    if not shutil.which("vng", path=os.path.dirname(sys.executable)):
        run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "virtme-ng"])


def ensure_kernel() -> tuple[Path, str]:
    """Debian's 6.12 kernel: (vmlinuz, version)."""
    found = sorted(glob.glob(str(CACHE / "boot" / "vmlinuz-6.12.*")))
    if not found:
        names = subprocess.run(["apt-cache", "pkgnames", "linux-image-6.12."], capture_output=True,
                               text=True).stdout.split()
        versions = sorted((m.group(1) for n in names if (m := re.fullmatch(KERNEL_PACKAGE, n))),
                          key=lambda v: [int(x) for x in re.findall(r"\d+", v)])
        if not versions:
            raise SystemExit("memfs test-vm: no linux-image-6.12.*+deb12-amd64-unsigned package in apt's lists")
        CACHE.mkdir(parents=True, exist_ok=True)
        run(["apt-get", "download", f"linux-image-{versions[-1]}-unsigned"], cwd=CACHE)
        deb = next(CACHE.glob("linux-image-*.deb"))
        run(["dpkg-deb", "-x", deb, CACHE])
        deb.unlink()
        found = sorted(glob.glob(str(CACHE / "boot" / "vmlinuz-6.12.*")))
    vmlinuz = Path(found[-1])
    version = vmlinuz.name.removeprefix("vmlinuz-")
    modules = Path("/usr/lib/modules") / version
    if not modules.exists():
        unpacked = next(p for p in (CACHE / "lib" / "modules" / version, CACHE / "usr" / "lib" / "modules" / version)
                        if p.exists())
        shutil.copytree(unpacked, modules, symlinks=True)
        run(["depmod", version])
    return vmlinuz, version


def main(pytest_args: list[str]) -> int:
    ensure_packages()
    vmlinuz, version = ensure_kernel()
    args = " ".join(pytest_args)
    script = (f"cd {ROOT} && MEMFS_IN_VM=1 MEMFS_NO_BOOTSTRAP=1 {sys.executable} -m pytest tests/vm "
              f"-p no:cacheprovider -q {args}; echo {RC_MARK}$?")
    vng = Path(sys.executable).parent / "vng"
    env = dict(os.environ, PATH=f"{vng.parent}:{os.environ['PATH']}")
    say(f"booting {version} under QEMU (no KVM); the tests run inside")
    proc = subprocess.Popen([str(vng), "--run", str(vmlinuz), "--disable-kvm", "--memory", "2G", "--cpus", "2",
                             "--verbose", "--exec", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd="/tmp")
    rc = None
    for line in proc.stdout:
        if line.startswith("[") and "]" in line[:16]:
            continue  # the guest kernel's log
        if line.startswith(RC_MARK):
            rc = int(line[len(RC_MARK):].strip() or 1)
            continue
        print(line, end="", flush=True)
    proc.wait()
    if rc is None:
        say(f"the guest did not report a result (vng exit {proc.returncode})")
        return 1
    return rc
