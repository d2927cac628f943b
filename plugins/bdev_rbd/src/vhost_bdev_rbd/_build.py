"""cffi (API mode) builder for bdev_rbd's native part: ``vhost_bdev_rbd._rbd_native``.

rbd_bdev.h is both the C API and the cffi cdef; rbd.c compiles against the core's
public header, vhost_core/vhost_native.h, and links librbd and librados (only this
module does: the daemon loads them only where this plugin is installed).
The header and vhost-core's build helper come from this source tree's
vhost_core_build/ (links into the core in the repository, copies in the sdist).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vhost_core_build"))
from native_build import plugin_ffibuilder  # noqa: E402

ffibuilder = plugin_ffibuilder("vhost_bdev_rbd._rbd_native", __file__, "rbd_bdev.h", ["rbd.c"],
                               libraries=["rbd", "rados"], extra_link_args=["-pthread"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
