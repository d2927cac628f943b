"""SPDK's whole parameter set, for every method we serve, SPDK 24.01 through the client of today.

The table below is SPDK's, independent of our declarations: the JSON decoders of each
``SPDK_RPC_REGISTER``ed method in v24.01, v24.05, v24.09, v25.01, v25.05, v25.09 and master's
schema/schema.yaml.  Every name in it must be declared; every name we declare beyond it must be
marked as our extension.  Then SPDK's own command line, with *every* option it has set, must get
an answer that is not "unknown parameter" or a type error: what we do not honour is refused
naming the parameter and the value.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os

import pytest

SPDK_PARAMS: dict[str, tuple[str, ...]] = {
    "bdev_aio_create": ("block_size", "fallocate", "filename", "name", "nowait", "readonly", "uuid"),
    "bdev_aio_delete": ("name",),
    "bdev_aio_rescan": ("name",),
    "bdev_get_bdevs": ("name", "timeout"),
    "bdev_get_iostat": ("name", "names", "per_channel", "reset_mode"),
    "bdev_malloc_create": ("block_size", "dif_is_head_of_md", "dif_pi_format", "dif_type", "md_interleave",
                           "md_size", "name", "num_blocks", "numa_id", "optimal_io_boundary",
                           "physical_block_size", "uuid"),
    "bdev_malloc_delete": ("name",),
    "bdev_null_create": ("block_size", "dif_is_head_of_md", "dif_pi_format", "dif_type", "md_size", "name",
                         "num_blocks", "optimal_write_size", "physical_block_size",
                         "preferred_unmap_alignment", "preferred_unmap_granularity",
                         "preferred_write_alignment", "preferred_write_granularity", "uuid"),
    "bdev_null_delete": ("name",),
    "bdev_nvme_attach_controller": ("adrfam", "allow_unrecognized_csi", "ctrlr_loss_timeout_sec", "ddgst",
                                    "dhchap_ctrlr_key", "dhchap_key", "disable_sq_flow_control",
                                    "fabrics_connect_timeout_us", "fast_io_fail_timeout_sec", "hdgst",
                                    "hostaddr", "hostnqn", "hostsvcid", "max_bdevs", "multipath",
                                    "multipath_opts", "name", "num_io_queues", "prchk_guard", "prchk_reftag",
                                    "priority", "psk", "reconnect_delay_sec", "subnqn", "traddr", "trsvcid",
                                    "trtype"),
    "bdev_nvme_detach_controller": ("adrfam", "hostaddr", "hostsvcid", "name", "subnqn", "traddr", "trsvcid",
                                    "trtype"),
    "bdev_nvme_get_controllers": ("name",),
    "bdev_nvme_reset_controller": ("cntlid", "name"),
    "bdev_nvme_set_hotplug": ("enable", "period_us"),
    "bdev_rbd_create": ("block_size", "cluster_name", "config", "name", "pool_name", "rbd_name", "read_only",
                        "user_id", "uuid"),
    "bdev_rbd_delete": ("name",),
    "bdev_rbd_get_clusters_info": ("name",),
    "bdev_rbd_register_cluster": ("config_file", "config_param", "core_mask", "key_file", "name", "user_id"),
    "bdev_rbd_resize": ("name", "new_size"),
    "bdev_rbd_unregister_cluster": ("name",),
    "bdev_reset_iostat": ("mode", "name"),
    "bdev_set_qos_limit": ("name", "r_mbytes_per_sec", "rw_ios_per_sec", "rw_mbytes_per_sec", "w_mbytes_per_sec"),
    "bdev_wait_for_examine": (),
    "framework_get_config": ("name", "with_batches"),
    "framework_get_reactors": (),
    "framework_get_subsystems": (),
    "framework_start_init": (),
    "framework_wait_init": (),
    "log_clear_flag": ("flag",),
    "log_get_flags": (),
    "log_get_level": (),
    "log_get_print_level": (),
    "log_set_flag": ("flag",),
    "log_set_level": ("level",),
    "log_set_print_level": ("level",),
    "rpc_get_methods": ("current", "include_aliases"),
    "spdk_get_version": (),
    "spdk_kill_instance": ("sig_name",),
    "thread_get_stats": (),
    "vhost_controller_set_coalescing": ("ctrlr", "delay_base_us", "iops_threshold"),
    "vhost_create_blk_controller": ("cpumask", "ctrlr", "dev_name", "packed_ring", "readonly", "transport"),
    "vhost_create_scsi_controller": ("cpumask", "ctrlr", "delay"),
    "vhost_delete_controller": ("ctrlr",),
    "vhost_get_controllers": ("name",),
    "vhost_scsi_controller_add_target": ("bdev_name", "ctrlr", "scsi_target_num"),
    "vhost_scsi_controller_remove_target": ("ctrlr", "scsi_target_num"),
    "vhost_start_scsi_controller": ("ctrlr",),
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from vhost_core.app import App

    core = min(os.sched_getaffinity(0))
    app = App(str(tmp_path_factory.mktemp("sockets")), 1 << core, "/nonexistent/rpc.sock")
    app.register_rpc_methods()       # no reactor is started: only the declarations are looked at
    return app.rpc


@pytest.mark.parametrize("method", sorted(SPDK_PARAMS))
def test_spdk_parameters_are_declared_and_ours_are_marked(registry, method):
    assert method in registry, f"{method} is no longer served"
    declared = {p["name"]: p for p in registry.schema(method)["params"]}
    missing = set(SPDK_PARAMS[method]) - set(declared)
    assert not missing, f"{method}: SPDK's parameters {sorted(missing)} are not declared"
    unmarked = [n for n, p in declared.items() if n not in SPDK_PARAMS[method] and "extension" not in p]
    assert not unmarked, f"{method}: {unmarked} are not SPDK's: declare them with extension()"


def test_every_spdk_method_we_serve_is_in_the_table(registry):
    from vhost_core.rpc.spdk import IGNORED, SPDK_METHODS

    ours = {"framework_get_plugins", "vhost_get_queue_stats", "bdev_aio_get_stats", "bdev_rbd_get_stats"}
    served = set(registry.names(include_aliases=False)) - ours - set(IGNORED)
    assert served <= set(SPDK_PARAMS), f"add SPDK's parameters of {sorted(served - set(SPDK_PARAMS))}"
    in_namespaces = {m for m in served if m.split("_")[0] in ("bdev", "vhost", "framework", "log")}
    assert in_namespaces <= set(SPDK_METHODS)


# -- SPDK's command line with every option set ----------------------------------------------------


def _value(action: argparse.Action) -> list[str]:
    """A non-default value for an option or positional of SPDK's parser."""
    if action.choices:
        return [str(list(action.choices)[-1])]
    if action.metavar == "key=value":
        return ["x=y"]
    if action.type is int:
        return ["8"]
    if action.type is float:
        return ["1"]
    return ["x"]


def _everything_set(sub: argparse.ArgumentParser, name: str, positionals: dict[str, str]) -> list[str]:
    argv = [name]
    for a in sub._actions:
        if isinstance(a, argparse._HelpAction):
            continue
        if not a.option_strings:
            argv.append(positionals.get(a.dest, _value(a)[0]))
        elif isinstance(a, argparse.BooleanOptionalAction):
            argv.append(a.option_strings[0])
        elif a.nargs == 0:
            argv.append(a.option_strings[0])
        else:
            argv += [a.option_strings[0], *_value(a)]
    return argv


#: What the recorder answers where rpc.py's command line needs an answer to print.
ANSWERS = {"bdev_nvme_attach_controller": []}


class _Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def __getattr__(self, method):
        from spdk.rpc.cmd_parser import remove_null

        def send(**kwargs):
            self.sent.append((method, remove_null(kwargs)))
            return ANSWERS.get(method)      # what rpc.py prints must be there
        return send

    def call(self, method, params=None):
        self.sent.append((method, params or {}))


def test_spdk_rpc_py_with_every_option_is_understood(vhost_daemon, tmp_path):
    spdk_rpc = pytest.importorskip("spdk.spdk_rpc", reason="SPDK's client: pip install spdk")
    from spdk.rpc.client import JSONRPCClient, JSONRPCException

    parser, subparsers = spdk_rpc.create_parser()
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    positionals = {"filename": str(img), "name": "X0", "total_size": "1", "block_size": "512",
                   "ctrlr": "vhost.9", "dev_name": "X0", "bdev_name": "X0", "scsi_target_num": "0",
                   "level": "NOTICE", "flag": "bdev", "sig_name": "SIGQUIT"}
    refused = {}
    for method in sorted(SPDK_PARAMS):
        if method not in subparsers.choices or method in ("framework_start_init", "framework_wait_init"):
            continue
        argv = _everything_set(subparsers.choices[method], method, positionals)
        args = parser.parse_args(argv)
        args.client = rec = _Recorder()
        with contextlib.redirect_stdout(io.StringIO()):
            args.func(args)
        (sent_method, params), = rec.sent
        assert sent_method == method
        with JSONRPCClient(vhost_daemon.rpc_path, timeout=30) as client:
            try:
                client.call(method, dict(params))
                continue
            except JSONRPCException as exc:
                message = exc.message
        assert "unknown parameter" not in message and " must be " not in message, (argv, message)
        if '"code": -95' in message:      # ENOTSUP: names the parameter and the value refused
            assert any(f"{key}=" in message for key in params), message
            refused[method] = message
    assert {"bdev_malloc_create", "bdev_null_create", "bdev_aio_create", "vhost_create_blk_controller",
            "spdk_kill_instance"} <= set(refused)
