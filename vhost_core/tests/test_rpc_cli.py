import errno
import io
import json
import os
import shutil
import sys
import tempfile
import types

import attrs
import pytest


from vhost_core.rpc import cli, core_commands  # noqa: E402
from vhost_core.rpc.cli import NO_OUTPUT, build_parser, main, print_result  # noqa: E402
from vhost_core.rpc.registry import RpcError, RpcRegistry  # noqa: E402
from vhost_core.rpc.testing import ServerThread  # noqa: E402


@attrs.frozen
class OptName:
    name: str | None = None
    timeout: int | None = None


@attrs.frozen
class Ctrlr:
    ctrlr: str


@attrs.frozen
class MallocParams:
    num_blocks: int
    block_size: int = 512
    name: str | None = None


def make_registry():
    r = RpcRegistry()
    state = {"bdevs": [{"name": "Malloc0", "block_size": 512}], "ctrlrs": [{"ctrlr": "vhost.0"}], "log": []}

    @r.method("bdev_get_bdevs", params=OptName, deprecated_aliases=["get_bdevs"])
    def bdev_get_bdevs(p):
        state["log"].append(("bdev_get_bdevs", p))
        if p.name is None:
            return state["bdevs"]
        found = [b for b in state["bdevs"] if b["name"] == p.name]
        if not found:
            raise RpcError(-errno.ENODEV, "No such device")
        return found

    @r.method("bdev_malloc_create", params=MallocParams)
    def create(p):
        state["bdevs"].append({"name": p.name or "Malloc1", "block_size": p.block_size})
        return p.name or "Malloc1"

    @r.method("vhost_get_controllers", params=OptName, deprecated_aliases=["get_vhost_controllers"])
    def ctrls(p):
        return state["ctrlrs"]

    @r.method("vhost_delete_controller", params=Ctrlr, deprecated_aliases=["remove_vhost_controller"])
    def delete(p):
        state["log"].append(("delete", p.ctrlr))
        return True

    @r.method("spdk_get_version")
    def version():
        return {"version": "vhost 0.1.0", "fields": {"major": 0, "minor": 1, "patch": 0, "suffix": ""}}

    @r.method("framework_get_subsystems")
    def subsystems():
        return [{"subsystem": "bdev", "depends_on": []}]

    @attrs.frozen
    class CfgP:
        name: str
        with_batches: bool = False

    @r.method("framework_get_config", params=CfgP)
    def get_config(p):
        return [{"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 8}}]

    r.state = state
    return r


@pytest.fixture
def server():
    d = tempfile.mkdtemp(prefix="rpccli")
    with ServerThread(make_registry(), os.path.join(d, "s.sock")) as st:
        yield st
    shutil.rmtree(d, ignore_errors=True)


def run(server, *argv, contributors=None):
    return main(["-s", server.path, *argv], contributors=contributors)


def test_print_result_formats(capsys):
    print_result("Malloc0")
    print_result(True)
    print_result({"a": [1]})
    print_result(NO_OUTPUT)
    print_result(None)
    print_result(["x", "y"])
    out = capsys.readouterr().out
    assert out == 'Malloc0\ntrue\n{\n  "a": [\n    1\n  ]\n}\n[\n  "x",\n  "y"\n]\n'


def test_default_socket_matches_spdk():
    assert cli.DEFAULT_RPC_SOCKET == "/var/tmp/spdk.sock"
    args = build_parser([]).parse_args(["call", "x"])
    assert args.server_addr == "/var/tmp/spdk.sock" and args.timeout == 60.0


def test_core_get_commands(server, capsys):
    assert run(server, "bdev_get_bdevs") == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "Malloc0", "block_size": 512}]
    assert run(server, "bdev_get_bdevs", "-b", "Malloc0", "-t", "100") == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "Malloc0"
    assert server.registry.state["log"][-1] == ("bdev_get_bdevs", OptName("Malloc0", 100))
    assert run(server, "vhost_get_controllers") == 0
    assert json.loads(capsys.readouterr().out) == [{"ctrlr": "vhost.0"}]
    assert run(server, "spdk_get_version") == 0
    out = capsys.readouterr().out
    assert out.startswith('{\n  "version": "vhost 0.1.0"')


def test_rpc_get_methods(server, capsys):
    assert run(server, "rpc_get_methods") == 0
    names = json.loads(capsys.readouterr().out)
    assert "bdev_get_bdevs" in names and "get_bdevs" not in names
    assert run(server, "rpc_get_methods", "-i") == 0
    assert "get_bdevs" in json.loads(capsys.readouterr().out)


def test_delete_prints_nothing(server, capsys):
    assert run(server, "vhost_delete_controller", "vhost.0") == 0
    assert capsys.readouterr() == ("", "")
    assert server.registry.state["log"][-1] == ("delete", "vhost.0")


def test_deprecated_cli_aliases(server, capsys):
    assert run(server, "get_bdevs") == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["name"] == "Malloc0"
    assert err == "get_bdevs is deprecated, use bdev_get_bdevs instead.\n"
    assert run(server, "remove_vhost_controller", "vhost.0") == 0
    out, err = capsys.readouterr()
    assert out == "" and "remove_vhost_controller is deprecated, use vhost_delete_controller" in err
    assert run(server, "get_vhost_controllers") == 0
    assert "deprecated" in capsys.readouterr().err


def test_delete_bdev_sends_old_rpc(server, capsys):
    assert run(server, "delete_bdev", "Malloc0") == 1  # not registered on this tiny server
    err = capsys.readouterr().err
    assert "Method not found: 'delete_bdev'" in err
    assert '"name": "Malloc0"' in err and '"method": "delete_bdev"' in err


def test_rpc_error_output(server, capsys):
    assert run(server, "bdev_get_bdevs", "-b", "nope") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "request:\n"
        '{\n  "name": "nope",\n  "method": "bdev_get_bdevs",\n  "req_id": 1\n}\n'
        "Got JSON-RPC error response\n"
        "response:\n"
        '{\n  "code": -19,\n  "message": "No such device"\n}\n'
    )


def test_connection_error(capsys):
    d = tempfile.mkdtemp(prefix="rpccli")
    try:
        path = os.path.join(d, "none.sock")
        assert main(["-s", path, "bdev_get_bdevs"]) == 1
        err = capsys.readouterr().err
        assert path in err and "is the vhost target running?" in err
    finally:
        shutil.rmtree(d)


def test_call_escape_hatch(server, capsys):
    assert run(server, "call", "bdev_malloc_create", '{"num_blocks": 8, "name": "Malloc7"}') == 0
    assert capsys.readouterr().out == "Malloc7\n"
    assert run(server, "call", "bdev_get_bdevs") == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert run(server, "call", "bdev_malloc_create", '{"num_blocks": "x"}') == 1
    assert "parameter 'num_blocks' must be an integer" in capsys.readouterr().err
    assert run(server, "call", "bdev_malloc_create", "[1]") == 2
    assert "must be a JSON object" in capsys.readouterr().err
    assert run(server, "call", "bdev_malloc_create", "{bad") == 2


def test_call_params_from_stdin(server, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"num_blocks": 1, "name": "FromStdin"}'))
    assert run(server, "call", "bdev_malloc_create", "-") == 0
    assert capsys.readouterr().out == "FromStdin\n"


def test_custom_contributor(server, capsys):
    def contribute(subparsers):
        p = subparsers.add_parser("bdev_malloc_create")
        p.add_argument("total_size", type=int)
        p.add_argument("block_size", type=int)
        p.add_argument("-b", "--name")
        p.set_defaults(
            func=lambda client, args: client.call(
                "bdev_malloc_create",
                {"num_blocks": args.total_size * 1024 * 1024 // args.block_size,
                 "block_size": args.block_size, "name": args.name},
            )
        )

    assert run(server, "bdev_malloc_create", "8", "4096", "-b", "M2",
               contributors=[core_commands.contribute, contribute]) == 0
    assert capsys.readouterr().out == "M2\n"


def test_broken_contributor_does_not_kill_cli(server, capsys):
    def broken(subparsers):
        raise RuntimeError("plugin exploded")

    assert run(server, "spdk_get_version", contributors=[core_commands.contribute, broken]) == 0
    out, err = capsys.readouterr()
    assert "plugin exploded" in err and "vhost 0.1.0" in out


def test_plugin_contributions_loaded(server, capsys, monkeypatch):
    from vhost_core.commands import Cli, Command, CommandRegistry

    seen = {}

    class PM:
        def names(self):
            return ["tp_cli"]

    def collect(pm, name):
        seen["called"] = True
        commands = CommandRegistry()
        commands.add(Command("plugin_cmd", None, rpc=False,
                             cli=Cli(run=lambda client, args: "from-plugin")))
        return types.SimpleNamespace(commands=commands)

    fake = types.ModuleType("vhost_core.plugins")
    fake.load_plugins = lambda: PM()
    fake.collect = collect
    monkeypatch.setitem(sys.modules, "vhost_core.plugins", fake)
    assert run(server, "plugin_cmd") == 0
    assert seen["called"] and capsys.readouterr().out == "from-plugin\n"


def test_underscored_options_accepted(server, capsys):
    assert run(server, "rpc_get_methods", "--include_aliases") == 0
    assert "get_bdevs" in json.loads(capsys.readouterr().out)


def test_dry_run(server, capsys):
    assert run(server, "--dry-run", "bdev_get_bdevs", "-b", "X") == 0
    out = capsys.readouterr().out
    assert out.startswith("Request:\n") and json.loads(out[len("Request:\n"):]) == {
        "jsonrpc": "2.0", "method": "bdev_get_bdevs", "id": 1, "params": {"name": "X"}}
    assert server.registry.state["log"] == []


def test_script_mode_from_stdin(server, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(
        "# comment\n\nbdev_malloc_create_call\n"
    ))
    # unknown command in the script -> argparse exits with 2
    with pytest.raises(SystemExit):
        run(server)
    monkeypatch.setattr(sys, "stdin", io.StringIO(
        "# comment\n\ncall bdev_malloc_create '{\"num_blocks\": 1, \"name\": \"S1\"}'\nbdev_get_bdevs -b S1\n"
    ))
    assert run(server) == 0
    out = capsys.readouterr().out
    assert out.startswith("S1\n") and '"name": "S1"' in out
    monkeypatch.setattr(sys, "stdin", io.StringIO("bdev_get_bdevs -b nope\nspdk_get_version\n"))
    assert run(server) == 1
    out, err = capsys.readouterr()
    assert "No such device" in err and "vhost 0.1.0" not in out


def test_save_config(server, capsys):
    assert run(server, "save_config") == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg == {"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 8}}]}]}
    assert run(server, "save_config", "-i", "-1") == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_no_command_on_tty_prints_help(server, capsys, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    assert run(server) == 1
    assert "usage: vhost-rpc" in capsys.readouterr().err


def test_default_contributors_without_plugins_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "vhost_core.plugins", None)  # import -> ImportError
    parser = build_parser(cli._default_contributors())
    args = parser.parse_args(["vhost_delete_controller", "c0"])
    assert args.ctrlr == "c0" and args.func is not None
