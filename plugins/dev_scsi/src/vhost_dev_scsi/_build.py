"""cffi (API mode) builder for dev_scsi's native part: ``vhost_dev_scsi._scsi_native``.

scsi.h is both the C API and the cffi cdef; virtio_scsi.c (the transport) and scsi_lun.c
(the SCSI emulation) compile against the core's
public header, vhost_core/vhost_native.h. Run by setup.py's cffi_modules.

The header and vhost-core's build helper (vhost_core.native_build) are taken from
this source tree's vhost_core_build/ (links into the core in the repository, copies
in the sdist), so the build needs no vhost-core installed: see docs/packaging.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "vhost_core_build"))
from native_build import plugin_ffibuilder  # noqa: E402

ffibuilder = plugin_ffibuilder("vhost_dev_scsi._scsi_native", __file__, "scsi.h", ["virtio_scsi.c", "scsi_lun.c"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
