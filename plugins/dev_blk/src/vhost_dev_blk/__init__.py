"""vhost-dev-blk: virtio-blk controllers for the vhost target."""

__version__ = "0.1.0"
