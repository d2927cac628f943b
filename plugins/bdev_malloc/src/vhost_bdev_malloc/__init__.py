"""vhost-bdev-malloc: RAM and null bdevs for the vhost target."""

__version__ = "0.1.0"
