"""cffi (API mode) builder for bdev_aio's native part: ``vhost_bdev_aio._aio_native``.

Compiles against the core's public header, found through vhost_core.get_include().
Linux AIO and io_uring are reached through raw system calls (kernel uapi headers
only), so the extension needs neither libaio nor liburing at run time.
"""

from __future__ import annotations

import os
import pathlib

from cffi import FFI

import vhost_core

HERE = pathlib.Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef("\n".join(line for line in (HERE / "aio_bdev.h").read_text().splitlines()
                          if not line.startswith("#") and not line.startswith("/*")))
ffibuilder.set_source(
    "vhost_bdev_aio._aio_native",
    '#include "vhost_core/vhost_native.h"\n#include "aio_bdev.h"\n',
    sources=[os.path.relpath(HERE / "aio.c")],  # setuptools wants relative paths
    include_dirs=[vhost_core.get_include(), str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-fno-strict-aliasing"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
