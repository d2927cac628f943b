"""cffi (API mode) builder for dev_scsi's native part: ``vhost_dev_scsi._scsi_native``.

Compiles against the core's public header, found through vhost_core.get_include().
"""

from __future__ import annotations

import os
import pathlib

from cffi import FFI

import vhost_core

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef("\n".join(line for line in (HERE / "scsi.h").read_text().splitlines()
                          if not line.startswith("#") and not line.startswith("/*")))
ffibuilder.set_source(
    "vhost_dev_scsi._scsi_native",
    '#include "vhost_core/vhost_native.h"\n#include "scsi.h"\n',
    sources=[os.path.relpath(HERE / "scsi.c")],  # setuptools wants relative paths
    include_dirs=[vhost_core.get_include(), str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-fno-strict-aliasing"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
