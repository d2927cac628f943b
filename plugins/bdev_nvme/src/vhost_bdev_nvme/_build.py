"""cffi (API mode) builders for bdev_nvme's native parts.

``vhost_bdev_nvme._nvme_native``: the NVMe/TCP initiator (nvme_tcp.h is its C API and cdef).
``vhost_bdev_nvme._nvme_pcie``: the userspace PCIe driver over VFIO (nvme_pcie.h).
Both compile against the core's public header, vhost_core/vhost_native.h, taken from this
source tree's vhost_core_build/ (links into the core in the repository, copies in the
sdist): see docs/packaging.md.  No library beyond libc: NVMe/TCP is sockets, CRC32C is
computed here, VFIO is ioctls.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vhost_core_build"))
from native_build import plugin_ffibuilder

ffibuilder = plugin_ffibuilder("vhost_bdev_nvme._nvme_native", __file__, "nvme_tcp.h", ["nvme_tcp.c"])
pcie_ffibuilder = plugin_ffibuilder("vhost_bdev_nvme._nvme_pcie", __file__, "nvme_pcie.h", ["nvme_pcie.c"],
                                    extra_link_args=["-pthread"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
    pcie_ffibuilder.compile(verbose=True)
