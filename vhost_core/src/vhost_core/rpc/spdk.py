"""What SPDK's RPC interface is, as data: the methods of its namespaces, the options this
target accepts and ignores, and what it does not implement yet.

Sources: the ``SPDK_RPC_REGISTER`` calls and JSON decoders of SPDK v24.01 through v25.09 and
its master (schema/schema.yaml), and the ``spdk`` client on PyPI (26.9), which sends every
parameter it knows.  ``scripts/rpc_coverage.py`` turns this and the registered methods into
the README's list of what is and is not implemented.
"""

from __future__ import annotations

from typing import Any

import attrs

from .registry import RpcState

__all__ = ["DISTRIBUTIONS", "IGNORED", "NOT_YET", "SPDK_METHODS", "Ignored", "family_match", "ignored_params_class"]

_BOTH = RpcState.STARTUP | RpcState.RUNTIME

#: Every method of SPDK's vhost, virtio_blk, bdev, framework and log namespaces (v24.01 to 26.9).
SPDK_METHODS: tuple[str, ...] = (
    "bdev_aio_create", "bdev_aio_delete", "bdev_aio_rescan", "bdev_compress_create",
    "bdev_compress_delete", "bdev_compress_get_orphans", "bdev_crypto_create", "bdev_crypto_delete",
    "bdev_daos_create", "bdev_daos_delete", "bdev_daos_resize", "bdev_delay_create", "bdev_delay_delete",
    "bdev_delay_update_latency", "bdev_enable_histogram", "bdev_error_create", "bdev_error_delete",
    "bdev_error_inject_error", "bdev_error_resume_pending", "bdev_examine", "bdev_ftl_create",
    "bdev_ftl_delete", "bdev_ftl_get_properties", "bdev_ftl_get_stats", "bdev_ftl_load",
    "bdev_ftl_set_property", "bdev_ftl_unload", "bdev_ftl_unmap", "bdev_get_bdevs", "bdev_get_histogram",
    "bdev_get_histogram_borders", "bdev_get_iostat", "bdev_iscsi_create", "bdev_iscsi_delete",
    "bdev_iscsi_set_options", "bdev_kvmalloc_create", "bdev_kvmalloc_delete",
    "bdev_lvol_check_shallow_copy", "bdev_lvol_clone", "bdev_lvol_clone_bdev", "bdev_lvol_create",
    "bdev_lvol_create_lvstore", "bdev_lvol_decouple_parent", "bdev_lvol_delete",
    "bdev_lvol_delete_lvstore", "bdev_lvol_get_lvols", "bdev_lvol_get_lvstores",
    "bdev_lvol_grow_lvstore", "bdev_lvol_inflate", "bdev_lvol_rename", "bdev_lvol_rename_lvstore",
    "bdev_lvol_resize", "bdev_lvol_set_parent", "bdev_lvol_set_parent_bdev", "bdev_lvol_set_read_only",
    "bdev_lvol_snapshot", "bdev_lvol_start_shallow_copy", "bdev_malloc_create", "bdev_malloc_delete",
    "bdev_null_create", "bdev_null_delete", "bdev_null_resize", "bdev_nvme_add_error_injection",
    "bdev_nvme_apply_firmware", "bdev_nvme_attach_controller", "bdev_nvme_cuse_register",
    "bdev_nvme_cuse_unregister", "bdev_nvme_detach_controller", "bdev_nvme_disable_controller",
    "bdev_nvme_enable_controller", "bdev_nvme_get_controller_health_info", "bdev_nvme_get_controllers",
    "bdev_nvme_get_discovery_info", "bdev_nvme_get_io_paths", "bdev_nvme_get_mdns_discovery_info",
    "bdev_nvme_get_path_iostat", "bdev_nvme_get_transport_statistics", "bdev_nvme_opal_init",
    "bdev_nvme_opal_revert", "bdev_nvme_remove_error_injection", "bdev_nvme_reset_controller",
    "bdev_nvme_send_cmd", "bdev_nvme_set_hotplug", "bdev_nvme_set_keys",
    "bdev_nvme_set_multipath_policy", "bdev_nvme_set_options", "bdev_nvme_set_preferred_path",
    "bdev_nvme_start_discovery", "bdev_nvme_start_mdns_discovery", "bdev_nvme_stop_discovery",
    "bdev_nvme_stop_mdns_discovery", "bdev_ocf_create", "bdev_ocf_delete", "bdev_ocf_flush_start",
    "bdev_ocf_flush_status", "bdev_ocf_get_bdevs", "bdev_ocf_get_stats", "bdev_ocf_reset_stats",
    "bdev_ocf_set_cache_mode", "bdev_ocf_set_seqcutoff", "bdev_opal_create", "bdev_opal_delete",
    "bdev_opal_get_info", "bdev_opal_new_user", "bdev_opal_set_lock_state", "bdev_passthru_create",
    "bdev_passthru_delete", "bdev_raid_add_base_bdev", "bdev_raid_create", "bdev_raid_delete",
    "bdev_raid_get_bdevs", "bdev_raid_remove_base_bdev", "bdev_raid_set_options", "bdev_rbd_create",
    "bdev_rbd_delete", "bdev_rbd_get_clusters_info", "bdev_rbd_register_cluster", "bdev_rbd_resize",
    "bdev_rbd_unregister_cluster", "bdev_reset_iostat", "bdev_set_options",
    "bdev_set_qd_sampling_period", "bdev_set_qos_limit", "bdev_split_create", "bdev_split_delete",
    "bdev_uring_create", "bdev_uring_delete", "bdev_uring_rescan", "bdev_virtio_attach_controller",
    "bdev_virtio_blk_set_hotplug", "bdev_virtio_detach_controller", "bdev_virtio_scsi_get_devices",
    "bdev_wait_for_examine", "bdev_xnvme_create", "bdev_xnvme_delete", "bdev_zone_block_create",
    "bdev_zone_block_delete", "framework_disable_cpumask_locks", "framework_enable_cpumask_locks",
    "framework_get_config", "framework_get_governor", "framework_get_pci_devices",
    "framework_get_reactors", "framework_get_scheduler", "framework_get_subsystems",
    "framework_monitor_context_switch", "framework_set_scheduler", "framework_start_init",
    "framework_wait_init", "log_clear_flag", "log_enable_timestamps", "log_get_flags", "log_get_level",
    "log_get_print_level", "log_set_flag", "log_set_level", "log_set_print_level",
    "vhost_controller_set_coalescing", "vhost_create_blk_controller", "vhost_create_scsi_controller",
    "vhost_delete_controller", "vhost_get_controllers", "vhost_scsi_controller_add_target",
    "vhost_scsi_controller_remove_target", "vhost_start_scsi_controller", "virtio_blk_create_transport",
    "virtio_blk_get_transports",
)


@attrs.frozen
class Ignored:
    """An SPDK method whose options have no meaning here: accepted, one NOTICE, nothing done.

    ``params``: SPDK's parameter names (any other name is refused), ``required`` among them;
    ``states``: SPDK's state mask for it; ``why``: what the NOTICE says; ``provider``: the
    plugin distribution that would give the options a meaning, when that is the reason.
    """

    params: tuple[str, ...]
    why: str
    states: RpcState = RpcState.STARTUP
    required: tuple[str, ...] = ()
    provider: str | None = None
    subsystem: str = ""


_NVME = "vhost-bdev-nvme"

#: Options SPDK's save_config always writes, for subsystems this target has no use for.
#: Registered as methods unless a plugin registers the name itself (a future NVMe plugin).
IGNORED: dict[str, Ignored] = {
    "iobuf_set_options": Ignored(
        ("small_pool_count", "large_pool_count", "small_bufsize", "large_bufsize", "enable_numa"),
        "this target has no iobuf buffer pools: requests are served in guest memory", subsystem="iobuf"),
    "sock_set_default_impl": Ignored(
        ("impl_name",), "this target has no sock layer: its only sockets are the vhost-user and RPC "
        "Unix sockets", required=("impl_name",), subsystem="sock"),
    "sock_impl_set_options": Ignored(
        ("impl_name", "recv_buf_size", "send_buf_size", "enable_recv_pipe", "enable_quickack",
         "enable_placement_id", "enable_zerocopy_send_server", "enable_zerocopy_send_client",
         "zerocopy_threshold", "tls_version", "enable_ktls"),
        "this target has no sock layer: its only sockets are the vhost-user and RPC Unix sockets",
        required=("impl_name",), subsystem="sock"),
    "accel_set_options": Ignored(
        ("small_cache_size", "large_cache_size", "task_count", "sequence_count", "buf_count"),
        "this target has no acceleration framework (accel)", subsystem="accel"),
    "bdev_set_options": Ignored(
        ("bdev_io_pool_size", "bdev_io_cache_size", "bdev_auto_examine", "iobuf_small_cache_size",
         "iobuf_large_cache_size"),
        "this target has no bdev_io pools or iobuf caches, and examines no bdev", subsystem="bdev"),
    "bdev_raid_set_options": Ignored(
        ("process_window_size_kb", "process_max_bandwidth_mb_sec"), "RAID bdevs are not implemented",
        states=_BOTH, subsystem="bdev"),
    "framework_set_scheduler": Ignored(
        ("name", "period", "load_limit", "core_limit", "core_busy", "mappings"),
        "a controller stays on the reactor chosen when it is created, as with SPDK's static scheduler",
        states=_BOTH, required=("name",), subsystem="scheduler"),
    "bdev_nvme_set_options": Ignored(
        ("action_on_timeout", "timeout_us", "timeout_admin_us", "keep_alive_timeout_ms", "arbitration_burst",
         "low_priority_weight", "medium_priority_weight", "high_priority_weight",
         "nvme_adminq_poll_period_us", "nvme_ioq_poll_period_us", "io_queue_requests", "delay_cmd_submit",
         "transport_retry_count", "bdev_retry_count", "transport_ack_timeout", "ctrlr_loss_timeout_sec",
         "reconnect_delay_sec", "fast_io_fail_timeout_sec", "disable_auto_failback", "generate_uuids",
         "transport_tos", "nvme_error_stat", "rdma_srq_size", "io_path_stat", "allow_accel_sequence",
         "rdma_max_cq_size", "rdma_cm_event_timeout_ms", "dhchap_digests", "dhchap_dhgroups",
         "rdma_umr_per_io", "tcp_connect_timeout_ms", "enable_flush", "multipath_opts", "retry_count"),
        f"NVMe bdevs come from the {_NVME} plugin, which is not installed: pip install {_NVME}",
        states=_BOTH, provider=_NVME, subsystem="bdev"),
    "bdev_nvme_set_hotplug": Ignored(
        ("enable", "period_us"),
        f"NVMe bdevs come from the {_NVME} plugin, which is not installed: pip install {_NVME}",
        states=RpcState.RUNTIME, required=("enable",), provider=_NVME, subsystem="bdev"),
}

#: Which distribution of this project serves each family of SPDK's methods (a method name, or
#: a prefix ending in "_" for the SPDK methods it begins): what a call answers when that plugin
#: is not installed.  A plugin that is installed but not loaded (disabled, broken) says it
#: itself, in its distribution's ``vhost.provides`` entry points (one per method name);
#: tests/test_plugins.py checks both agree.
DISTRIBUTIONS: dict[str, str] = {
    "bdev_malloc_": "vhost-bdev-malloc", "bdev_null_": "vhost-bdev-malloc",
    "construct_malloc_bdev": "vhost-bdev-malloc", "delete_malloc_bdev": "vhost-bdev-malloc",
    "construct_null_bdev": "vhost-bdev-malloc", "delete_null_bdev": "vhost-bdev-malloc",
    "bdev_aio_": "vhost-bdev-aio", "bdev_aio_get_stats": "vhost-bdev-aio", "construct_aio_bdev": "vhost-bdev-aio",
    "delete_aio_bdev": "vhost-bdev-aio",
    "vhost_create_blk_controller": "vhost-dev-blk", "construct_vhost_blk_controller": "vhost-dev-blk",
    "vhost_create_scsi_controller": "vhost-dev-scsi", "vhost_start_scsi_controller": "vhost-dev-scsi",
    "vhost_scsi_controller_": "vhost-dev-scsi", "construct_vhost_scsi_controller": "vhost-dev-scsi",
    "add_vhost_scsi_lun": "vhost-dev-scsi", "remove_vhost_scsi_dev": "vhost-dev-scsi",
    "remove_vhost_scsi_target": "vhost-dev-scsi",
    "bdev_nvme_": _NVME, "construct_nvme_bdev": _NVME, "delete_nvme_controller": _NVME,
    "get_nvme_controllers": _NVME,
    "bdev_rbd_": "vhost-bdev-rbd", "bdev_rbd_get_stats": "vhost-bdev-rbd",
    "construct_rbd_bdev": "vhost-bdev-rbd", "delete_rbd_bdev": "vhost-bdev-rbd",
}


def family_match(families: dict[str, str], method: str) -> str | None:
    """The value of the longest family of ``families`` that ``method`` belongs to (a family
    ending in "_" holds the SPDK methods it prefixes)."""
    best = None
    for family, value in families.items():
        if method == family or (family.endswith("_") and method.startswith(family) and method in SPDK_METHODS):
            if best is None or len(family) > len(best[0]):
                best = (family, value)
    return best[1] if best else None


#: SPDK methods this target does not implement yet, and what calling one answers.
NOT_YET: dict[str, str] = {}


def ignored_params_class(method: str, spec: Ignored) -> type:
    """An attrs params class taking exactly SPDK's parameter names for ``method``, any value."""
    # attrs wants the required (no default) fields first.
    fields: dict[str, Any] = {name: attrs.field() for name in spec.params if name in spec.required}
    fields.update({name: attrs.field(default=None) for name in spec.params if name not in spec.required})
    return attrs.make_class(f"{method}_params", fields, frozen=True)
