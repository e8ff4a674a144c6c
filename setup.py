"""The native half of the package, built by native/Makefile.

pyproject.toml declares everything else.  The two extension modules
(memfs._core, memfs._client: cffi over the static native libraries) are
declared here so that setuptools builds a platform wheel, but building them
is left to `make`, the one description of the native build that a checkout
(`python3 -m memfs`) and a wheel share.  Besides the modules, a wheel
carries what programs outside Python use, under memfs/_native/:
bin/memfs-target, lib/libpredicomp_client.{so,a}, lib/libpredicomp_preload.so
(when built) and include/predicomp_*.h; memfs/native.py finds them there.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
NATIVE = HERE / "native"
# what a wheel carries besides the modules: (directory in native/, name, where in memfs/_native/)
SHIPPED = [
    ("build", "memfs-target", "bin"),
    ("build", "libpredicomp_client.so", "lib"),
    ("build", "libpredicomp_client.a", "lib"),
    ("build", "libpredicomp_preload.so", "lib"),
    ("include", "predicomp_client.h", "include"),
    ("include", "predicomp_proto.h", "include"),
    ("include", "predicomp_store.h", "include"),
]


class MakeNative(build_ext):
    """Runs make, then puts its products where the package expects them."""

    def run(self) -> None:
        make = ["make", "-s", "-C", str(NATIVE), f"PYTHON={sys.executable}"]
        if self.inplace:  # an editable install: the checkout's own build, modules into memfs/
            subprocess.run(make, check=True)
            return
        # out of the tree, so that building a wheel leaves the checkout's build alone
        objects = Path(self.build_temp).resolve() / "native"
        package = Path(self.build_lib).resolve() / "memfs"
        package.mkdir(parents=True, exist_ok=True)
        subprocess.run([*make, f"B={objects}", f"PKG={package}"], check=True)
        for sub, name, kind in SHIPPED:
            src = (objects if sub == "build" else NATIVE / sub) / name
            if not src.exists() and name.endswith("preload.so"):
                continue  # optional until transparent mode is built
            dest = package / "_native" / kind
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)

    def get_outputs(self) -> list[str]:
        return [str(Path(self.build_lib) / self.get_ext_filename(e.name)) for e in self.extensions]


setup(
    ext_modules=[Extension("memfs._core", sources=[]), Extension("memfs._client", sources=[])],
    cmdclass={"build_ext": MakeNative},
)
