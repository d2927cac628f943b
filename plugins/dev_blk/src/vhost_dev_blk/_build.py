"""cffi (API mode) builder for dev_blk's native part: ``vhost_dev_blk._blk_native``.

blk.h is both the C API and the cffi cdef; blk.c compiles against the core's
public header (vhost_core.get_include()). Run by setup.py's cffi_modules.
"""

from vhost_core.native_build import plugin_ffibuilder

ffibuilder = plugin_ffibuilder("vhost_dev_blk._blk_native", __file__, "blk.h", ["blk.c"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
