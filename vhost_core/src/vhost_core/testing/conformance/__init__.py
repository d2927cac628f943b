"""Conformance suites a plugin runs unchanged in its own tests directory.

- :mod:`.bdev` -- :class:`~.bdev.BdevConformance`: every bdev backend, driven through a
  vhost-blk controller and the fake front-end.
- :mod:`.device` -- :class:`~.device.DeviceConformance`: every device type (blk, scsi,
  ...), driven through raw vhost-user messages.

Each is a test class to subclass with one fixture (the RPC recipe that makes your
bdev or controller) on the ``vhost_daemon`` fixture of vhost-core's pytest plugin,
which pytest loads by itself once vhost-core is installed.  See each module's
docstring for the one-import usage.
"""
