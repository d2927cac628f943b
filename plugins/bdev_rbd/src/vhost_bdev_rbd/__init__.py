"""vhost-bdev-rbd: Ceph RBD images for the vhost target, through librbd's asynchronous API."""

__version__ = "0.1.0"
