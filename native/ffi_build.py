"""Build the cffi modules memfs._core (the daemon's pager core) and
memfs._client (libpredicomp_client for Python targets).

Each module's cdef is read from the C header it binds, so the struct
layouts Python sees are the compiler's; `make` runs this after building
the static libraries, as `ffi_build.py BUILD_DIR PACKAGE_DIR`.
"""
import re
import shutil
import sys
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
BUILD = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else HERE / "build"
PACKAGE = Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else HERE.parent / "memfs"


def cdef_of(header: Path, skip=()) -> str:
    """The header minus preprocessor lines, keeping integer #defines."""
    keep = []
    for line in header.read_text().splitlines():
        s = line.strip()
        if s.startswith("#"):
            m = re.match(r"#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)u?\b", s)
            if m and m.group(1) not in skip:
                keep.append(f"#define {m.group(1)} {m.group(2)}")
            continue
        if "extern \"C\"" in s or s == "}":
            continue
        keep.append(line)
    return "\n".join(keep)


def build(name: str, header: Path, lib: str, libraries=(), skip=()):
    ffi = cffi.FFI()
    ffi.cdef(cdef_of(header, skip))
    ffi.set_source(
        f"memfs.{name}",
        f'#include "{header.name}"',
        include_dirs=[str(header.parent), str(HERE / "include")],
        extra_objects=[str(BUILD / lib)],
        libraries=list(libraries) + ["pthread"],
        extra_compile_args=["-O2"],
    )
    tmp = BUILD / "ffi" / name
    tmp.mkdir(parents=True, exist_ok=True)
    so = Path(ffi.compile(tmpdir=str(tmp), verbose=False))
    shutil.copy2(so, PACKAGE / so.name)


if __name__ == "__main__":
    build("_core", HERE / "core" / "memfs_core.h", "libmemfs_core.a", libraries=["lz4"])
    build("_client", HERE / "include" / "predicomp_client.h", "libpredicomp_client.a", libraries=["lz4"])
    sys.exit(0)
