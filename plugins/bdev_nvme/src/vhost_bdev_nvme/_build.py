"""cffi (API mode) builder for bdev_nvme's native part: ``vhost_bdev_nvme._nvme_native``.

nvme_tcp.h is both the C API and the cffi cdef; nvme_tcp.c compiles against the core's
public header, vhost_core/vhost_native.h, taken from this source tree's vhost_core_build/
(links into the core in the repository, copies in the sdist): see docs/packaging.md.
No library beyond libc: NVMe/TCP is sockets, and CRC32C is computed here.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vhost_core_build"))
from native_build import plugin_ffibuilder

ffibuilder = plugin_ffibuilder("vhost_bdev_nvme._nvme_native", __file__, "nvme_tcp.h", ["nvme_tcp.c"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
