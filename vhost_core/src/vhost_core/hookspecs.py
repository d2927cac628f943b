"""Every hook a vhost plugin may implement.  This module is the whole plugin API surface.

A plugin is a module named by an entry point in the ``vhost.plugins`` group; it
implements some of the hooks below with ``@vhost_core.hookspecs.hookimpl`` and sets
``VHOST_CORE_API = (2,)`` (the :data:`vhost_core.CORE_API_VERSION` values it was written
for; a plugin without it is assumed to support version 1 only, which this core no
longer provides).

Hooks register things; they never receive the daemon.  What a plugin's objects may
use at run time is handed to them: a command's handler gets a
:class:`~vhost_core.commands.CommandContext` (the bdev registry, the controllers, the
plugin's bdev modules), a device gets a :class:`~vhost_core.device.DeviceContext` when
it is attached.  None of these hooks is ever called per I/O: the data path calls native
function tables resolved once when a device opens a bdev.

Each hook is called once per plugin while the daemon starts (and, for
``vhost_register_commands``, in the ``vhost-rpc`` process to build its sub-commands).
A plugin whose registration fails (a name already taken, a malformed declaration)
costs one log line and has nothing registered: all or nothing, the others load.

Memory registration (SPDK's ``spdk_mem_register`` and mem-map notifications) is not a
hook but a registry handed to commands: a bdev whose device DMAs into the buffers it
is given (a PCIe SSD through VFIO) calls ``ctx.memory.listen(listener)`` when it
attaches and ``ctx.memory.unlisten(listener)`` when it goes; the listener's
``mem_register(vaddr, length)`` / ``mem_unregister(vaddr, length)`` are then called for
every guest memory mapping, after it is made and before it is unmapped (only once no
request can point into it).  The contract: :mod:`vhost_core.memory_registration`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from vhost_core.bdev.interface import BdevModuleRegistry
    from vhost_core.commands import CommandRegistry
    from vhost_core.device import DeviceTypeRegistry

PROJECT = "vhost"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------
# registration (called once, while the daemon starts)
# --------------------------------------------------------------------------


@hookspec
def vhost_register_bdev_modules(registry: BdevModuleRegistry) -> None:
    """Register the plugin's bdev module types.

    :param registry: call ``registry.add(module)`` with a
        :class:`~vhost_core.bdev.interface.BdevModule` (its ``name`` is what the module's
        bdevs carry in ``Bdev.module``; it answers ``config_json`` for ``save_config``
        and ``fini`` at shutdown).  A name already registered raises ``ValueError``.
    :return: ignored.
    """


@hookspec
def vhost_register_device_types(registry: DeviceTypeRegistry) -> None:
    """Register the plugin's device types (virtio-blk, virtio-scsi, ...).

    :param registry: call ``registry.add(device_type)`` with a
        :class:`~vhost_core.device.DeviceType`: its name (``Device.device_type`` of its
        devices), the SPDK subsystem its controllers are saved under and the QEMU device
        that drives it.  A name already registered raises ``ValueError``.
    :return: ignored.
    """


@hookspec
def vhost_register_commands(registry: CommandRegistry) -> None:
    """Register the plugin's commands: each one a JSON-RPC method of the daemon and a
    ``vhost-rpc`` sub-command, from one declaration.

    :param registry: ``registry.add(Command(...))`` or the ``@registry.command(name,
        params=AttrsClass, ...)`` decorator (see :mod:`vhost_core.commands`).  Names follow
        SPDK (``bdev_<backend>_<verb>``, ``vhost_create_<type>_controller``); a name
        another plugin or the core already has fails this plugin's registration.
    :return: ignored.
    """

