"""Commands: what a plugin (or the core) offers its users, declared once.

A command is a JSON-RPC method of the daemon, named the SPDK way, with its parameters
as a frozen attrs class (decoded and checked by :mod:`vhost_core.rpc.registry`)::

    @attrs.frozen
    class CreateParams:
        name: str
        num_blocks: int
        block_size: int = 512

    @hookimpl
    def vhost_register_commands(registry):
        @registry.command("bdev_mydisk_create", params=CreateParams)
        def create(ctx: CommandContext, p: CreateParams) -> str:
            '''Create a mydisk bdev; returns its name.'''
            ctx.bdevs.add(...)
            return p.name

The handler gets the :class:`CommandContext` (what a command may touch of the daemon)
and the decoded parameters (only the context when ``params`` is None).  It runs under
the daemon's control lock; one that may wait (draining a bdev, stopping queues) is
declared ``blocking=True`` and then runs on a worker thread, so the RPC server keeps
answering other clients meanwhile.

The same declaration is the ``vhost-rpc`` sub-command, and so are the deprecated aliases:
each parameter's command-line spelling and help sit in its field's metadata
(:func:`param`, or ``cli=`` of :func:`unsupported` / :func:`extension`); by default a
required parameter is a positional argument and an optional one ``--its-name``, a bool is
a flag, a Literal gives the choices.  Only the options given are sent (as SPDK's
``rpc.py`` does).  A command whose command line is not its parameters (sizes in MiB, say)
adds :class:`CliArg` arguments and a ``to_params`` in its :class:`Cli`::

    @attrs.frozen
    class CreateParams:
        name: str
        num_blocks: int = param(hidden=True)
        block_size: int = param(512, help="block size in bytes")
        uuid: str | None = param(None, "-u", "--uuid", help="UUID of the bdev")

    registry.add(Command("bdev_mydisk_create", create, params=CreateParams, cli=Cli(
        arguments=(CliArg("total_size", type=float, help="size in MiB"),),
        positionals=("name", "total_size", "block_size"),
        to_params=lambda a: {**a, "num_blocks": int(a.pop("total_size") * 2**20) // a["block_size"]})))
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Callable

import attrs

from vhost_core.errors import VhostError
from vhost_core.memory_registration import MemoryRegistry
from vhost_core.rpc.registry import RpcRegistry, RpcState, cli, extension, param, unsupported

__all__ = ["Cli", "CliArg", "Command", "CommandContext", "CommandRegistry", "cli", "extension", "param",
           "register", "unsupported"]

if TYPE_CHECKING:  # pragma: no cover
    from vhost_core.bdev.interface import BdevModule, BdevModuleRegistry
    from vhost_core.bdev.registry import BdevRegistry
    from vhost_core.controllers import ControllerRegistry


@attrs.frozen
class CliArg:
    """A ``vhost-rpc`` argument that is not a parameter (its :class:`Cli` turns it into some)."""

    name: str
    #: Options ("-b", "--name"); none: a positional argument.
    flags: tuple[str, ...] = ()
    help: str = ""
    type: Callable[[str], Any] | None = None
    #: "?" for an optional positional argument.
    nargs: str | None = None
    metavar: str | None = None


@attrs.frozen
class Cli:
    """How ``vhost-rpc`` offers a command, beyond what its parameters' fields say."""

    #: The sub-command's help; default: the command's.
    help: str | None = None
    #: Arguments that are not parameters (converted by ``to_params``).
    arguments: tuple[CliArg, ...] = ()
    #: Order of the positional arguments (parameter and argument names); default: the
    #: parameters' declaration order, then ``arguments``.
    positionals: tuple[str, ...] | None = None
    #: The given arguments (name -> value, those not given left out) -> the parameters sent.
    to_params: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    #: Print the result (False: print nothing, as rpc.py does for deletes and setters; a
    #: callable prints it its own way, e.g. ``vhost_core.rpc.cli.print_array`` as rpc.py
    #: prints the bdevs bdev_nvme_attach_controller made).
    prints: bool | Callable[[Any], None] = True
    #: A client-side procedure instead of one call: ``run(client, args)`` -> what to print.
    run: Callable[[Any, Any], Any] | None = None


@attrs.frozen
class Command:
    """One command."""

    #: The JSON-RPC method name (SPDK's, where SPDK has the method).
    name: str
    #: ``handler(ctx, params)``, or ``handler(ctx)`` when ``params`` is None (None with ``rpc=False``).
    handler: Callable[..., Any] | None
    #: Frozen attrs class of the parameters, or None for a command that takes none.
    params: type | None = None
    #: Older names of the same method (SPDK's deprecated spellings): served, and listed
    #: only with ``rpc_get_methods --include-aliases``.
    aliases: tuple[str, ...] = ()
    #: The name is itself an old SPDK spelling kept as a method of its own: what to use
    #: instead (logged once, on first use).
    deprecated: str | None = None
    #: SPDK's RPC states in which it may be called.
    states: RpcState = RpcState.RUNTIME
    #: It may wait (drains, stops queues): run it off the RPC server's event loop.
    blocking: bool = False
    #: One line for ``rpc_get_methods`` schemas and ``vhost-rpc --help``; default: the
    #: first line of the handler's docstring.
    help: str | None = None
    #: Its ``vhost-rpc`` sub-command, beyond what the parameters say.
    cli: Cli = Cli()
    #: A daemon method (False: only a ``vhost-rpc`` procedure, ``cli.run``; or a method the
    #: RPC registry serves itself).
    rpc: bool = True

    def summary(self) -> str:
        """The first line of ``help``, else of the handler's docstring."""
        text = self.help or getattr(self.handler, "__doc__", None) or ""
        return text.strip().split("\n", 1)[0]


class CommandRegistry:
    """The commands one plugin registers (``vhost_register_commands``)."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def add(self, command: Command) -> Command:
        if not isinstance(command, Command):
            raise TypeError(f"{command!r} is not a vhost_core.commands.Command")
        if command.params is not None and not attrs.has(command.params):
            raise TypeError(f"command '{command.name}': params must be an attrs class, got {command.params!r}")
        for name in (command.name, *command.aliases):
            if name in self:
                raise ValueError(f"command '{name}' is registered twice")
        self._commands[command.name] = command
        return command

    def command(self, name: str, *, params: type | None = None, aliases: Sequence[str] = (),
                deprecated: str | None = None, states: RpcState = RpcState.RUNTIME, blocking: bool = False,
                help: str | None = None, cli: Cli = Cli(), rpc: bool = True
                ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of :meth:`add`; returns the handler unchanged."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(Command(name, fn, params=params, aliases=tuple(aliases), deprecated=deprecated,
                             states=states, blocking=blocking, help=help, cli=cli, rpc=rpc))
            return fn

        return deco

    def __iter__(self) -> Iterator[Command]:
        return iter(list(self._commands.values()))

    def __contains__(self, name: object) -> bool:
        return any(name == c.name or name in c.aliases for c in self._commands.values())


class CommandContext:
    """What a command's handler may use of the daemon.

    ``bdevs``: the bdev registry (add, get, open, resize, delete, iterate);
    ``controllers``: the controllers (create, get, device, listen, delete);
    ``memory``: the guest memory mappings, for backends that DMA into them
    (:class:`~vhost_core.memory_registration.MemoryRegistry`: ``listen`` / ``unlisten``).
    """

    def __init__(self, bdevs: BdevRegistry, controllers: ControllerRegistry, modules: BdevModuleRegistry,
                 memory: MemoryRegistry | None = None) -> None:
        self.bdevs = bdevs
        self.controllers = controllers
        self._modules = modules
        self.memory = memory if memory is not None else MemoryRegistry()

    def bdev_module(self, name: str) -> BdevModule:
        """The registered bdev module ``name`` (the plugin's own, with its state)."""
        module = self._modules.get(name)
        if module is None:
            raise VhostError(errno.ENODEV, f"bdev module '{name}' is not registered")
        return module


def _bind(command: Command, ctx: CommandContext) -> Callable[..., Any]:
    handler = command.handler
    if command.params is None:
        def call() -> Any:
            return handler(ctx)
    else:
        def call(p: Any) -> Any:
            return handler(ctx, p)
    call.__name__ = getattr(handler, "__name__", command.name)
    call.__doc__ = command.help or handler.__doc__
    return call


def register(rpc: RpcRegistry, commands: CommandRegistry, ctx: CommandContext, owner: str) -> None:
    """Serve ``commands`` as ``owner``'s RPC methods: all of them, or (ValueError) none."""
    added: list[str] = []
    try:
        for c in commands:
            if not c.rpc:
                continue
            rpc.add(c.name, _bind(c, ctx), params=c.params, deprecated_aliases=c.aliases, owner=owner,
                    states=c.states, deprecated=c.deprecated, blocking=c.blocking)
            added.append(c.name)
    except (ValueError, TypeError):
        for name in added:
            rpc.remove(name)
        raise
