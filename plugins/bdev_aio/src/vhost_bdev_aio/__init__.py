"""vhost-bdev-aio: Linux files and block devices as bdevs, through Linux AIO or io_uring."""

__version__ = "0.1.0"
