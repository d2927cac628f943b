"""vhost-bdev-nvme: NVMe controllers (NVMe/TCP today) as bdevs of the vhost target."""

__version__ = "0.1.0"
