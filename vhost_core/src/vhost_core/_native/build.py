"""cffi (API mode) builder for vhost-core's data path: ``vhost_core._vhost_native``.

Run by the package build (``cffi_modules`` in setup.py).  The cdef is core.h and
pybdev.h themselves, less their preprocessor lines, so they cannot drift apart.
"""

from __future__ import annotations

import os
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
INCLUDE = HERE.parent / "include"

# VHOST_SANITIZE=1: ASan + UBSan, as vhost_core.native_build does for plugins
# (not importable from here: this runs before vhost_core is installed).
SANITIZE = os.environ.get("VHOST_SANITIZE", "0") not in ("", "0")
SANITIZE_COMPILE_ARGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                         "-fno-omit-frame-pointer", "-g"] if SANITIZE else []
SANITIZE_LINK_ARGS = ["-fsanitize=address,undefined"] if SANITIZE else []


def _header_cdef(name: str) -> str:
    lines = []
    for line in (HERE / name).read_text().splitlines():
        if line.startswith("#") and not re.match(r"#define \w+ \d+$", line):
            continue
        lines.append(line)
    return "\n".join(lines)


def _cdef_text() -> str:
    # Plugin structs are opaque to Python: it only passes their addresses.  The
    # Python-bdev adapter's worker reads iovecs (sys/uio.h's, declared for cffi).
    # VN_ABI_VERSION: "..." makes cffi take vhost_native.h's value, as compiled, so
    # Python reads the ABI from lib instead of repeating the number.
    return ("#define VN_ABI_VERSION ...\nstruct vn_device_ops;\ntypedef struct vn_bdev vn_bdev;\n"
            "typedef struct vn_bdev_desc vn_bdev_desc;\n" + _header_cdef("core.h")
            + "\nstruct iovec { void *iov_base; size_t iov_len; };\n" + _header_cdef("pybdev.h"))


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "vhost_core._vhost_native",
    '#include "vhost_core/vhost_native.h"\n#include "core.h"\n#include "pybdev.h"\n',
    # setuptools wants relative paths
    sources=[os.path.relpath(HERE / "core.c"), os.path.relpath(HERE / "pybdev.c")],
    include_dirs=[str(INCLUDE), str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function", "-fno-strict-aliasing"]
    + SANITIZE_COMPILE_ARGS,
    extra_link_args=SANITIZE_LINK_ARGS,
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
