"""bdev_nvme plugin: NVMe controllers as bdevs, one per active namespace (``Nvme0n1``, ...).

Commands with SPDK's names and parameters: ``bdev_nvme_attach_controller`` (old name
``construct_nvme_bdev``), ``bdev_nvme_detach_controller`` (``delete_nvme_controller``),
``bdev_nvme_get_controllers`` (``get_nvme_controllers``), ``bdev_nvme_set_options``,
``bdev_nvme_set_hotplug``.  Transports: NVMe/TCP (``-t tcp``), initiated in C on the
reactors (nvme_tcp.c), and PCIe (``-t pcie``), a userspace driver through VFIO
(nvme_pcie.c, pcie.py).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time
import uuid as uuid_mod
from typing import Any

import attrs
from vhost_core.bdev.interface import Bdev, BdevModule
from vhost_core.bdev.registry import BdevRegistry
from vhost_core.commands import Cli, CommandContext, cli, param, unsupported
from vhost_core.errors import VhostError
from vhost_core.hookspecs import hookimpl
from vhost_core.log import get_logger, notice
from vhost_core.rpc.registry import RpcState

from vhost_bdev_nvme._nvme_native import ffi, lib
from vhost_bdev_nvme.controller import Controller, ControllerError, Namespace, Timeouts, Trid
from vhost_bdev_nvme.pcie import PcieController, normalize_bdf

VHOST_CORE_API = (2,)
MODULE = "nvme"
log = get_logger("bdev_nvme")
_BOTH = RpcState.STARTUP | RpcState.RUNTIME
DEFAULT_PORT = "4420"
#: I/O queue pairs asked of a PCIe controller (one per reactor channel).
IO_QUEUES_DEFAULT = 4
IO_TYPE_BITS = {"read": 1, "write": 2, "flush": 4, "unmap": 8, "write_zeroes": 16}



def _default_hostnqn() -> str:
    for path in ("/etc/nvme/hostnqn",):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text.startswith("nqn."):
                return text
        except OSError:
            pass
    try:
        with open("/etc/machine-id") as f:
            host_uuid = uuid_mod.UUID(f.read().strip())
    except (OSError, ValueError):
        host_uuid = uuid_mod.uuid5(uuid_mod.NAMESPACE_DNS, socket.gethostname())
    return f"nqn.2014-08.org.nvmexpress:uuid:{host_uuid}"


@attrs.frozen
class AttachParams:
    """SPDK's parameters of bdev_nvme_attach_controller (v24.01 to 25.09)."""

    name: str = param(None, "-b", "--name", help="Name of the NVMe controller, prefix for each bdev name")
    trtype: str = param(None, "-t", "--trtype", help="NVMe-oF target trtype: e.g., tcp, pcie")
    traddr: str = param(None, "-a", "--traddr", help="NVMe-oF target address: e.g., an ip address or BDF")
    adrfam: str | None = param(None, "-f", "--adrfam", help="NVMe-oF target adrfam: e.g., ipv4, ipv6")
    trsvcid: str | None = param(None, "-s", "--trsvcid", help="NVMe-oF target trsvcid: e.g., a port number "
                                                              "(default 4420)")
    priority: str | None = unsupported(None, "there is one path per controller here: omit priority",
                                       cli=cli("-p", "--priority", help="transport priority: not supported"))
    subnqn: str | None = param(None, "-n", "--subnqn", help="NVMe-oF target subnqn")
    hostnqn: str | None = param(None, "-q", "--hostnqn", help="NVMe-oF host subnqn")
    hostaddr: str | None = unsupported(None, "the kernel chooses the source address: omit hostaddr",
                                       cli=cli("-i", "--hostaddr", help="host source address: not supported"))
    hostsvcid: str | None = unsupported(None, "the kernel chooses the source port: omit hostsvcid",
                                        cli=cli("-c", "--hostsvcid", help="host source port: not supported"))
    prchk_reftag: bool = unsupported(False, "namespaces with protection information are not served: omit it",
                                     cli=cli("-r", "--prchk-reftag", help="reference tag check: not supported"))
    prchk_guard: bool = unsupported(False, "namespaces with protection information are not served: omit it",
                                    cli=cli("-g", "--prchk-guard", help="guard check: not supported"))
    hdgst: bool = param(False, "-e", "--hdgst", help="Enable TCP header digest")
    ddgst: bool = param(False, "-d", "--ddgst", help="Enable TCP data digest")
    fabrics_connect_timeout_us: int | None = param(None, "--fabrics-timeout",
                                                   help="Fabrics connect timeout in microseconds (default 10 s)")
    multipath: str | None = unsupported(None, "multipath is not implemented: attach each path as its own "
                                              "controller name", accepts=("disable",),
                                        cli=cli("-x", "--multipath", help="multipath: not supported"))
    num_io_queues: int | None = param(None, "--num-io-queues", help="The number of IO queues to request "
                                                                    "during initialization (default 128)")
    ctrlr_loss_timeout_sec: int | None = param(None, "-l", "--ctrlr-loss-timeout-sec",
                                               help="Time to wait until ctrlr is reconnected before deleting "
                                                    "ctrlr.  -1 means infinite reconnect retries; 0 means no "
                                                    "reconnect")
    reconnect_delay_sec: int | None = param(None, "-o", "--reconnect-delay-sec",
                                            help="Time to delay a reconnect retry")
    fast_io_fail_timeout_sec: int | None = param(None, "-u", "--fast-io-fail-timeout-sec",
                                                 help="Time to wait until ctrlr is reconnected before failing "
                                                      "I/O to ctrlr (0: I/O waits until the controller is "
                                                      "deleted)")
    psk: str | None = unsupported(None, "NVMe/TCP TLS is not implemented: attach without psk",
                                  cli=cli("-k", "--psk", help="TLS PSK: not supported"))
    max_bdevs: int | None = param(None, "-m", "--max-bdevs", help="The size of the name array for newly created "
                                                            "bdevs (default 128)")
    dhchap_key: str | None = unsupported(None, "DH-HMAC-CHAP authentication is not implemented: attach "
                                               "without it", cli=cli("--dhchap-key", help="not supported"))
    dhchap_ctrlr_key: str | None = unsupported(None, "DH-HMAC-CHAP authentication is not implemented: attach "
                                                     "without it", cli=cli("--dhchap-ctrlr-key",
                                                                           help="not supported"))
    allow_unrecognized_csi: bool = unsupported(False, "only NVM command set namespaces are served: omit it",
                                               cli=cli("-U", "--allow-unrecognized-csi", help="not supported"))
    multipath_opts: dict[str, Any] | None = unsupported(None, "multipath is not implemented: omit --policy, "
                                                              "--selector and --min-io", accepts=({},),
                                                        cli=cli(hidden=True))
    disable_sq_flow_control: bool = unsupported(False, "submission queue flow control stays on: omit it",
                                                cli=cli("--disable-sq-flow-control", help="not supported"))


@attrs.frozen
class ResetParams:
    name: str = param(help="Name of the NVMe controller")
    cntlid: int | None = param(None, "-c", "--cntlid", help="NVMe controller ID (its only one)")


@attrs.frozen
class DetachParams:
    name: str = param(help="Name of the NVMe controller")
    trtype: str | None = param(None, "-t", "--trtype", help="NVMe-oF target trtype")
    traddr: str | None = param(None, "-a", "--traddr", help="NVMe-oF target address")
    adrfam: str | None = param(None, "-f", "--adrfam", help="NVMe-oF target adrfam")
    trsvcid: str | None = param(None, "-s", "--trsvcid", help="NVMe-oF target trsvcid")
    subnqn: str | None = param(None, "-n", "--subnqn", help="NVMe-oF target subnqn")
    hostaddr: str | None = param(None, "-i", "--hostaddr", help="NVMe-oF host address")
    hostsvcid: str | None = param(None, "-c", "--hostsvcid", help="NVMe-oF host svcid")


@attrs.frozen
class GetParams:
    name: str | None = param(None, "-n", "--name", help="Name of the NVMe controller (default: all)")


_HONOURED_OPTIONS = ("action_on_timeout", "timeout_us", "keep_alive_timeout_ms", "ctrlr_loss_timeout_sec", "reconnect_delay_sec",
                     "fast_io_fail_timeout_sec", "tcp_connect_timeout_ms")
_OPTION_DEFAULTS = {"action_on_timeout": "abort", "timeout_us": 0, "keep_alive_timeout_ms": 10000, "ctrlr_loss_timeout_sec": 0, "reconnect_delay_sec": 0,
                    "fast_io_fail_timeout_sec": 0, "tcp_connect_timeout_ms": 0}


@attrs.frozen
class SetOptionsParams:
    """SPDK's bdev_nvme_set_options parameters: the ones about timeouts are honoured (defaults of
    every later attach); the others (queues, retries, polling periods, RDMA) are accepted with a
    NOTICE, since SPDK's save_config writes them all."""

    action_on_timeout: str | None = param(None, help="PCIe: on a command timeout, abort (an NVMe Abort; a "
                                                     "controller reset if it fails; the default), reset or "
                                                     "none, on controllers attached later")
    timeout_us: int | None = param(None, help="PCIe: a command unanswered this long fails its request "
                                             "(microseconds; 0: the default, 30 s) on controllers attached "
                                             "later")
    timeout_admin_us: Any = None
    keep_alive_timeout_ms: int | None = param(None, help="Keep Alive timeout of new controllers (ms)")
    arbitration_burst: Any = None
    low_priority_weight: Any = None
    medium_priority_weight: Any = None
    high_priority_weight: Any = None
    nvme_adminq_poll_period_us: Any = None
    nvme_ioq_poll_period_us: Any = None
    io_queue_requests: Any = None
    delay_cmd_submit: Any = None
    transport_retry_count: Any = None
    bdev_retry_count: Any = None
    transport_ack_timeout: Any = None
    ctrlr_loss_timeout_sec: int | None = param(None, help="default ctrlr_loss_timeout_sec of attaches")
    reconnect_delay_sec: int | None = param(None, help="default reconnect_delay_sec of attaches")
    fast_io_fail_timeout_sec: int | None = param(None, help="default fast_io_fail_timeout_sec of attaches")
    disable_auto_failback: Any = None
    generate_uuids: Any = None
    transport_tos: Any = None
    nvme_error_stat: Any = None
    rdma_srq_size: Any = None
    io_path_stat: Any = None
    allow_accel_sequence: Any = None
    rdma_max_cq_size: Any = None
    rdma_cm_event_timeout_ms: Any = None
    dhchap_digests: Any = None
    dhchap_dhgroups: Any = None
    rdma_umr_per_io: Any = None
    tcp_connect_timeout_ms: int | None = param(None, help="TCP connect timeout of new controllers (ms)")
    enable_flush: Any = None
    multipath_opts: Any = None
    retry_count: Any = None


@attrs.frozen
class HotplugParams:
    enable: bool = param(attrs.NOTHING, "--hotplug", negatable=True, help="Enable hotplug (PCIe only)")
    period_us: int | None = param(None, "-r", "--period-us", help="How often the hotplug is processed")


class NvmeModule(BdevModule):
    """The NVMe bdev module: attached controllers, by name, and the options of later attaches."""

    def __init__(self) -> None:
        super().__init__(MODULE)
        self.lock = threading.Lock()
        self.controllers: dict[str, Controller] = {}
        self.attaching: set[str] = set()
        self.options = Timeouts()
        self.options_set: dict[str, Any] = {}
        #: bdev_nvme_set_options timeout_us: PCIe commands unanswered this long fail (0: 30 s).
        self.io_timeout_us = 0
        #: bdev_nvme_set_options action_on_timeout of later PCIe attaches: abort, reset or none.
        self.action_on_timeout = "abort"
        self.hostid = uuid_mod.uuid4().bytes
        self.hostnqn = _default_hostnqn()
        self.bdevs: BdevRegistry | None = None

    def config_json(self, bdevs: list[Bdev]) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = []
        # Only what means something here, and differs from the defaults.
        changed = {k: v for k, v in self.options_set.items()
                   if k in _HONOURED_OPTIONS and v != _OPTION_DEFAULTS.get(k)}
        if changed:
            calls.append({"method": "bdev_nvme_set_options", "params": changed})
        with self.lock:
            ctrlrs = list(self.controllers.values())
        for c in ctrlrs:
            t = c.trid
            if isinstance(c, PcieController):
                calls.append({"method": "bdev_nvme_attach_controller",
                              "params": {"name": c.name, "trtype": "pcie", "traddr": c.bdf,
                                         "num_io_queues": c.num_io_queues}})
                continue
            p: dict[str, Any] = {"name": c.name, "trtype": t.trtype.lower(), "traddr": t.traddr,
                                 "adrfam": t.adrfam.lower(), "trsvcid": t.trsvcid, "subnqn": t.subnqn,
                                 "hostnqn": c.hostnqn, "hdgst": c.hdgst, "ddgst": c.ddgst,
                                 "num_io_queues": c.num_io_queues,
                                 "ctrlr_loss_timeout_sec": c.timeouts.ctrlr_loss_timeout_sec,
                                 "reconnect_delay_sec": c.timeouts.reconnect_delay_sec,
                                 "fast_io_fail_timeout_sec": c.timeouts.fast_io_fail_timeout_sec}
            calls.append({"method": "bdev_nvme_attach_controller", "params": p})
        return calls

    def fini(self) -> None:
        with self.lock:
            ctrlrs = list(self.controllers.values())
            self.controllers.clear()
        for c in ctrlrs:
            c.close()


# --------------------------------------------------------------------------
# attach
# --------------------------------------------------------------------------


def _resolve(method: str, traddr: str, adrfam: str | None) -> tuple[int, str, str]:
    """(family, numeric address, SPDK's adrfam spelling)."""
    fam = (adrfam or "").lower()
    if fam and fam not in ("ipv4", "ipv6"):
        raise VhostError(errno.EINVAL, f"{method}: adrfam '{adrfam}' is not served over TCP: use ipv4 or ipv6")
    try:
        ip = ipaddress.ip_address(traddr)
    except ValueError:
        family = socket.AF_INET6 if fam == "ipv6" else socket.AF_INET
        try:
            infos = socket.getaddrinfo(traddr, None, family, socket.SOCK_STREAM)
        except OSError as exc:
            raise VhostError(errno.EINVAL, f"{method}: traddr '{traddr}' is neither an IP address nor a host "
                                          f"name this host can resolve ({exc.strerror}): give the target's "
                                          f"IP address") from None
        return family, infos[0][4][0], "IPv6" if family == socket.AF_INET6 else "IPv4"
    if fam and (fam == "ipv6") != (ip.version == 6):
        raise VhostError(errno.EINVAL, f"{method}: traddr {traddr} is an IPv{ip.version} address but adrfam is "
                                      f"{adrfam}: fix adrfam (-f) or omit it")
    if ip.version == 6:
        return socket.AF_INET6, str(ip), "IPv6"
    return socket.AF_INET, str(ip), "IPv4"


def _timeouts(method: str, module: NvmeModule, p: AttachParams) -> Timeouts:
    o = module.options
    loss = o.ctrlr_loss_timeout_sec if p.ctrlr_loss_timeout_sec is None else p.ctrlr_loss_timeout_sec
    delay = o.reconnect_delay_sec if p.reconnect_delay_sec is None else p.reconnect_delay_sec
    fast = o.fast_io_fail_timeout_sec if p.fast_io_fail_timeout_sec is None else p.fast_io_fail_timeout_sec
    # SPDK's rules (bdev_nvme_check_io_error_resiliency_params), with its wording's meaning.
    if loss < -1:
        raise VhostError(errno.EINVAL, f"{method}: ctrlr_loss_timeout_sec must be -1 (retry forever), 0 (no "
                                      f"reconnect) or a number of seconds, got {loss}")
    if delay < 0 or fast < 0:
        raise VhostError(errno.EINVAL, f"{method}: reconnect_delay_sec and fast_io_fail_timeout_sec cannot be "
                                      f"negative")
    if loss == 0 and (delay or fast):
        raise VhostError(errno.EINVAL, f"{method}: reconnect_delay_sec and fast_io_fail_timeout_sec need a "
                                      f"non-zero ctrlr_loss_timeout_sec (0 means: no reconnect)")
    if loss != 0 and delay == 0:
        raise VhostError(errno.EINVAL, f"{method}: ctrlr_loss_timeout_sec={loss} needs reconnect_delay_sec > 0 "
                                      f"(how often to retry)")
    if loss > 0 and delay > loss:
        raise VhostError(errno.EINVAL, f"{method}: reconnect_delay_sec ({delay}) must not exceed "
                                      f"ctrlr_loss_timeout_sec ({loss})")
    if fast and (fast < delay or (loss > 0 and fast > loss)):
        raise VhostError(errno.EINVAL, f"{method}: fast_io_fail_timeout_sec ({fast}) must lie between "
                                      f"reconnect_delay_sec ({delay}) and ctrlr_loss_timeout_sec ({loss})")
    connect_ms = o.connect_timeout_ms
    if p.fabrics_connect_timeout_us:
        connect_ms = max(1, p.fabrics_connect_timeout_us // 1000)
    return Timeouts(loss, delay, fast, o.keep_alive_timeout_ms, connect_ms)


def _attach(ctx: CommandContext, module: NvmeModule, method: str, p: AttachParams) -> list[str]:
    if not p.name or not p.trtype or not p.traddr:
        missing = [n for n in ("name", "trtype", "traddr") if not getattr(p, n)]
        raise VhostError(errno.EINVAL, f"{method}: {', '.join(missing)} required (e.g. -b Nvme0 -t tcp -a "
                                      f"192.0.2.10 -s 4420 -n nqn.2016-06.io.spdk:cnode1)")
    trtype = p.trtype.lower()
    if trtype == "pcie":
        return _attach_pcie(ctx, module, method, p)
    if trtype != "tcp":
        raise VhostError(errno.ENOTSUP, f"{method}: trtype '{p.trtype}' is not served (RDMA and FC are not "
                                      f"implemented): use -t tcp or -t pcie")
    if not p.subnqn:
        raise VhostError(errno.EINVAL, f"{method}: subnqn is required for -t tcp: name the target's subsystem "
                                      f"(-n nqn....; `nvme discover -t tcp -a {p.traddr}` lists them)")
    for nqn, what in ((p.subnqn, "subnqn"), (p.hostnqn, "hostnqn")):
        if nqn is not None and (len(nqn.encode()) > 223 or not nqn.startswith("nqn.")):
            raise VhostError(errno.EINVAL, f"{method}: {what} '{nqn}' is not an NQN (nqn.yyyy-mm.reverse-domain:"
                                          f"name, at most 223 bytes)")
    trsvcid = p.trsvcid or DEFAULT_PORT
    try:
        port = int(trsvcid)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise VhostError(errno.EINVAL, f"{method}: trsvcid '{trsvcid}' is not a TCP port number (4420 is "
                                      f"NVMe/TCP's)") from None
    nq = 128 if p.num_io_queues is None else p.num_io_queues
    if not 1 <= nq <= 65535:
        raise VhostError(errno.EINVAL, f"{method}: num_io_queues must be 1..65535, got {nq}")
    timeouts = _timeouts(method, module, p)
    family, numeric, adrfam = _resolve(method, p.traddr, p.adrfam)
    trid = Trid("TCP", adrfam, p.traddr, str(port), p.subnqn)
    with module.lock:
        if p.name in module.controllers or p.name in module.attaching:
            raise VhostError(errno.EEXIST, f"{method}: NVMe controller '{p.name}' already exists: pick another "
                                          f"name, or bdev_nvme_detach_controller {p.name} first")
        for other in module.controllers.values():
            if other.trid == trid:
                raise VhostError(errno.EEXIST, f"{method}: {trid} is already attached as '{other.name}': use "
                                              f"its bdevs, or detach it first")
        module.attaching.add(p.name)
    try:
        c = Controller(p.name, trid, family, numeric, p.hostnqn or module.hostnqn, module.hostid, p.hdgst,
                       p.ddgst, nq, timeouts)
        try:
            _off_the_lock(ctx.bdevs, lambda: c.bring_up(time.monotonic() + timeouts.connect_timeout_ms / 1000))
        except ControllerError as exc:
            c.close()
            raise VhostError(exc.errno, f"{method}: {p.name}: {exc.message}") from None
        names = _register(ctx, module, method, p, c, trid)
    finally:
        with module.lock:
            module.attaching.discard(p.name)
    d = c.cdata
    notice(log, "%s: attached %s: %s (serial %s, firmware %s, NVMe %s), cntlid %d, %d I/O queues, %s%s",
           p.name, trid, d["mn"], d["sn"], d["fr"], c.version, c.cntlid, c.granted_queues,
           ", ".join(names) or "no namespaces",
           "" if not (p.hdgst or p.ddgst) else
           f", {'header' if p.hdgst else ''}{' and ' if p.hdgst and p.ddgst else ''}"
           f"{'data' if p.ddgst else ''} digest")
    return names


def _register(ctx: CommandContext, module: NvmeModule, method: str, p: AttachParams, c: Controller,
              where: str) -> list[str]:
    """A controller that came up (any transport): its namespaces become bdevs, it joins
    the module and its loss handling starts.  The bdev names."""
    max_bdevs = 128 if p.max_bdevs is None else p.max_bdevs
    if len(c.namespaces) > max_bdevs:
        c.close()
        raise VhostError(errno.EINVAL, f"{method}: {p.name} has {len(c.namespaces)} namespaces, more than "
                                      f"max_bdevs={max_bdevs}: raise max_bdevs")
    if not c.namespaces:
        notice(log, "%s: controller %s has no active namespace yet", p.name, where)
    names = _add_bdevs(ctx.bdevs, module, c)
    c.up()
    with module.lock:
        module.controllers[p.name] = c
    module.bdevs = ctx.bdevs
    c.start(lambda ctrlr, why: _lost(module, ctrlr, why))
    return names


def _attach_pcie(ctx: CommandContext, module: NvmeModule, method: str, p: AttachParams) -> list[str]:
    bdf = normalize_bdf(p.traddr)
    if bdf is None:
        raise VhostError(errno.EINVAL, f"{method}: traddr '{p.traddr}' is not a PCI address: give the "
                                      f"function as domain:bus:device.function, e.g. -a 0000:01:00.0 "
                                      f"(`lspci -D -d ::0108` lists the NVMe controllers)")
    nq = IO_QUEUES_DEFAULT if p.num_io_queues is None else p.num_io_queues
    if not 1 <= nq <= 65535:
        raise VhostError(errno.EINVAL, f"{method}: num_io_queues must be 1..65535, got {nq}")
    with module.lock:
        if p.name in module.controllers or p.name in module.attaching:
            raise VhostError(errno.EEXIST, f"{method}: NVMe controller '{p.name}' already exists: pick another "
                                          f"name, or bdev_nvme_detach_controller {p.name} first")
        for other in module.controllers.values():
            if isinstance(other, PcieController) and other.bdf == bdf:
                raise VhostError(errno.EEXIST, f"{method}: PCI function {bdf} is already attached as "
                                              f"'{other.name}': use its bdevs "
                                              f"({', '.join(n.bdev_name for n in other.namespaces) or 'none'}), "
                                              f"or bdev_nvme_detach_controller {other.name} first")
        module.attaching.add(p.name)
    try:
        c = PcieController(p.name, bdf, nq, ctx.memory, io_timeout_ms=max(1, module.io_timeout_us // 1000)
                           if module.io_timeout_us else 0, action_on_timeout=module.action_on_timeout)
        try:
            _off_the_lock(ctx.bdevs, lambda: c.bring_up(time.monotonic() + 30))
        except ControllerError as exc:
            raise VhostError(exc.errno, f"{method}: {p.name}: {exc.message}") from None
        names = _register(ctx, module, method, p, c, bdf)
    finally:
        with module.lock:
            module.attaching.discard(p.name)
    d = c.cdata
    notice(log, "%s: attached PCIe %s: %s (serial %s, firmware %s, NVMe %s), %d I/O queues, %s", p.name, bdf,
           d["mn"], d["sn"], d["fr"], c.version, c.granted_queues, ", ".join(names) or "no namespaces")
    return names


def _off_the_lock(bdevs: BdevRegistry, fn: Any) -> Any:
    """Run ``fn`` (network waits: connect, Identify) on a thread of its own while this command
    waits with the control lock released, so that other RPCs are answered meanwhile."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:    # re-raised in the command's thread
            out["error"] = exc

    t = threading.Thread(target=run, name="nvme_attach", daemon=True)
    t.start()
    while t.is_alive():
        bdevs.wait_unlocked(0.02)
    if "error" in out:
        raise out["error"]
    return out.get("result")


def _add_bdevs(bdevs: BdevRegistry, module: NvmeModule, c: Controller) -> list[str]:
    added: list[str] = []
    try:
        for ns in c.namespaces:
            added.append(_add_bdev(bdevs, c, ns))
    except BaseException:
        for name in reversed(added):
            try:
                bdevs.delete(name, module=MODULE)
            except VhostError:
                pass
        c.close()
        raise
    return added


def _add_bdev(bdevs: BdevRegistry, c: Controller, ns: Namespace) -> str:
    bits = sum(IO_TYPE_BITS[t] for t in ns.io_types)
    native = c.ns_new(ns, bits)
    if native is None:
        raise VhostError(errno.ENOMEM, f"{c.name}: out of memory creating bdev {ns.bdev_name}")
    freed = [False]

    def destruct() -> None:
        if not freed[0]:
            freed[0] = True
            c.ns_free(native)

    info: dict[str, Any] = {"trid": c.trid.to_json(), "ctrlr_data": c.ctrlr_data_json(), "vs": {"nvme_version": c.version},
            "ns_data": {"id": ns.nsid, "can_share": bool(c.cdata.get("cmic", 0) & 2)},
            "security": {"opal": False}}
    if isinstance(c, PcieController):
        info = {"pci_address": c.bdf, **info}
    kw: dict[str, Any] = {}
    if ns.uuid:
        kw["uuid"] = ns.uuid
    bdev = Bdev(name=ns.bdev_name, module=MODULE, product_name="NVMe disk", block_size=ns.block_size,
                num_blocks=ns.num_blocks, native=c.native_address(native), destruct=destruct,
                io_types=ns.io_types, driver_specific={"nvme": [info], "mp_policy": "active_passive"}, **kw)
    bdevs.add(bdev)
    return ns.bdev_name


def _delete_bdevs(bdevs: BdevRegistry, c: Controller) -> None:
    for ns in c.namespaces:
        if ns.bdev_name in bdevs:
            try:
                bdevs.delete(ns.bdev_name, module=MODULE)
            except VhostError as exc:
                log.error("%s: cannot delete bdev %s: %s", c.name, ns.bdev_name, exc.message)


def _lost(module: NvmeModule, c: Controller, why: str) -> None:
    """ctrlr_loss_timeout_sec passed (controller thread): hot-remove its namespaces, forget it."""
    bdevs = module.bdevs
    if bdevs is None:
        return
    gone = ", ".join(n.bdev_name for n in c.namespaces) or "it"
    if isinstance(c, PcieController):
        log.error("%s: PCIe controller %s %s: removing %s", c.name, c.bdf, why, gone)
    else:
        log.error("%s: controller %s did not come back within ctrlr_loss_timeout_sec (%d s): removing %s",
                  c.name, c.trid, c.timeouts.ctrlr_loss_timeout_sec, gone)
    with bdevs.lock:
        with module.lock:
            if module.controllers.get(c.name) is not c:
                return
            del module.controllers[c.name]
        _delete_bdevs(bdevs, c)
    threading.Thread(target=c.close, name=f"nvme_{c.name}_close", daemon=True).start()


def _detach(ctx: CommandContext, module: NvmeModule, method: str, p: DetachParams) -> bool:
    with module.lock:
        c = module.controllers.get(p.name)
        if c is None:
            known = ", ".join(sorted(module.controllers)) or "none"
            raise VhostError(errno.ENODEV, f"{method}: NVMe controller '{p.name}' does not exist (attached: "
                                          f"{known})")
        t = c.trid
        for field, want in (("trtype", p.trtype), ("traddr", p.traddr), ("adrfam", p.adrfam),
                            ("trsvcid", p.trsvcid), ("subnqn", p.subnqn)):
            if want is not None and str(want).lower() != str(getattr(t, field)).lower():
                raise VhostError(errno.ENODEV, f"{method}: controller '{p.name}' has no path with {field} "
                                              f"{want} (its path: {t})")
        del module.controllers[p.name]
    c.stop(ctx.bdevs.wait_unlocked)
    c.fail_io()
    _delete_bdevs(ctx.bdevs, c)
    c.close()
    notice(log, "%s: detached %s", p.name, c.trid)
    return True


def _controllers_json(module: NvmeModule, name: str | None) -> list[dict[str, Any]]:
    with module.lock:
        if name is not None and name not in module.controllers:
            raise VhostError(errno.ENODEV, f"bdev_nvme_get_controllers: NVMe controller '{name}' does not exist")
        ctrlrs = [module.controllers[name]] if name is not None else list(module.controllers.values())
    out = []
    for c in ctrlrs:
        out.append({"name": c.name, "ctrlrs": [{
            "state": c.state, "trid": c.trid.to_json(), "cntlid": c.cntlid,
            "host": {"nqn": c.hostnqn, "addr": "", "svcid": ""},
            "hdgst": c.hdgst, "ddgst": c.ddgst, "io_queues": c.granted_queues,
            "ctrlr_loss_timeout_sec": c.timeouts.ctrlr_loss_timeout_sec,
            "reconnect_delay_sec": c.timeouts.reconnect_delay_sec,
            "fast_io_fail_timeout_sec": c.timeouts.fast_io_fail_timeout_sec,
            "namespaces": [n.bdev_name for n in c.namespaces],
            "stats": c.stats()}]})
    return out


def _set_options(module: NvmeModule, p: SetOptionsParams) -> bool:
    given = {k: v for k, v in attrs.asdict(p).items() if v is not None}
    o = module.options
    new = Timeouts(
        o.ctrlr_loss_timeout_sec if p.ctrlr_loss_timeout_sec is None else p.ctrlr_loss_timeout_sec,
        o.reconnect_delay_sec if p.reconnect_delay_sec is None else p.reconnect_delay_sec,
        o.fast_io_fail_timeout_sec if p.fast_io_fail_timeout_sec is None else p.fast_io_fail_timeout_sec,
        o.keep_alive_timeout_ms if p.keep_alive_timeout_ms is None else p.keep_alive_timeout_ms,
        o.connect_timeout_ms if not p.tcp_connect_timeout_ms else p.tcp_connect_timeout_ms)
    if new.keep_alive_timeout_ms < 0 or new.connect_timeout_ms < 0:
        raise VhostError(errno.EINVAL, "bdev_nvme_set_options: keep_alive_timeout_ms and tcp_connect_timeout_ms "
                                       "cannot be negative")
    if p.action_on_timeout is not None:
        if p.action_on_timeout not in ("none", "abort", "reset"):
            raise VhostError(errno.EINVAL, f"bdev_nvme_set_options: action_on_timeout must be none, abort or "
                                           f"reset, not {p.action_on_timeout!r}")
        module.action_on_timeout = p.action_on_timeout
    if p.timeout_us is not None:
        if p.timeout_us < 0:
            raise VhostError(errno.EINVAL, "bdev_nvme_set_options: timeout_us cannot be negative")
        module.io_timeout_us = p.timeout_us
    module.options = new
    module.options_set.update(given)
    ignored = [k for k in given if k not in _HONOURED_OPTIONS]
    if ignored:
        shown = ", ".join(ignored[:6]) + (f", ... ({len(ignored)} options)" if len(ignored) > 6 else "")
        notice(log, "bdev_nvme_set_options: ignored %s: this target has no such knob (its NVMe/TCP initiator "
                    "polls on the reactors, retries by reconnecting)", shown)
    return True


# --------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------


def _print_array(names: list[str]) -> None:
    from vhost_core.rpc.cli import print_array

    print_array(names)


@hookimpl
def vhost_register_bdev_modules(registry) -> None:
    registry.add(NvmeModule())


@hookimpl
def vhost_register_commands(registry) -> None:
    @registry.command("bdev_nvme_attach_controller", params=AttachParams, aliases=("construct_nvme_bdev",),
                      blocking=True, cli=Cli(prints=_print_array))
    def bdev_nvme_attach_controller(ctx: CommandContext, p: AttachParams) -> list[str]:
        """Add bdevs with nvme backend: one per active namespace of the controller."""
        return _attach(ctx, ctx.bdev_module(MODULE), "bdev_nvme_attach_controller", p)

    @registry.command("bdev_nvme_detach_controller", params=DetachParams, aliases=("delete_nvme_controller",),
                      blocking=True, cli=Cli(prints=False))
    def bdev_nvme_detach_controller(ctx: CommandContext, p: DetachParams) -> bool:
        """Detach an NVMe controller and delete any associated bdevs."""
        return _detach(ctx, ctx.bdev_module(MODULE), "bdev_nvme_detach_controller", p)

    @registry.command("bdev_nvme_reset_controller", params=ResetParams, blocking=True, cli=Cli(prints=False))
    def bdev_nvme_reset_controller(ctx: CommandContext, p: ResetParams) -> bool:
        """Reset an NVMe controller (PCIe): in-flight I/O fails, the queues are created again."""
        module = ctx.bdev_module(MODULE)
        with module.lock:
            c = module.controllers.get(p.name)
        if not isinstance(c, PcieController):
            raise VhostError(errno.ENODEV if c is None else errno.ENOTSUP,
                             f"bdev_nvme_reset_controller: no PCIe NVMe controller '{p.name}' (NVMe/TCP "
                             f"controllers reset by reconnecting)")
        if p.cntlid is not None and p.cntlid != c.cntlid:
            raise VhostError(errno.ENODEV, f"bdev_nvme_reset_controller: '{p.name}' has no controller "
                                          f"{p.cntlid} (its cntlid is {c.cntlid})")
        if not c.reset():
            raise VhostError(errno.EIO, f"bdev_nvme_reset_controller: the reset of '{p.name}' failed: its "
                                        f"namespaces were hot-removed")
        return True

    @registry.command("bdev_nvme_get_controllers", params=GetParams, aliases=("get_nvme_controllers",))
    def bdev_nvme_get_controllers(ctx: CommandContext, p: GetParams) -> list[dict[str, Any]]:
        """Display current NVMe controllers list or required NVMe controller."""
        return _controllers_json(ctx.bdev_module(MODULE), p.name)

    @registry.command("bdev_nvme_set_options", params=SetOptionsParams, states=_BOTH)
    def bdev_nvme_set_options(ctx: CommandContext, p: SetOptionsParams) -> bool:
        """Set options for the bdev nvme type: the timeouts of later attaches."""
        return _set_options(ctx.bdev_module(MODULE), p)

    @registry.command("bdev_nvme_set_hotplug", params=HotplugParams,
                      cli=Cli(prints=False))
    def bdev_nvme_set_hotplug(ctx: CommandContext, p: HotplugParams) -> bool:
        """Set hotplug options for bdev nvme type (PCIe only: nothing to watch here yet)."""
        notice(log, "bdev_nvme_set_hotplug enable=%s: ignored%s: an attached PCIe controller's removal is "
                    "always noticed (the VFIO request interrupt), new ones are attached by RPC; NVMe/TCP "
                    "controllers are watched by Keep Alive",
               "true" if p.enable else "false", " period_us" if p.period_us is not None else "")
        return True
