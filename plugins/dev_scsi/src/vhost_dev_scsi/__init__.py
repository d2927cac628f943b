"""vhost-dev-scsi: virtio-scsi controllers (SPDK's vhost-scsi) for the vhost target."""

__version__ = "0.1.0"
