"""A vhost controller: a listening vhost-user socket, its device type, its queues.

One front-end at a time (a second connection is refused while one is served).
Each connection runs on its own thread, so a slow or hostile front-end stalls
nobody else's control plane; message handling takes the app's control lock so
it never races an RPC.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import threading
import time
from typing import TYPE_CHECKING, Any

from vhost_core.errors import VhostError
from vhost_core.log import get_logger, notice
from vhost_core.native import abi_mismatch, ffi, lib
from vhost_core.reactor import Reactor, format_mask
from vhost_core.device import Device, DeviceContext, NativeDevice
from vhost_core.vhost_user import messages as m
from vhost_core.vhost_user.connection import Connection
from vhost_core.vhost_user.handler import Session

if TYPE_CHECKING:  # pragma: no cover
    from vhost_core.app import App

log = get_logger("vhost")

#: How long a new connection waits for the previous front-end's teardown.
RECONNECT_WAIT_S = 5.0
#: Sessions whose stuck requests a controller may still be waiting for before it
#: refuses new front-ends (each keeps its guest memory mapped meanwhile).
MAX_RETIRED = 2
#: How often retired queues are checked for their late completions.
REAP_INTERVAL_S = 0.1
#: SPDK's interrupt coalescing defaults (off; the threshold shown is SPDK's).
COALESCING_DEFAULT = (0, 60000)
#: SPDK's limits: the rate is measured per 10 ms, so fewer than 100 IOPS is none at all.
COALESCING_MIN_IOPS = 100
COALESCING_MAX_DELAY_US = 1_000_000


def _hung_up(conn: Connection | None) -> bool:
    """Whether the front-end of ``conn`` closed its end (or ``conn`` is already gone)."""
    if conn is None:
        return True
    try:
        p = select.poll()
        p.register(conn.sock.fileno(), select.POLLRDHUP)
        return bool(p.poll(0))
    except (OSError, ValueError):       # closed under us: its teardown has begun
        return True


class Controller:
    def __init__(self, app: App, name: str, device: Device, device_ctx: DeviceContext, reactor: Reactor,
                 cpumask: int, native: NativeDevice) -> None:
        self.app = app
        self.name = name
        self.device = device
        self.device_ctx = device_ctx
        self.reactor = reactor
        self.cpumask = cpumask
        self.path = os.path.join(app.socket_dir, name)
        self.session: Session | None = None
        self._conn: Connection | None = None
        self._closing = False
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._serve_thread: threading.Thread | None = None
        #: Queues of ended sessions with requests still in flight, and the
        #: mappings those requests use: [(vqs, mems)], freed once they drain.
        self._retired: list[tuple[list, list]] = []
        self._reaper: threading.Thread | None = None
        self._teardown_deferred = False
        #: (delay_base_us, iops_threshold): vhost_controller_set_coalescing.
        self.coalescing = COALESCING_DEFAULT
        why = abi_mismatch(f"the {device.device_type} device type of controller {name}", native.ops)
        if why is not None:
            log.error("%s", why)
            raise VhostError(errno.EPROTO, why)
        err = ffi.new("int *")
        self.native_dev = lib.vn_dev_new(reactor.native, ffi.cast("const struct vn_device_ops *", native.ops),
                                         ffi.cast("void *", native.ctx), err)
        if self.native_dev == ffi.NULL:
            raise VhostError(-err[0], f"controller {name}: the {device.device_type} device cannot be placed on "
                                   f"reactor {reactor.core}: {os.strerror(-err[0])}")
        self.native_vqs = [lib.vn_vq_new(self.native_dev, i) for i in range(device.num_queues)]

    # ------------------------------------------------------------ socket

    def listen(self) -> None:
        if len(self.path.encode()) >= 108:
            raise VhostError(errno.ENAMETOOLONG, f"socket path {self.path} is longer than a unix socket "
                                                f"allows (107 bytes): use a shorter -S directory or name")
        if os.path.exists(self.path):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise VhostError(errno.EEXIST, f"{self.path} exists and is not a socket: remove it or "
                                              f"pick another controller name")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
                probe.close()
                raise VhostError(errno.EADDRINUSE, f"socket {self.path} is in use by another process: "
                                                  f"pick another controller name or -S directory")
            except OSError:
                probe.close()
                os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(4)
        self._listener = sock
        t = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            if self._closing:
                sock.close()
                return
            # A front-end that just hung up may still be tearing down (draining its
            # queues): a quick reconnect waits for that instead of being refused.  One
            # still connected is not waited for: the newcomer is refused at once.
            previous = self._serve_thread
            if previous is not None and previous.is_alive() and _hung_up(self._conn):
                previous.join(RECONNECT_WAIT_S)
            if self._conn is not None:
                log.error("Controller %s: refused a second front-end connection while one is served",
                          self.name)
                sock.close()
                continue
            if len(self._retired) >= MAX_RETIRED:
                log.error("Controller %s: refused a front-end connection: %d earlier sessions still have "
                          "requests the backend never completed (see the bdev); it is accepted again once "
                          "they complete", self.name, len(self._retired))
                sock.close()
                continue
            conn = Connection(sock)
            with self.app.lock:
                self._conn = conn
                self.session = Session(self, conn)
            notice(log, "Controller %s: front-end connected", self.name)
            t = threading.Thread(target=self._serve, args=(conn,), name=f"{self.name}-conn", daemon=True)
            self._serve_thread = t
            t.start()

    def _serve(self, conn: Connection) -> None:
        try:
            while True:
                try:
                    msg = conn.recv()
                except m.ProtocolError as exc:
                    log.error("Controller %s: dropping the front-end connection: %s", self.name, exc)
                    return
                except OSError:
                    return
                if msg is None:
                    return
                with self.app.lock:
                    if self.session is None:
                        msg.close_fds()
                        return
                    try:
                        self.session.handle(msg)
                    except m.ProtocolError as exc:
                        log.error("Controller %s: dropping the front-end connection: %s", self.name, exc)
                        return
                    except OSError:
                        return
                    except Exception:
                        log.exception("Controller %s: internal error handling %s; dropping the connection",
                                      self.name, msg.request)
                        return
        finally:
            with self.app.lock:
                if self.session is not None:
                    self.session.close()
                    self.session = None
                conn.close()
                self._conn = None

    # ------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop serving: drain the queues, drop the front-end, remove the socket."""
        self._closing = True
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self.session is not None:
            self.session.close()
            self.session = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for q in self.native_vqs:
            lib.vn_vq_free(q)
        self.native_vqs = []
        if self._retired:
            # The device still owes those queues completions: it goes once they drain.
            self._teardown_deferred = True
            log.error("Controller %s: deleted with requests the backend never completed; its device "
                      "and bdev are released once they complete", self.name)
            return
        self._free_device()

    def wait_unlocked(self, seconds: float) -> None:
        """Sleep with the daemon's control lock released (a session draining a ring)."""
        self.app.wait_unlocked(seconds)

    def _free_device(self) -> None:
        lib.vn_dev_free(self.native_dev)
        self.native_dev = ffi.NULL
        self.device_ctx.release(self.device)

    # ------------------------------------------------------------ stuck queues

    def retire(self, vqs: dict[int, Any], mems: list) -> None:
        """Take over queues whose requests outlived their session, and the guest and
        inflight mappings those requests write to; the next front-end gets fresh
        queues.  Called by the session under the control lock."""
        for index in vqs:
            self.native_vqs[index] = lib.vn_vq_new(self.native_dev, index)
        self._retired.append((list(vqs.values()), [x for x in mems if x != ffi.NULL]))
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name=f"{self.name}-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        while True:
            time.sleep(REAP_INTERVAL_S)
            with self.app.lock:
                for entry in list(self._retired):
                    vqs, mems = entry
                    vqs[:] = [q for q in vqs if lib.vn_vq_free(q) != 0]
                    if vqs:
                        continue
                    for mem in mems:
                        self.app.memory.free_mem(mem)   # unregistered (DMA), then unmapped
                    self._retired.remove(entry)
                    notice(log, "Controller %s: requests left by an earlier front-end completed; its guest "
                           "memory is released", self.name)
                if not self._retired:
                    self._reaper = None
                    if self._teardown_deferred:
                        self._teardown_deferred = False
                        self._free_device()
                    return

    # ------------------------------------------------------------ coalescing

    def set_coalescing(self, delay_base_us: int, iops_threshold: int) -> None:
        """Delay the guest's interrupts by up to ``delay_base_us`` on queues doing more
        than ``iops_threshold`` requests per second (0: never delay)."""
        if not 0 <= delay_base_us <= COALESCING_MAX_DELAY_US:
            raise VhostError(errno.EINVAL, f"controller {self.name}: delay_base_us {delay_base_us} is out of "
                                          f"range: use 0 (no coalescing) to {COALESCING_MAX_DELAY_US}")
        if not COALESCING_MIN_IOPS <= iops_threshold <= 0xFFFFFFFF:
            raise VhostError(errno.EINVAL, f"controller {self.name}: iops_threshold {iops_threshold} is too "
                                          f"low: the rate is measured per 10 ms, use at least "
                                          f"{COALESCING_MIN_IOPS} (SPDK's default is {COALESCING_DEFAULT[1]})")
        rc = lib.vn_dev_set_coalescing(self.native_dev, delay_base_us, iops_threshold)
        if rc < 0:
            raise VhostError(-rc, f"controller {self.name}: cannot set coalescing delay_base_us={delay_base_us} "
                                 f"iops_threshold={iops_threshold}: {os.strerror(-rc)}")
        self.coalescing = (delay_base_us, iops_threshold)

    def config_json(self) -> list[dict[str, Any]]:
        """The calls that recreate this controller (save_config): the device's, then the
        coalescing settings when they are not the default (as SPDK writes them)."""
        calls = self.device.config_json()
        if calls and self.coalescing[0]:
            calls.append({"method": "vhost_controller_set_coalescing",
                          "params": {"ctrlr": self.name, "delay_base_us": self.coalescing[0],
                                     "iops_threshold": self.coalescing[1]}})
        return calls

    # ------------------------------------------------------------ RPC view

    def to_json(self) -> dict[str, Any]:
        return {
            "ctrlr": self.name,
            "cpumask": format_mask(self.cpumask),
            "delay_base_us": self.coalescing[0],
            "iops_threshold": self.coalescing[1],
            "socket": self.path,
            "sessions": [] if self.session is None else [{"vid": 0, "id": 0, "name": f"{self.name}s0",
                                                          "started": any(v.started for v in self.session.vrings)}],
            "backend_specific": self.device.backend_specific(),
        }

    def queue_stats(self) -> list[dict[str, int]]:
        out = []
        buf = ffi.new("uint64_t[3]")
        rec = ffi.new("uint32_t[2]")
        for i, q in enumerate(self.native_vqs):
            lib.vn_vq_get_stats(q, buf)
            lib.vn_vq_get_recovery(q, rec)
            # in_flight: taken from the ring, not yet returned (read racily: a hint for
            # a stuck backend); resubmitted: recovered from the inflight buffer at the
            # ring's last start (a previous target process left them unfinished).
            out.append({"queue": i, "requests": buf[0], "interrupts": buf[1], "errors": buf[2],
                        "in_flight": lib.vn_vq_inflight(q), "resubmitted": rec[0]})
        return out
