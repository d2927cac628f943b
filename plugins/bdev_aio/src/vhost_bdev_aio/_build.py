"""cffi (API mode) builder for bdev_aio's native part: ``vhost_bdev_aio._aio_native``.

aio_bdev.h is both the C API and the cffi cdef; aio.c compiles against the core's
public header, vhost_core/vhost_native.h. Run by setup.py's cffi_modules.
Linux AIO and io_uring are reached through raw system calls (kernel uapi headers
only), so the extension needs neither libaio nor liburing at run time.

The header and vhost-core's build helper (vhost_core.native_build) are taken from
this source tree's vhost_core_build/ (links into the core in the repository, copies
in the sdist), so the build needs no vhost-core installed: see docs/packaging.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vhost_core_build"))
from native_build import plugin_ffibuilder  # noqa: E402

ffibuilder = plugin_ffibuilder("vhost_bdev_aio._aio_native", __file__, "aio_bdev.h", ["aio.c"],
                               extra_link_args=["-pthread"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
