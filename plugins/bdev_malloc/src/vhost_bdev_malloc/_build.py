"""cffi (API mode) builder for bdev_malloc's native part: ``vhost_bdev_malloc._malloc_native``.

malloc_bdev.h is both the C API and the cffi cdef; malloc.c compiles against the core's
public header (vhost_core.get_include()). Run by setup.py's cffi_modules.
"""

from vhost_core.native_build import plugin_ffibuilder

ffibuilder = plugin_ffibuilder("vhost_bdev_malloc._malloc_native", __file__, "malloc_bdev.h", ["malloc.c"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
