"""One attached NVMe/TCP controller: bring-up on the admin queue, Keep Alive, loss and reconnect.

The admin queue is driven from Python through the native initiator (each call waits in
C, without the GIL, at most its timeout); the I/O queues belong to the reactors.  A
controller's own thread sends Keep Alive, notices a lost connection, reconnects every
``reconnect_delay_sec``, fails I/O after ``fast_io_fail_timeout_sec`` and hot-removes the
namespaces after ``ctrlr_loss_timeout_sec``.
"""

from __future__ import annotations

import errno
import struct
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable
from typing import Any

import attrs
from vhost_core.errors import VhostError
from vhost_core.log import get_logger, notice

from vhost_bdev_nvme._nvme_native import ffi, lib

log = get_logger("bdev_nvme")

#: Depth of each I/O queue (commands in flight per reactor channel).
IO_QUEUE_DEPTH = 128
#: How long each admin command may take once connected.
ADMIN_TIMEOUT_MS = 10000
#: I/O queue losses and failed requests are logged at most this often (the first at once).
ERROR_REPORT_S = 10.0

# Fabrics command types and properties.
FCTYPE_PROP_SET, FCTYPE_PROP_GET = 0x00, 0x04
PROP_CAP, PROP_VS, PROP_CC, PROP_CSTS = 0x0, 0x8, 0x14, 0x1C
# Admin opcodes.
OPC_IDENTIFY, OPC_SET_FEATURES, OPC_KEEP_ALIVE = 0x06, 0x09, 0x18
FEAT_NUM_QUEUES = 0x07


@attrs.frozen
class Trid:
    """SPDK's transport ID of a controller."""

    trtype: str
    adrfam: str
    traddr: str
    trsvcid: str
    subnqn: str

    def to_json(self) -> dict[str, str]:
        return {"trtype": self.trtype, "adrfam": self.adrfam, "traddr": self.traddr,
                "trsvcid": self.trsvcid, "subnqn": self.subnqn}

    def __str__(self) -> str:
        return f"{self.trtype} {self.traddr}:{self.trsvcid} {self.subnqn}"


@attrs.frozen
class Timeouts:
    ctrlr_loss_timeout_sec: int = 0
    reconnect_delay_sec: int = 0
    fast_io_fail_timeout_sec: int = 0
    keep_alive_timeout_ms: int = 10000
    connect_timeout_ms: int = 10000


@attrs.define(eq=False)
class Namespace:
    nsid: int
    bdev_name: str
    block_size: int
    num_blocks: int
    uuid: str | None
    io_types: frozenset[str]


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip(" \0")


def status_text(status: int) -> str:
    sct, sc = (status >> 8) & 7, status & 0xFF
    names = {(0, 0x02): "Invalid Field in Command", (0, 0x0B): "Invalid Namespace or Format",
             (0, 0x80): "LBA Out of Range", (1, 0x80): "Connect Incompatible Format",
             (1, 0x81): "Connect Controller Busy", (1, 0x82): "Connect Invalid Parameters",
             (1, 0x83): "Connect Restart Discovery", (1, 0x84): "Connect Invalid Host"}
    return f"{names.get((sct, sc), 'status')} (SCT {sct:#x} SC {sc:#04x})"


class ControllerError(VhostError):
    pass


class Controller:
    """An NVMe/TCP controller and its namespaces' bdevs."""

    def _init_state(self, name: str, trid: Trid, hostnqn: str, hdgst: bool, ddgst: bool, num_io_queues: int,
                    timeouts: Timeouts) -> None:
        """What every transport's controller keeps before it is brought up."""
        self.name = name
        self.trid = trid
        self.hostnqn = hostnqn
        self.hdgst = hdgst
        self.ddgst = ddgst
        self.num_io_queues = num_io_queues
        self.timeouts = timeouts
        self.state = "connecting"
        self.cntlid = 0
        self.cdata: dict[str, Any] = {}
        self.version = ""
        self.granted_queues = 0
        self.namespaces: list[Namespace] = []
        self.admin_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_lost: Callable[[Controller, str], None] | None = None

    def __init__(self, name: str, trid: Trid, family: int, numeric_addr: str, hostnqn: str, hostid: bytes,
                 hdgst: bool, ddgst: bool, num_io_queues: int, timeouts: Timeouts) -> None:
        self._init_state(name, trid, hostnqn, hdgst, ddgst, num_io_queues, timeouts)
        self.native = lib.nvt_ctrlr_new(numeric_addr.encode(), family, int(trid.trsvcid), trid.subnqn.encode(),
                                        hostnqn.encode(), hostid, int(hdgst), int(ddgst),
                                        timeouts.keep_alive_timeout_ms)
        if self.native == ffi.NULL:
            raise ControllerError(errno.ENOMEM, f"{name}: cannot set up the controller (out of memory)")
        self._freed = False

    # ------------------------------------------------------------ admin commands

    def _admin_native(self, sqe: bytes, cbuf: Any, length: int, to_ctrlr: int, timeout_ms: int, cqe: Any,
                      err: Any, err_len: int) -> int:
        """One admin command through the transport's native call (0 or -errno)."""
        return lib.nvt_admin_cmd(self.native, sqe, cbuf, length, to_ctrlr, timeout_ms, cqe, err, err_len)

    def _admin(self, sqe: bytearray, buf: Any = None, to_ctrlr: bool = False, timeout_ms: int = ADMIN_TIMEOUT_MS
               ) -> bytes:
        cqe = ffi.new("uint8_t[16]")
        err = ffi.new("char[240]")
        length = len(buf) if buf is not None else 0
        cbuf = ffi.from_buffer(buf) if buf is not None else ffi.NULL
        rc = self._admin_native(bytes(sqe), cbuf, length, int(to_ctrlr), timeout_ms, cqe, err, 240)
        out = bytes(ffi.buffer(cqe, 16))
        if rc == -errno.EREMOTEIO:
            status = struct.unpack_from("<H", out, 14)[0] >> 1
            raise ControllerError(errno.EIO, f"admin command {sqe[0]:#04x} failed: {status_text(status)}")
        if rc:
            raise ControllerError(-rc, ffi.string(err).decode(errors="replace"))
        return out

    def _prop_get(self, offset: int, size8: bool) -> int:
        sqe = bytearray(64)
        sqe[0], sqe[4] = 0x7F, FCTYPE_PROP_GET
        sqe[40] = 1 if size8 else 0
        struct.pack_into("<I", sqe, 44, offset)
        cqe = self._admin(sqe)
        return struct.unpack_from("<Q" if size8 else "<I", cqe, 0)[0]

    def _prop_set(self, offset: int, value: int) -> None:
        sqe = bytearray(64)
        sqe[0], sqe[4] = 0x7F, FCTYPE_PROP_SET
        struct.pack_into("<I", sqe, 44, offset)
        struct.pack_into("<Q", sqe, 48, value)
        self._admin(sqe)

    def _identify(self, cns: int, nsid: int = 0) -> bytearray:
        buf = bytearray(4096)
        sqe = bytearray(64)
        sqe[0] = OPC_IDENTIFY
        struct.pack_into("<I", sqe, 4, nsid)
        struct.pack_into("<I", sqe, 40, cns)
        self._admin(sqe, buf)
        return buf

    def keep_alive(self) -> None:
        sqe = bytearray(64)
        sqe[0] = OPC_KEEP_ALIVE
        self._admin(sqe, timeout_ms=self.timeouts.keep_alive_timeout_ms)

    # ------------------------------------------------------------ bring-up

    def _connect_admin(self, timeout_ms: int) -> None:
        err = ffi.new("char[200]")
        rc = lib.nvt_admin_connect(self.native, timeout_ms, err, 200)
        if rc >= 0:
            self.cntlid = rc
            return
        why = ffi.string(err).decode(errors="replace")
        t = self.trid
        if rc == -errno.EREMOTEIO:
            st, res = ffi.new("uint16_t *"), ffi.new("uint32_t *")
            lib.nvt_admin_connect_status(self.native, st, res)
            status, result = st[0], res[0]
            sct_sc = status & 0x7FF
            field = result & 0xFFFF if result >> 16 else None
            if sct_sc == 0x184 or (sct_sc == 0x182 and field == 512):
                raise ControllerError(errno.EACCES, f"the target at {t.traddr}:{t.trsvcid} refuses host "
                                                    f"'{self.hostnqn}' for subsystem '{t.subnqn}' "
                                                    f"({status_text(status)}): allow this host NQN on the "
                                                    f"target (nvmet: link it under the subsystem's "
                                                    f"allowed_hosts), or pass the allowed one as hostnqn (-q)")
            if sct_sc == 0x182 and field == 256:
                raise ControllerError(errno.ENODEV, f"the target at {t.traddr}:{t.trsvcid} has no subsystem "
                                                    f"'{t.subnqn}' ({status_text(status)}): check subnqn (-n) "
                                                    f"against the target's subsystems (nvme discover -t tcp "
                                                    f"-a {t.traddr} -s {t.trsvcid})")
            raise ControllerError(errno.EIO, f"the target at {t.traddr}:{t.trsvcid} refused the Fabrics Connect "
                                             f"for '{t.subnqn}': {status_text(status)}")
        e = -rc
        if e == errno.ECONNREFUSED:
            raise ControllerError(e, f"nothing listens on {t.traddr}:{t.trsvcid} (connection refused): check "
                                     f"traddr (-a) and trsvcid (-s, 4420 by default), and that the target "
                                     f"has a TCP port there")
        if e == errno.ETIMEDOUT:
            raise ControllerError(e, f"{why}: check that {t.traddr}:{t.trsvcid} is reachable (routing, "
                                     f"firewall) and serves NVMe/TCP; raise fabrics_connect_timeout_us for a "
                                     f"slow target")
        if e in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            raise ControllerError(e, f"{why}: {t.traddr} is not reachable from this host: check traddr (-a) "
                                     f"and the routes")
        if e == errno.EPROTO:
            raise ControllerError(e, f"{why}: is {t.traddr}:{t.trsvcid} an NVMe/TCP port (not NVMe/RDMA, iSCSI "
                                     f"or another service)?")
        raise ControllerError(e, f"cannot connect to {t.traddr}:{t.trsvcid}: {why}")

    def _enable(self, deadline: float) -> None:
        cap = self._prop_get(PROP_CAP, True)
        vs = self._prop_get(PROP_VS, False)
        self.version = f"{vs >> 16}.{(vs >> 8) & 0xFF}" + (f".{vs & 0xFF}" if vs & 0xFF else "")
        self.mqes = (cap & 0xFFFF) + 1
        self.mpsmin = (cap >> 48) & 0xF
        cc = 1 | (6 << 16) | (4 << 20)          # EN, IOSQES 64 B, IOCQES 16 B, NVM command set, 4 KiB pages
        self._prop_set(PROP_CC, cc)
        while True:
            csts = self._prop_get(PROP_CSTS, False)
            if csts & 2:
                raise ControllerError(errno.EIO, f"{self.name}: the controller reports a fatal status (CSTS.CFS) "
                                                 f"while being enabled")
            if csts & 1:
                return
            if time.monotonic() > deadline:
                raise ControllerError(errno.ETIMEDOUT, f"{self.name}: the controller did not become ready "
                                                       f"(CSTS.RDY) within the connect timeout")
            time.sleep(0.01)

    def _identify_controller(self) -> None:
        d = self._identify(1)
        oacs = struct.unpack_from("<H", d, 256)[0]
        oncs = struct.unpack_from("<H", d, 520)[0]
        self.cdata = {
            "vid": struct.unpack_from("<H", d, 0)[0], "ssvid": struct.unpack_from("<H", d, 2)[0],
            "sn": _text(d[4:24]), "mn": _text(d[24:64]), "fr": _text(d[64:72]),
            "mdts": d[77], "cntlid": struct.unpack_from("<H", d, 78)[0], "oacs": oacs, "oncs": oncs,
            "vwc": d[525], "nn": struct.unpack_from("<I", d, 516)[0], "cmic": d[76],
            "subnqn": _text(d[768:1024]), "ioccsz": struct.unpack_from("<I", d, 1792)[0],
            "icdoff": struct.unpack_from("<H", d, 1800)[0],
        }

    def _set_num_queues(self) -> int:
        n = max(1, min(self.num_io_queues, 128))
        sqe = bytearray(64)
        sqe[0] = OPC_SET_FEATURES
        struct.pack_into("<I", sqe, 40, FEAT_NUM_QUEUES)
        struct.pack_into("<I", sqe, 44, ((n - 1) << 16) | (n - 1))
        cqe = self._admin(sqe)
        dw0 = struct.unpack_from("<I", cqe, 0)[0]
        return min(n, (dw0 & 0xFFFF) + 1, ((dw0 >> 16) & 0xFFFF) + 1)

    def _identify_namespaces(self) -> list[Namespace]:
        ids = struct.unpack_from("<1024I", self._identify(2))
        out = []
        for nsid in ids:
            if nsid == 0:
                break
            d = self._identify(0, nsid)
            nsze = struct.unpack_from("<Q", d, 0)[0]
            if nsze == 0:
                continue
            flbas = d[26]
            fmt = (flbas & 0xF) | ((flbas >> 1) & 0x30)
            ms, lbads = struct.unpack_from("<HB", d, 128 + 4 * fmt)
            if ms or not 9 <= lbads <= 16:
                notice(log, "%s: namespace %d skipped: its format (%d-byte blocks with %d bytes of metadata) "
                            "is not served", self.name, nsid, 1 << lbads if lbads < 32 else 0, ms)
                continue
            nguid = bytes(d[104:120])
            io_types = {"read", "write", "flush"}
            if self.cdata["oncs"] & 4:
                io_types.add("unmap")
            if self.cdata["oncs"] & 8:
                io_types.add("write_zeroes")
            out.append(Namespace(nsid, f"{self.name}n{nsid}", 1 << lbads, nsze,
                                 str(uuid_mod.UUID(bytes=nguid)) if any(nguid) else None, frozenset(io_types)))
        return out

    def bring_up(self, deadline: float) -> None:
        """Connect the admin queue, enable, identify; raises ControllerError (admin left closed)."""
        try:
            with self.admin_lock:
                self._connect_admin(self.timeouts.connect_timeout_ms)
                self._enable(deadline)
                self._identify_controller()
                self.granted_queues = self._set_num_queues()
                self.namespaces = self._identify_namespaces()
                self._configure_io()
        except BaseException:
            lib.nvt_admin_disconnect(self.native)
            raise

    def _configure_io(self) -> None:
        ioccsz = self.cdata["ioccsz"]
        incapsule = max(0, ioccsz * 16 - 64) if ioccsz and not self.cdata["icdoff"] else 0
        mdts = self.cdata["mdts"]
        max_xfer = (1 << mdts) * (1 << (12 + self.mpsmin)) if mdts else 0
        if max_xfer > 0xFFFFFFFF:
            max_xfer = 0
        depth = min(IO_QUEUE_DEPTH, self.mqes)
        lib.nvt_ctrlr_set_io(self.native, min(incapsule, 1 << 20), max_xfer, depth, self.granted_queues,
                             self.timeouts.reconnect_delay_sec * 1000, self.timeouts.connect_timeout_ms)

    def ns_new(self, ns: Namespace, io_type_bits: int) -> Any:
        """The native bdev (``vn_bdev`` first) of namespace ``ns``, or NULL."""
        native = lib.nvt_ns_new(self.native, ns.nsid, ns.block_size, ns.num_blocks, io_type_bits)
        return None if native == ffi.NULL else native

    def ns_free(self, native: Any) -> None:
        lib.nvt_ns_free(native)

    def native_address(self, native: Any) -> int:
        return int(ffi.cast("uintptr_t", native))

    def fail_io(self) -> None:
        """Fail queued and new I/O at once (the controller goes)."""
        lib.nvt_ctrlr_set_fail_io(self.native, 1)

    def up(self) -> None:
        self.state = "enabled"
        lib.nvt_ctrlr_set_fail_io(self.native, 0)
        lib.nvt_ctrlr_set_state(self.native, lib.NVT_ADMIN_UP, self.cntlid)

    # ------------------------------------------------------------ keep alive, loss, reconnect

    def start(self, on_lost: Callable[[Controller, str], None]) -> None:
        self.on_lost = on_lost
        self._thread = threading.Thread(target=self._run, name=f"nvme_{self.name}", daemon=True)
        self._thread.start()

    def stop(self, wait: Callable[[float], Any] | None = None) -> None:
        """Stop the controller's thread.  ``wait(seconds)``: how to wait for it (the bdev
        registry's wait_unlocked, which releases the control lock the thread may need)."""
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            deadline = time.monotonic() + 30
            while t.is_alive() and time.monotonic() < deadline:
                (wait or t.join)(0.05)
        self._thread = None

    def _run(self) -> None:
        kato_s = self.timeouts.keep_alive_timeout_ms / 1000
        ka_every = max(0.5, kato_s / 3) if kato_s else None
        last_ka = time.monotonic()
        err = ffi.new("char[200]")
        self._seen = (0, 0, 0.0)
        while not self._stop.is_set():
            self._report_io_queues()
            with self.admin_lock:
                rc = lib.nvt_admin_poll(self.native, 200, err, 200)
                why = ffi.string(err).decode(errors="replace") if rc else ""
                if not rc and ka_every is not None and time.monotonic() - last_ka >= ka_every:
                    try:
                        self.keep_alive()
                        last_ka = time.monotonic()
                    except ControllerError as exc:
                        rc, why = -exc.errno, f"Keep Alive failed: {exc.message}"
            if rc:
                if self._stop.is_set():
                    return
                if not self._handle_loss(why):
                    return
                last_ka = time.monotonic()

    def _report_io_queues(self) -> None:
        """Log I/O queue losses and failed requests the reactors counted (they never log):
        the first at once, then at most one line per ERROR_REPORT_S."""
        s = ffi.new("struct nvt_stats *")
        lib.nvt_ctrlr_get_stats(self.native, s)
        lost, failed = s.io_disconnects, sum(s.errors[i] for i in range(6))
        seen_lost, seen_failed, last = self._seen
        now = time.monotonic()
        if (lost, failed) == (seen_lost, seen_failed) or (last and now - last < ERROR_REPORT_S):
            return
        log.error("%s: %d I/O queue connection(s) lost and %d request(s) failed since the last report; the "
                  "latest loss: %s (counters: bdev_nvme_get_controllers -n %s)", self.name, lost - seen_lost,
                  failed - seen_failed, ffi.string(s.last_error).decode(errors="replace") or "none", self.name)
        self._seen = (lost, failed, now)

    def _handle_loss(self, why: str) -> bool:
        """The admin queue is gone: reconnect, or fail I/O and hot-remove.  True once reconnected."""
        t = self.timeouts
        lib.nvt_ctrlr_set_state(self.native, lib.NVT_ADMIN_DOWN, 0)
        self.state = "resetting"
        lost = time.monotonic()
        if t.ctrlr_loss_timeout_sec == 0:
            log.error("%s: controller %s lost (%s); ctrlr_loss_timeout_sec is 0: its namespaces are removed",
                      self.name, self.trid, why)
        else:
            log.error("%s: controller %s lost (%s); reconnecting every %d s%s", self.name, self.trid, why,
                      t.reconnect_delay_sec,
                      "" if t.ctrlr_loss_timeout_sec < 0 else
                      f", its namespaces go in {t.ctrlr_loss_timeout_sec} s unless it comes back")
        failing = False
        next_try = lost + t.reconnect_delay_sec
        while not self._stop.is_set():
            now = time.monotonic()
            if not failing and t.fast_io_fail_timeout_sec and now - lost >= t.fast_io_fail_timeout_sec:
                failing = True
                lib.nvt_ctrlr_set_fail_io(self.native, 1)
                notice(log, "%s: fast_io_fail_timeout_sec (%d s) passed: I/O fails until the controller is back",
                       self.name, t.fast_io_fail_timeout_sec)
            if t.ctrlr_loss_timeout_sec >= 0 and now - lost >= t.ctrlr_loss_timeout_sec:
                self.state = "failed"
                lib.nvt_ctrlr_set_fail_io(self.native, 1)
                if self.on_lost is not None:
                    self.on_lost(self, why)
                return False
            if now >= next_try:
                left = t.connect_timeout_ms / 1000
                if t.ctrlr_loss_timeout_sec >= 0:
                    left = min(left, max(0.2, lost + t.ctrlr_loss_timeout_sec - now))
                try:
                    with self.admin_lock:
                        self._reconnect(time.monotonic() + left)
                except ControllerError as exc:
                    log.info("%s: reconnect failed: %s", self.name, exc.message)
                    next_try = time.monotonic() + max(t.reconnect_delay_sec, 0.2)
                    continue
                self.up()
                notice(log, "%s: controller %s reconnected after %.1f s (cntlid %d)", self.name, self.trid,
                       time.monotonic() - lost, self.cntlid)
                return True
            self._stop.wait(min(0.1, max(0.01, next_try - now)))
        return False

    def _reconnect(self, deadline: float) -> None:
        sn = self.cdata.get("sn")
        try:
            self._connect_admin(max(1, int((deadline - time.monotonic()) * 1000)))
            self._enable(deadline)
            self._identify_controller()
            if self.cdata.get("sn") != sn:
                raise ControllerError(errno.EIO, f"a different controller answers now (serial "
                                                 f"{self.cdata.get('sn')!r}, was {sn!r})")
            self.granted_queues = max(self.granted_queues and self._set_num_queues(), 0)
            self._configure_io()
        except BaseException:
            lib.nvt_admin_disconnect(self.native)
            raise

    # ------------------------------------------------------------ teardown and reports

    def close(self) -> None:
        """Stop the thread and drop the admin queue; the native controller lives on until its
        namespaces and channels let go."""
        self.stop()
        lib.nvt_ctrlr_set_fail_io(self.native, 1)
        lib.nvt_ctrlr_set_state(self.native, lib.NVT_ADMIN_DOWN, 0)
        with self.admin_lock:
            lib.nvt_admin_disconnect(self.native)
        if not self._freed:
            self._freed = True
            lib.nvt_ctrlr_put(self.native)

    def stats(self) -> dict[str, Any]:
        s = ffi.new("struct nvt_stats *")
        lib.nvt_ctrlr_get_stats(self.native, s)
        types = ("read", "write", "flush", "unmap", "write_zeroes", "reset")
        return {
            "completed": {t: s.ops[i] for i, t in enumerate(types)},
            "errors": {t: s.errors[i] for i, t in enumerate(types)},
            "bytes_read": s.bytes_read, "bytes_written": s.bytes_written, "commands": s.commands,
            "in_capsule_writes": s.in_capsule, "r2t": s.r2t, "resent": s.resent,
            "io_queue_connects": s.io_connects, "io_queue_disconnects": s.io_disconnects,
            "failed_fast": s.failed_fast, "io_queues_in_use": lib.nvt_ctrlr_io_queues_in_use(self.native),
            "last_io_queue_error": ffi.string(s.last_error).decode(errors="replace") or None,
        }

    def ctrlr_data_json(self) -> dict[str, Any]:
        c = self.cdata
        return {
            "cntlid": self.cntlid, "vendor_id": f"{c.get('vid', 0):#06x}", "model_number": c.get("mn", ""),
            "serial_number": c.get("sn", ""), "firmware_revision": c.get("fr", ""), "subnqn": c.get("subnqn", ""),
            "oacs": {"security": c.get("oacs", 0) & 1, "format": (c.get("oacs", 0) >> 1) & 1,
                     "firmware": (c.get("oacs", 0) >> 2) & 1, "ns_manage": (c.get("oacs", 0) >> 3) & 1},
            "multi_ctrlr": bool(c.get("cmic", 0) & 2), "ana_reporting": bool(c.get("cmic", 0) & 8),
        }
