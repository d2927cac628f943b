"""cffi (API mode) builder for vhost-core's data path: ``vhost_core._vhost_native``.

Run by the package build (``cffi_modules`` in setup.py).  The cdef is core.h
itself, less its preprocessor lines, so the two cannot drift apart.
"""

from __future__ import annotations

import os
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
INCLUDE = HERE.parent / "include"


def _cdef_text() -> str:
    lines = []
    for line in (HERE / "core.h").read_text().splitlines():
        if line.startswith("#") and not re.match(r"#define \w+ \d+$", line):
            continue
        lines.append(line)
    # Plugin structs are opaque to Python: it only passes their addresses.
    return "struct vn_device_ops;\n" + "\n".join(lines)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "vhost_core._vhost_native",
    '#include "vhost_core/vhost_native.h"\n#include "core.h"\n',
    sources=[os.path.relpath(HERE / "core.c")],  # setuptools wants relative paths
    include_dirs=[str(INCLUDE), str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function", "-fno-strict-aliasing"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
