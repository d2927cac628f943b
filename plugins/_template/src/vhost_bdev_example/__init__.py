"""vhost-bdev-example: an in-memory bdev for the vhost target, in pure Python."""

__version__ = "0.1.0"
