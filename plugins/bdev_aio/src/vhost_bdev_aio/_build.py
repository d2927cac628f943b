"""cffi (API mode) builder for bdev_aio's native part: ``vhost_bdev_aio._aio_native``.

aio_bdev.h is both the C API and the cffi cdef; aio.c compiles against the core's
public header (vhost_core.get_include()). Run by setup.py's cffi_modules.
Linux AIO and io_uring are reached through raw system calls (kernel uapi headers
only), so the extension needs neither libaio nor liburing at run time.
"""

from vhost_core.native_build import plugin_ffibuilder

ffibuilder = plugin_ffibuilder("vhost_bdev_aio._aio_native", __file__, "aio_bdev.h", ["aio.c"],
                               extra_link_args=["-pthread"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
