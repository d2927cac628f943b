"""Every hook a vhost plugin may implement.  This module is the whole plugin API surface.

A plugin is a module named by an entry point in the ``vhost.plugins`` group; it
implements some of the hooks below with ``@vhost_core.hookspecs.hookimpl`` and may set
``VHOST_CORE_API = (1,)`` (the :data:`vhost_core.CORE_API_VERSION` values it was written
for; a plugin without it is assumed to support version 1 only).

Hooks are for lifecycle, configuration and registration.  None is ever called per I/O:
the data path calls native function tables resolved once when a device opens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import argparse

    from vhost_core.app import App
    from vhost_core.rpc.registry import RpcRegistry

PROJECT = "vhost"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------
# registration (called once, while the daemon starts)
# --------------------------------------------------------------------------


@hookspec
def vhost_register_rpc_methods(rpc: RpcRegistry, app: App) -> None:
    """Register the plugin's JSON-RPC methods.

    :param rpc: call ``rpc.add(name, handler, params=AttrsClass, deprecated_aliases=(...),
        owner=<plugin name>)`` or use ``@rpc.method(...)``.  Names follow SPDK
        (``bdev_<backend>_<verb>``, ``vhost_create_<type>_controller``); a duplicate
        name raises ``ValueError`` and costs the plugin one log line: the methods
        it registered before are removed again (all or nothing), the other plugins
        are unaffected.
    :param app: the running daemon: ``app.bdevs`` (the bdev registry),
        ``app.controllers``, ``app.reactors``, ``app.add_controller(...)``.
    :return: ignored.
    """


@hookspec
def vhost_add_cli_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``vhost-rpc`` subcommands for the plugin's RPCs.

    Each subcommand calls ``set_defaults(func=handler)`` where
    ``handler(client, args)`` returns the result to print (see
    :mod:`vhost_core.rpc.cli`).  Called in the CLI process, not in the daemon.
    """


# --------------------------------------------------------------------------
# lifecycle
# --------------------------------------------------------------------------


@hookspec
def vhost_app_started(app: App) -> None:
    """The reactors run and the RPC socket listens; ``--json`` config is not yet applied."""


@hookspec
def vhost_app_stopping(app: App) -> None:
    """The daemon is shutting down: controllers are already stopped and deleted.

    Release the plugin's bdevs and native resources here.  Bdevs registered in
    ``app.bdevs`` are deleted by the core after this hook returns.
    """


@hookspec
def vhost_config_json(app: App) -> dict[str, list[dict[str, Any]]]:
    """Return the RPC calls that recreate the plugin's current objects, by SPDK
    subsystem: ``{"bdev": [{"method": "bdev_malloc_create", "params": {...}}]}``.

    Serves ``framework_get_config`` / ``save_config``; a ``--json`` file made from
    it recreates the state.  Subsystems used: ``bdev``, ``vhost_blk``, ``vhost_scsi``.
    """
