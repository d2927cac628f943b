"""cffi (API mode) builder for dev_scsi's native part: ``vhost_dev_scsi._scsi_native``.

scsi.h is both the C API and the cffi cdef; scsi.c compiles against the core's
public header (vhost_core.get_include()). Run by setup.py's cffi_modules.
"""

from vhost_core.native_build import plugin_ffibuilder

ffibuilder = plugin_ffibuilder("vhost_dev_scsi._scsi_native", __file__, "scsi.h", ["scsi.c"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
