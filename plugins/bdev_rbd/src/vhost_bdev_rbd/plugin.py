"""bdev_rbd plugin: Ceph RBD images as bdevs (SPDK's ``bdev_rbd_*`` methods).

The control plane is Ceph's own Python bindings (``rados``, ``rbd``): they connect
(with timeouts), find the pool and the image and say precisely what is wrong before a
byte of native state exists.  The data path is ``rbd.c`` on librbd's asynchronous C API;
it needs an ``rbd_image_t`` the Python bindings do not hand out, so each cluster has a
second, native connection, made with the same settings once the Python one worked.

Every wait for the network (connect, open, resize, close) runs with the daemon's control
lock released: an unreachable monitor costs the caller its timeout, not the RPC socket or
other controllers.  librbd's update watch tells a small thread here when an image changed
(``rbd resize`` by anyone); it reads the new size and the core tells the guests.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import socket
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable
from typing import Any

import attrs

from vhost_core.bdev.interface import IO_TYPES, Bdev, BdevModule, check_block_size
from vhost_core.bdev.registry import BdevRegistry
from vhost_core.commands import Cli, CliArg, CommandContext, param
from vhost_core.errors import VhostError
from vhost_core.hookspecs import hookimpl
from vhost_core.log import get_logger, notice
from vhost_core.reactor import parse_cpumask

from vhost_bdev_rbd._rbd_native import ffi, lib

VHOST_CORE_API = (2,)
MODULE = "rbd"
log = get_logger("bdev_rbd")

#: Seconds a monitor may take to answer (connect, pool and image look-ups, resize).
#: The user's own ``client_mount_timeout`` / ``rados_mon_op_timeout`` win.
CONNECT_TIMEOUT_S = float(os.environ.get("VHOST_BDEV_RBD_TIMEOUT_S", "5"))
#: Seconds an I/O waits for an OSD (librbd retries meanwhile) before the guest gets an
#: I/O error; ``rados_osd_op_timeout`` in config_param/config overrides it.
OSD_TIMEOUT_S = float(os.environ.get("VHOST_BDEV_RBD_OSD_TIMEOUT_S", "30"))
DEFAULT_CEPH_CONF = "/etc/ceph/ceph.conf"
#: How often I/O errors are looked for (and logged, one line per bdev at most).
ERROR_TICK_S = 1.0
#: How often each image is looked up by name: `rbd trash mv` of an open image sends no update
#: notification (a resize does, and is acted on at once).
GONE_CHECK_S = float(os.environ.get("VHOST_BDEV_RBD_GONE_CHECK_S", "10"))


def _import_bindings() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError as exc:
        raise VhostError(errno.ENOPKG, f"Ceph's Python bindings are missing ({exc}): install them "
                                      f"(Debian: apt-get install python3-rados python3-rbd) and run the "
                                      f"daemon with a Python that sees them (a venv made with "
                                      f"--system-site-packages)") from None
    return rados, rbd


# --------------------------------------------------------------------------
# parameters (SPDK's)
# --------------------------------------------------------------------------



@attrs.frozen
class RegisterClusterParams:
    name: str = param(help="Name of the Rados cluster only known to rbd bdev")
    user_id: str | None = param(None, "--user", help="Ceph user name (i.e. admin, not client.admin)")
    config_param: dict[str, str] | None = param(None, hidden=True,
                                                help="configuration options for rados_conf_set "
                                                     "(default: rely on config file)")
    config_file: str | None = param(None, "--config-file", help="The file path of the Rados configuration file")
    key_file: str | None = param(None, "--key-file", help="The file path of the Rados keyring file")
    core_mask: str | None = param(None, "--core-mask", help="Set core mask for librbd IO context threads "
                                                          "(default: any core)")


@attrs.frozen
class ClusterNameParams:
    name: str = param(help="Name of the Rados cluster only known to rbd bdev")


@attrs.frozen
class ClustersInfoParams:
    name: str | None = param(None, "-b", "--name", help="Name of the registered Rados cluster")


@attrs.frozen
class CreateParams:
    pool_name: str = param(help="rbd pool name")
    rbd_name: str = param(help="rbd image name (image@snapshot: that snapshot, read-only)")
    block_size: int = param(help="rbd block size")
    name: str | None = param(None, "-b", "--name", help="Name of the bdev (default: Ceph<n>)")
    user_id: str | None = param(None, "--user", help="Ceph user name (i.e. admin, not client.admin)")
    config: dict[str, str] | None = param(None, hidden=True,
                                          help="configuration options for rados_conf_set "
                                               "(default: rely on config file)")
    cluster_name: str | None = param(None, "-c", "--cluster-name",
                                     help="cluster name to identify the Rados cluster")
    uuid: str | None = param(None, "-u", "--uuid", help="UUID of the bdev")
    read_only: bool = param(False, "-r", "--readonly", help="Set this bdev as read-only")


@attrs.frozen
class NameParams:
    name: str = param(help="rbd bdev name")


@attrs.frozen
class ResizeParams:
    name: str = param(help="rbd bdev name")
    new_size: int = param(help="new bdev size for resize operation. The unit is MiB")


@attrs.frozen
class StatsParams:
    name: str | None = param(None, "-b", "--name", help="rbd bdev name (default: all)")


def _kv_list(values: list[str] | None, what: str) -> dict[str, str] | None:
    if not values:
        return None
    out = {}
    for entry in values:
        k, sep, v = entry.partition("=")
        if not sep:
            raise SystemExit(f"{what} {entry} not in key=value form")
        out[k] = v
    return out


# --------------------------------------------------------------------------
# connections
# --------------------------------------------------------------------------


@attrs.define(eq=False)
class _Cluster:
    """One connection pair (Python bindings + native) to a cluster, shared by its bdevs."""

    name: str                           # the registered name, or "" for a bdev's own connection
    user_id: str | None
    config: dict[str, str]              # what the user gave (config_param / config)
    config_file: str | None
    key_file: str | None
    mon_host: str
    rados: Any                          # rados.Rados
    native: Any                         # struct rbdn_cluster *, for the data path
    core_mask: str | None = None
    users: set[str] = attrs.Factory(set)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cluster_name": self.name}
        if self.user_id is not None:
            out["user_id"] = self.user_id
        if self.config:
            out["config_param"] = dict(self.config)
        if self.config_file is not None:
            out["config_file"] = self.config_file
        if self.key_file is not None:
            out["key_file"] = self.key_file
        if self.core_mask is not None:
            out["core_mask"] = self.core_mask
        return out

    def submission(self) -> str:
        """How this connection's requests reach librbd, for the log."""
        ops, nbytes = ffi.new("int64_t *"), ffi.new("int64_t *")
        if lib.rbdn_cluster_reactor_submit(self.native, ops, nbytes):
            if ops[0] >= 1 << 22 and nbytes[0] >= 1 << 39:
                return "requests go to librbd from the reactors (librados' in-flight throttle off)"
            return (f"requests go to librbd from the reactors, at most {ops[0]} object requests / "
                    f"{nbytes[0] / (1 << 20):g} MiB in flight")
        return "requests go to librbd through its dispatch thread (rbd_non_blocking_aio or a writeback cache)"

    def shutdown(self) -> None:
        try:
            self.rados.shutdown()
        finally:
            lib.rbdn_cluster_shutdown(self.native)


def core_mask_text(cpus: set[int] | None) -> str | None:
    return None if cpus is None else hex(sum(1 << c for c in cpus))


def _unlocked(bdevs: BdevRegistry, fn: Callable[[], Any], timeout_s: float, what: str, fix: str) -> Any:
    """Run ``fn`` on a thread while the daemon's control lock is released; its result, or
    its exception.  A call still running after ``timeout_s`` is left to finish on its own
    (librados' own timeouts end it) and the caller gets ETIMEDOUT naming ``what``."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="bdev_rbd_call", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not done.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            raise VhostError(errno.ETIMEDOUT, f"{what}: no answer within {timeout_s:g} s: {fix}")
        bdevs.wait_unlocked(min(0.02, left))
    if "error" in box:
        raise box["error"]
    return box.get("value")


_MON_HOST_RE = re.compile(r"^\s*mon[ _]host\s*=\s*(.+?)\s*$", re.M)


def _mon_host(config: dict[str, str], config_file: str | None) -> str | None:
    for key in ("mon_host", "mon host"):
        if config.get(key):
            return config[key]
    if config_file:
        try:
            m = _MON_HOST_RE.search(open(config_file).read())
        except OSError:
            return None
        return m.group(1) if m else None
    return None


def _mon_addrs(mon_host: str) -> list[tuple[str, int]]:
    """(host, port) pairs of a mon_host value ("a:6789,b", "[v2:a:3300,v1:a:6789]")."""
    out = []
    for tok in re.split(r"[\s,;\[\]]+", mon_host):
        tok = re.sub(r"^v[12]:", "", tok).split("/")[0]
        if not tok:
            continue
        host, sep, port = tok.rpartition(":")
        if sep and port.isdigit():
            out.append((host, int(port)))
        else:
            out += [(tok, 3300), (tok, 6789)]
    return out


def _mon_listens(mon_host: str) -> bool:
    for host, port in _mon_addrs(mon_host)[:6]:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            continue
    return False


def _core_set(method: str, core_mask: str | None) -> set[int] | None:
    if core_mask is None:
        return None
    try:
        mask = parse_cpumask(core_mask)
    except ValueError as exc:
        raise VhostError(errno.EINVAL, f"{method}: core_mask {core_mask!r}: {exc}") from None
    cpus = {i for i in range(mask.bit_length()) if mask >> i & 1}
    if not cpus or max(cpus) >= (os.cpu_count() or 1):
        raise VhostError(errno.EINVAL, f"{method}: core_mask {core_mask} names no core of this machine "
                                      f"(cores 0-{(os.cpu_count() or 1) - 1}): give a mask of existing cores")
    return cpus


def _connect(bdevs: BdevRegistry, method: str, name: str, user_id: str | None, config: dict[str, str] | None,
             config_file: str | None, key_file: str | None, cpus: set[int] | None = None) -> _Cluster:
    rados, _ = _import_bindings()
    config = {str(k): str(v) for k, v in (config or {}).items()}
    what = f"cluster '{name}'" if name else "the cluster"
    if config_file is None and not (config.get("mon_host") or config.get("mon host")):
        if not os.path.exists(DEFAULT_CEPH_CONF):
            raise VhostError(errno.EINVAL, f"{method}: no monitor address for {what}: give config_file "
                                          f"(a ceph.conf), or mon_host in config_param/config "
                                          f"(e.g. mon_host=10.0.0.1:6789); {DEFAULT_CEPH_CONF} does not exist")
        config_file = DEFAULT_CEPH_CONF
    if config_file is not None and not os.path.isfile(config_file):
        raise VhostError(errno.ENOENT, f"{method}: config_file '{config_file}' does not exist: fix the path")
    if key_file is not None and not os.path.isfile(key_file):
        raise VhostError(errno.ENOENT, f"{method}: key_file '{key_file}' does not exist: fix the path "
                                      f"(a keyring, e.g. /etc/ceph/ceph.client.admin.keyring)")
    mon_host = _mon_host(config, config_file) or "?"
    timeout = CONNECT_TIMEOUT_S
    settings = {"client_mount_timeout": f"{timeout:g}", "rados_mon_op_timeout": f"{timeout:g}",
                "rados_osd_op_timeout": f"{OSD_TIMEOUT_S:g}",
                # A guest's discard of part of an object zeroes it instead of being dropped:
                # unmapped blocks read back as zeroes, as on the other bdevs.
                "rbd_skip_partial_discard": "false",
                # The reactor calls into librbd itself, one thread hop less per request.
                # rbd.c keeps it from ever waiting in librbd: no throttle in librados that
                # makes the caller wait (the guests' queues bound what is in flight); a
                # writeback cache, or a configured throttle with the cache on, gives the
                # requests back to librbd's dispatch thread.
                "rbd_non_blocking_aio": "false",
                "objecter_inflight_ops": "0", "objecter_inflight_op_bytes": "0"}
    if key_file is not None:
        settings["keyring"] = key_file
    settings.update(config)
    for k in ("client_mount_timeout", "rados_mon_op_timeout"):
        try:
            timeout = max(timeout, float(settings[k]))
        except ValueError:
            raise VhostError(errno.EINVAL, f"{method}: {k}={settings[k]!r} is not a number of seconds") from None
    user = user_id or "admin"
    client = f"client.{user}"
    r = rados.Rados(rados_id=user, conffile=config_file)
    try:
        for k, v in settings.items():
            try:
                r.conf_set(k, v)
            except rados.Error as exc:
                raise VhostError(errno.EINVAL, f"{method}: '{k}' is not a Ceph option this librados accepts "
                                              f"({exc}): fix or drop it (ceph config help {k})") from None

        def connect() -> None:
            if cpus is not None:            # see native_connect
                os.sched_setaffinity(0, cpus)
            r.connect(timeout=int(timeout + 0.999))

        fix_mon = (f"check that a ceph-mon listens at {mon_host} (mon_host in config or config_file) and "
                   f"is reachable from here")
        try:
            _unlocked(bdevs, connect, timeout + 2, f"{method}: connecting to {what} at {mon_host} as {client}",
                      fix_mon)
        except (rados.PermissionError, rados.PermissionDeniedError) as exc:
            raise VhostError(errno.EACCES, f"{method}: {what} at {mon_host} refused {client} ({exc}): check "
                                          f"its key (key= in config, key_file, or the keyring of "
                                          f"config_file) against `ceph auth get-key {client}`") from None
        except (rados.TimedOut, rados.InterruptedOrTimeoutError) as exc:
            if _mon_listens(mon_host):
                # cephx with a wrong key is not refused: the monitor just never lets the client in.
                raise VhostError(errno.EACCES, f"{method}: a monitor of {what} listens at {mon_host} but did not "
                                              f"let {client} in within {timeout:g} s ({exc}): check its key "
                                              f"(key= in config, key_file, or the keyring of config_file) "
                                              f"against `ceph auth get-key {client}`") from None
            raise VhostError(errno.ETIMEDOUT, f"{method}: no monitor of {what} at {mon_host} answered within "
                                             f"{timeout:g} s ({exc}): {fix_mon}") from None
        except rados.Error as exc:
            e = getattr(exc, "errno", None) or errno.EIO
            hint = fix_mon
            if e in (errno.ENOENT, errno.EINVAL):
                hint = (f"no key for {client} was found: give key= in config, key_file, or a keyring in "
                        f"config_file")
            raise VhostError(e, f"{method}: cannot connect to {what} at {mon_host} as {client} ({exc}): "
                                f"{hint}") from None
    except BaseException:
        try:
            r.shutdown()
        except Exception:
            pass
        raise
    keys = [ffi.new("char[]", k.encode()) for k in settings]
    vals = [ffi.new("char[]", v.encode()) for v in settings.values()]
    out = ffi.new("void **")
    err = ffi.new("char[256]")

    def native_connect() -> int:
        # librados starts its threads (messenger, finisher: they run the I/O completions) from
        # the connecting thread and they inherit its affinity: core_mask pins them, away from
        # busy-polling reactors.  This is a thread of its own, so nothing else is pinned.
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        return lib.rbdn_cluster_connect(user.encode(), config_file.encode() if config_file else ffi.NULL,
                                        ffi.new("char *[]", keys), ffi.new("char *[]", vals), len(keys), out,
                                        err, 256)
    try:
        rc = _unlocked(bdevs, native_connect, timeout + 2, f"{method}: connecting the data path to {what}",
                       "the monitor stopped answering: try again")
    except BaseException:
        r.shutdown()
        raise
    if rc < 0:
        r.shutdown()
        raise VhostError(-rc, f"{method}: the data path's connection to {what} failed: "
                              f"{ffi.string(err).decode(errors='replace')}")
    return _Cluster(name=name, user_id=user_id, config=config, config_file=config_file, key_file=key_file,
                    mon_host=mon_host, rados=r, native=out[0], core_mask=core_mask_text(cpus))


# --------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------


@attrs.define(eq=False)
class _RbdBdev:
    bdev: Bdev
    native: Any
    cluster: _Cluster
    pool_name: str
    rbd_name: str
    read_only: bool
    freed: bool = False
    logged_errors: int = 0
    #: Held by the watch thread while it asks the cluster about this image, and by destruct
    #: while it frees it: neither the image nor a connection goes away under a call.
    busy: threading.Lock = attrs.Factory(threading.Lock)


class RbdModule(BdevModule):
    """Registered clusters, rbd bdevs, and the thread that acts on librbd's update watch."""

    def __init__(self) -> None:
        super().__init__(MODULE)
        self.lock = threading.Lock()
        self.clusters: dict[str, _Cluster] = {}
        self.states: dict[str, _RbdBdev] = {}
        self.bdevs: BdevRegistry | None = None
        self.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._next_gone_check = 0.0

    def config_json(self, bdevs: list[Bdev]) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = []
        with self.lock:
            for c in self.clusters.values():
                params: dict[str, Any] = {"name": c.name}
                for k in ("user_id", "config_file", "key_file", "core_mask"):
                    if getattr(c, k) is not None:
                        params[k] = getattr(c, k)
                if c.config:
                    params["config_param"] = dict(c.config)
                calls.append({"method": "bdev_rbd_register_cluster", "params": params})
            for b in bdevs:
                s = self.states.get(b.name)
                if s is None:
                    continue
                p: dict[str, Any] = {"name": b.name, "pool_name": s.pool_name, "rbd_name": s.rbd_name,
                                     "block_size": b.block_size, "uuid": b.uuid}
                if s.read_only:
                    p["read_only"] = True
                if s.cluster.name:
                    p["cluster_name"] = s.cluster.name
                else:
                    if s.cluster.user_id is not None:
                        p["user_id"] = s.cluster.user_id
                    if s.cluster.config:
                        p["config"] = dict(s.cluster.config)
                calls.append({"method": "bdev_rbd_create", "params": p})
        return calls

    def fini(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            # Short: it may be waiting for the control lock, which our caller holds.
            self._thread.join(2)
            if self._thread.is_alive():
                # Still busy (a call to the cluster, or that lock): shutting the connections down
                # under it could crash it; the process exits anyway.
                notice(log, "bdev_rbd: the watch thread is still busy; leaving the cluster "
                            "connections to the exiting process")
                return
            self._thread = None
        with self.lock:
            clusters = list(self.clusters.values())
            self.clusters.clear()
        for c in clusters:
            c.shutdown()

    # ------------------------------------------------------------ update watch

    def ensure_watcher(self, bdevs: BdevRegistry) -> None:
        self.bdevs = bdevs
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._watch, name="bdev_rbd_watch", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while True:
            ready, _, _ = select.select([self.notify_fd, self._stop_r], [], [], min(ERROR_TICK_S, GONE_CHECK_S))
            if self._stop_r in ready:
                return
            try:
                self.report_errors()
            except Exception:
                log.exception("bdev_rbd: reporting I/O errors failed")
            if time.monotonic() >= self._next_gone_check:
                self._next_gone_check = time.monotonic() + GONE_CHECK_S
                with self.lock:
                    for st in self.states.values():
                        if not st.freed and not st.read_only:
                            lib.rbdn_bdev_mark_updated(st.native)
                ready = [self.notify_fd]
            if self.notify_fd not in ready:
                continue
            try:
                os.eventfd_read(self.notify_fd)
            except BlockingIOError:
                pass
            try:
                self.check_updates()
            except Exception:
                log.exception("bdev_rbd: handling an image update failed")

    def report_errors(self) -> None:
        """Log a bdev's I/O errors: the first one at once, then at most one summary per tick."""
        with self.lock:
            for s in self.states.values():
                st = _stats(s)
                if st is None or st["io_errors"] <= s.logged_errors:
                    continue
                e = st["last_error"] or {}
                log.error("bdev %s: %d I/O error(s) on %s/%s (%d in total); the latest: %s of %d blocks at block "
                          "%d: %s (errno %d); the guest gets an I/O error for each (counters: bdev_rbd_get_stats)",
                          s.bdev.name, st["io_errors"] - s.logged_errors, s.pool_name, s.rbd_name, st["io_errors"],
                          e.get("io_type"), e.get("num_blocks", 0), e.get("offset_blocks", 0), e.get("error"),
                          e.get("errno", 0))
                s.logged_errors = st["io_errors"]

    @staticmethod
    def _still_named(s: _RbdBdev) -> bool:
        """Whether pool/image still opens by its name (an image moved to the trash does not)."""
        _, rbd = _import_bindings()
        try:
            ioctx = s.cluster.rados.open_ioctx(s.pool_name)
        except Exception:
            return True                 # cannot tell: keep serving
        try:
            with rbd.Image(ioctx, s.rbd_name.partition("@")[0], read_only=True):
                return True
        except rbd.ImageNotFound:
            return False
        except Exception:
            return True
        finally:
            ioctx.close()

    def check_updates(self) -> None:
        with self.lock:
            changed = [s for s in self.states.values() if not s.freed and lib.rbdn_bdev_updated(s.native)]
        bdevs = self.bdevs
        for s in changed:
            with s.busy:                                  # the network: no control lock held
                if s.freed:
                    continue
                size = lib.rbdn_bdev_image_size(s.native)
                if size >= 0 and not s.read_only and not self._still_named(s):
                    size = -errno.ENOENT                  # `rbd trash mv` (or rm) took its name away
            with bdevs.lock:
                if s.freed or s.bdev.name not in bdevs:
                    continue
                if size == -errno.ENOENT:
                    log.error("bdev %s: image %s/%s was removed from the cluster (or moved to the trash); "
                              "hot-removing the bdev",
                              s.bdev.name, s.pool_name, s.rbd_name)
                    bdevs.delete(s.bdev.name, module=MODULE)
                    continue
                if size < 0:
                    log.error("bdev %s: cannot read the size of %s/%s after an update: %s", s.bdev.name,
                              s.pool_name, s.rbd_name, os.strerror(-size))
                    continue
                new = size // s.bdev.block_size
                if new != s.bdev.num_blocks:
                    notice(log, "bdev %s: image %s/%s resized outside the target: %d -> %d blocks of %d bytes",
                           s.bdev.name, s.pool_name, s.rbd_name, s.bdev.num_blocks, new, s.bdev.block_size)
                    bdevs.resize(s.bdev.name, new)


def _parse_uuid(method: str, value: str | None) -> str:
    if value is None:
        return str(uuid_mod.uuid4())
    try:
        return str(uuid_mod.UUID(value))
    except ValueError:
        raise VhostError(errno.EINVAL, f"{method}: uuid '{value}' is not a UUID "
                                      f"(e.g. 1b9e4f5a-6a3c-4a2b-9b8e-0d3c5f7a9e21)") from None


def _register_cluster(module: RbdModule, bdevs: BdevRegistry, p: RegisterClusterParams) -> str:
    method = "bdev_rbd_register_cluster"
    if not p.name:
        raise VhostError(errno.EINVAL, f"{method}: name must not be empty")
    with module.lock:
        if p.name in module.clusters:
            raise VhostError(errno.EEXIST, f"{method}: cluster '{p.name}' is already registered: pick another "
                                          f"name or bdev_rbd_unregister_cluster it first")
    c = _connect(bdevs, method, p.name, p.user_id, p.config_param, p.config_file, p.key_file,
                 _core_set(method, p.core_mask))
    with module.lock:
        if p.name in module.clusters:
            c.shutdown()
            raise VhostError(errno.EEXIST, f"{method}: cluster '{p.name}' is already registered")
        module.clusters[p.name] = c
    notice(log, "rbd cluster %s registered: monitors %s, user client.%s; %s", p.name, c.mon_host,
           p.user_id or "admin", c.submission())
    return p.name


def _unregister_cluster(module: RbdModule, name: str) -> bool:
    method = "bdev_rbd_unregister_cluster"
    with module.lock:
        c = module.clusters.get(name)
        if c is None:
            known = ", ".join(sorted(module.clusters)) or "none"
            raise VhostError(errno.ENOENT, f"{method}: no cluster '{name}' is registered (registered: {known})")
        if c.users:
            raise VhostError(errno.EBUSY, f"{method}: cluster '{name}' is used by rbd bdev(s) "
                                         f"{', '.join(sorted(c.users))}: delete them first (bdev_rbd_delete)")
        del module.clusters[name]
    c.shutdown()
    notice(log, "rbd cluster %s unregistered", name)
    return True


def _next_name(module: RbdModule, bdevs: BdevRegistry) -> str:
    i = 0
    while f"Ceph{i}" in bdevs:
        i += 1
    return f"Ceph{i}"


def _create(module: RbdModule, bdevs: BdevRegistry, method: str, p: CreateParams) -> str:
    rados, rbd = _import_bindings()
    name = p.name or _next_name(module, bdevs)
    if name in bdevs:
        raise VhostError(errno.EEXIST, f"{method}: bdev name '{name}' is already taken: pick another name "
                                      f"or delete the existing bdev first")
    try:
        check_block_size(p.block_size)
    except ValueError as exc:
        raise VhostError(errno.EINVAL, f"{method}: {exc}") from None
    bdev_uuid = _parse_uuid(method, p.uuid)
    image, _, snap = p.rbd_name.partition("@")
    if not image or not p.pool_name:
        raise VhostError(errno.EINVAL, f"{method}: pool_name and rbd_name must not be empty")
    read_only = p.read_only or bool(snap)
    own = p.cluster_name is None
    if own:
        cluster = _connect(bdevs, method, "", p.user_id, p.config, None, None)
    else:
        if p.user_id is not None or p.config:
            raise VhostError(errno.EINVAL, f"{method}: cluster_name '{p.cluster_name}' is given, so user_id and "
                                          f"config belong to its bdev_rbd_register_cluster: drop them here")
        with module.lock:
            cluster = module.clusters.get(p.cluster_name)
            if cluster is None:
                known = ", ".join(sorted(module.clusters)) or "none"
                raise VhostError(errno.ENOENT, f"{method}: no cluster '{p.cluster_name}' is registered "
                                              f"(registered: {known}): bdev_rbd_register_cluster it first")
            cluster.users.add(name)       # held: unregister refuses it meanwhile
    try:
        native = _open(bdevs, method, cluster, p.pool_name, image, snap or None, read_only, p.block_size, module,
                       rados, rbd)
    except BaseException:
        if own:
            cluster.shutdown()
        else:
            with module.lock:
                cluster.users.discard(name)
        raise
    vn = lib.rbdn_bdev_native(native)
    size = lib.rbdn_bdev_image_size(native)
    num_blocks = size // p.block_size
    io_types = {"read", "flush"} if read_only else {"read", "write", "flush", "unmap", "write_zeroes"}
    state: _RbdBdev | None = None

    def destruct() -> None:
        with module.lock:
            if state is not None:
                state.freed = True
                if module.states.get(state.bdev.name) is state:
                    del module.states[state.bdev.name]
            cluster.users.discard(name)
        with state.busy if state is not None else contextlib.nullcontext():
            lib.rbdn_bdev_free(native)
            if own:
                cluster.shutdown()

    where = {"pool_name": p.pool_name, "rbd_name": p.rbd_name}
    if own:
        where["config"] = dict(cluster.config)
        if p.user_id is not None:
            where["user_id"] = p.user_id
    else:
        where["cluster_name"] = cluster.name
    bdev = Bdev(name=name, module=MODULE, product_name="Ceph Rbd Disk", block_size=p.block_size,
                num_blocks=num_blocks, native=int(ffi.cast("uintptr_t", vn)), destruct=destruct, uuid=bdev_uuid,
                io_types=frozenset(io_types), readonly=read_only, driver_specific={"rbd": where})
    state = _RbdBdev(bdev=bdev, native=native, cluster=cluster, pool_name=p.pool_name, rbd_name=p.rbd_name,
                     read_only=read_only)
    if own:
        cluster.users.add(name)
    bdevs.add(bdev)                 # on a name clash it calls destruct(): nothing is left behind
    with module.lock:
        module.states[name] = state
    module.ensure_watcher(bdevs)
    notice(log, "bdev %s: Ceph RBD image %s/%s created: %d blocks of %d bytes%s, %s", name, p.pool_name,
           p.rbd_name, num_blocks, p.block_size, ", read-only" if read_only else "",
           f"cluster {cluster.name}" if cluster.name else f"monitors {cluster.mon_host}; {cluster.submission()}")
    return name


def _open(bdevs: BdevRegistry, method: str, cluster: _Cluster, pool: str, image: str, snap: str | None,
          read_only: bool, block_size: int, module: RbdModule, rados: Any, rbd: Any) -> Any:
    """Check pool, image (and snapshot) with the Python bindings, then open it natively."""
    spec = f"{pool}/{image}" + (f"@{snap}" if snap else "")

    def check() -> int:
        try:
            ioctx = cluster.rados.open_ioctx(pool)
        except rados.ObjectNotFound:
            pools = ", ".join(cluster.rados.list_pools()) or "none"
            raise VhostError(errno.ENOENT, f"{method}: pool '{pool}' does not exist (pools: {pools}): create "
                                          f"it (ceph osd pool create {pool}; rbd pool init {pool}) or fix "
                                          f"pool_name") from None
        try:
            try:
                with rbd.Image(ioctx, image, snapshot=snap, read_only=True) as img:
                    return img.size()
            except rbd.ImageNotFound:
                if snap:
                    try:
                        with rbd.Image(ioctx, image, read_only=True) as img:
                            snaps = ", ".join(s["name"] for s in img.list_snaps()) or "none"
                    except rbd.ImageNotFound:
                        pass
                    else:
                        raise VhostError(errno.ENOENT, f"{method}: image '{pool}/{image}' has no snapshot "
                                                      f"'{snap}' (snapshots: {snaps}): create it (rbd snap "
                                                      f"create {spec}) or fix rbd_name") from None
                images = rbd.RBD().list(ioctx)
                shown = ", ".join(images[:10]) + (", ..." if len(images) > 10 else "") if images else "none"
                raise VhostError(errno.ENOENT, f"{method}: image '{image}' does not exist in pool '{pool}' "
                                              f"(images: {shown}): create it (rbd create --size 1G "
                                              f"{pool}/{image}) or fix rbd_name") from None
        finally:
            ioctx.close()

    try:
        size = _unlocked(bdevs, check, CONNECT_TIMEOUT_S * 2 + 2, f"{method}: looking up {spec}",
                         "the cluster stopped answering (monitors or OSDs down?)")
    except (rados.PermissionError, rados.PermissionDeniedError, rbd.PermissionError) as exc:
        raise VhostError(errno.EACCES, f"{method}: client.{cluster.user_id or 'admin'} may not open {spec} "
                                      f"({exc}): grant it (ceph auth caps ... osd 'profile rbd pool={pool}')"
                       ) from None
    except (rados.Error, rbd.Error) as exc:
        e = getattr(exc, "errno", None) or errno.EIO
        raise VhostError(e, f"{method}: cannot open {spec}: {exc}") from None
    if size == 0 or size % block_size:
        up = max(block_size, -(-size // block_size) * block_size)
        raise VhostError(errno.EINVAL, f"{method}: image {spec} is {size} bytes, not a positive multiple of "
                                      f"block_size {block_size}: resize it (rbd resize --size {up}B {spec}) "
                                      f"or use a block size that divides its size")
    out = ffi.new("void **")
    snap_c = ffi.new("char[]", snap.encode()) if snap else ffi.NULL

    def native_open() -> int:
        return lib.rbdn_bdev_open(cluster.native, pool.encode(), image.encode(), snap_c, int(read_only),
                                  block_size, module.notify_fd, out)

    rc = _unlocked(bdevs, native_open, CONNECT_TIMEOUT_S * 2 + 2, f"{method}: opening {spec}",
                   "the cluster stopped answering (monitors or OSDs down?)")
    if rc < 0:
        raise VhostError(-rc, f"{method}: librbd cannot open {spec}: {os.strerror(-rc)}")
    return out[0]


def _get(module: RbdModule, bdevs: BdevRegistry, method: str, name: str) -> _RbdBdev:
    bdev = bdevs.get(name)
    with module.lock:
        state = module.states.get(bdev.name)
    if bdev.module != MODULE or state is None:
        raise VhostError(errno.EINVAL, f"{method}: bdev '{name}' is a {bdev.module} bdev, not an rbd one")
    return state


def _resize(module: RbdModule, bdevs: BdevRegistry, p: ResizeParams) -> bool:
    method = "bdev_rbd_resize"
    s = _get(module, bdevs, method, p.name)
    bdev = s.bdev
    if s.read_only:
        raise VhostError(errno.EROFS, f"{method}: bdev '{p.name}' is read-only: a read-only image (or a "
                                     f"snapshot) cannot be resized")
    new_bytes = p.new_size * 2**20
    if new_bytes < bdev.size_bytes:
        raise VhostError(errno.EINVAL, f"{method}: new_size {p.new_size} MiB is smaller than bdev '{p.name}' "
                                      f"({bdev.size_bytes / 2**20:g} MiB): shrinking would cut off the "
                                      f"guest's data; give a larger size")
    if new_bytes % bdev.block_size:
        raise VhostError(errno.EINVAL, f"{method}: new_size {p.new_size} MiB is not a multiple of the block size")
    rc = _unlocked(bdevs, lambda: lib.rbdn_bdev_resize(s.native, new_bytes), CONNECT_TIMEOUT_S * 2 + 2,
                   f"{method}: resizing {s.pool_name}/{s.rbd_name}", "the cluster stopped answering")
    if rc < 0:
        raise VhostError(-rc, f"{method}: librbd cannot resize {s.pool_name}/{s.rbd_name}: {os.strerror(-rc)}")
    new = new_bytes // bdev.block_size
    if new != bdev.num_blocks and bdev.name in bdevs:
        notice(log, "bdev %s: resized from %d to %d blocks of %d bytes", bdev.name, bdev.num_blocks, new,
               bdev.block_size)
        bdevs.resize(bdev.name, new)
    return True


def _stats(s: _RbdBdev) -> dict[str, Any] | None:
    if s.freed:
        return None
    st = ffi.new("struct rbdn_stats *")
    lib.rbdn_bdev_get_stats(s.native, st)
    out: dict[str, Any] = {
        "name": s.bdev.name, "pool_name": s.pool_name, "rbd_name": s.rbd_name,
        "completed": {t: st.ops[i] for i, t in enumerate(IO_TYPES)},
        "errors": {t: st.errors[i] for i, t in enumerate(IO_TYPES)},
        "io_errors": sum(st.errors[i] for i in range(len(IO_TYPES))),
        "bytes_read": st.bytes_read, "bytes_written": st.bytes_written, "updates": st.updates,
        "last_error": None,
    }
    if st.last_errno:
        t = st.last_type
        out["last_error"] = {"io_type": IO_TYPES[t] if t < len(IO_TYPES) else str(t), "errno": -st.last_errno,
                             "error": os.strerror(-st.last_errno), "offset_blocks": st.last_offset,
                             "num_blocks": st.last_blocks}
    return out


# --------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------


@hookimpl
def vhost_register_bdev_modules(registry) -> None:
    registry.add(RbdModule())


@hookimpl
def vhost_register_commands(registry) -> None:
    kv = "key=value configuration option(s) for rados_conf_set (default: rely on config file)"
    kv_cluster = Cli(arguments=(CliArg("config_param", ("--config-param",), kv, nargs="+", metavar="key=value"),),
                     to_params=lambda a: {**a, "config_param": _kv_list(a.get("config_param"), "--config-param")})
    kv_create = Cli(arguments=(CliArg("config", ("--config",), kv, nargs="+", metavar="key=value"),),
                    to_params=lambda a: {**a, "config": _kv_list(a.get("config"), "--config")},
                    positionals=("pool_name", "rbd_name", "block_size"))

    @registry.command("bdev_rbd_register_cluster", params=RegisterClusterParams, blocking=True, cli=kv_cluster)
    def bdev_rbd_register_cluster(ctx: CommandContext, p: RegisterClusterParams) -> str:
        """Add a Rados cluster with ceph rbd backend."""
        return _register_cluster(ctx.bdev_module(MODULE), ctx.bdevs, p)

    @registry.command("bdev_rbd_unregister_cluster", params=ClusterNameParams, blocking=True,
                      cli=Cli(prints=False))
    def bdev_rbd_unregister_cluster(ctx: CommandContext, p: ClusterNameParams) -> bool:
        """Unregister a Rados cluster object."""
        return _unregister_cluster(ctx.bdev_module(MODULE), p.name)

    @registry.command("bdev_rbd_get_clusters_info", params=ClustersInfoParams)
    def bdev_rbd_get_clusters_info(ctx: CommandContext, p: ClustersInfoParams) -> Any:
        """Display registered Rados Cluster names and related info."""
        module = ctx.bdev_module(MODULE)
        with module.lock:
            if p.name is None:
                return [c.info() for c in module.clusters.values()]
            c = module.clusters.get(p.name)
            if c is None:
                known = ", ".join(sorted(module.clusters)) or "none"
                raise VhostError(errno.ENOENT, f"bdev_rbd_get_clusters_info: no cluster '{p.name}' is "
                                              f"registered (registered: {known})")
            return c.info()

    @registry.command("bdev_rbd_create", params=CreateParams, aliases=("construct_rbd_bdev",), blocking=True,
                      cli=kv_create)
    def bdev_rbd_create(ctx: CommandContext, p: CreateParams) -> str:
        """Add a bdev with ceph rbd backend."""
        return _create(ctx.bdev_module(MODULE), ctx.bdevs, "bdev_rbd_create", p)

    @registry.command("bdev_rbd_delete", params=NameParams, aliases=("delete_rbd_bdev",), blocking=True,
                      cli=Cli(prints=False))
    def bdev_rbd_delete(ctx: CommandContext, p: NameParams) -> bool:
        """Delete a rbd bdev."""
        _get(ctx.bdev_module(MODULE), ctx.bdevs, "bdev_rbd_delete", p.name)
        ctx.bdevs.delete(p.name, module=MODULE)
        return True

    @registry.command("bdev_rbd_resize", params=ResizeParams, blocking=True)
    def bdev_rbd_resize(ctx: CommandContext, p: ResizeParams) -> bool:
        """Resize a rbd bdev."""
        return _resize(ctx.bdev_module(MODULE), ctx.bdevs, p)

    @registry.command("bdev_rbd_get_stats", params=StatsParams)
    def bdev_rbd_get_stats(ctx: CommandContext, p: StatsParams) -> list[dict[str, Any]]:
        """I/O and error counters of rbd bdevs (this target's own method)."""
        module = ctx.bdev_module(MODULE)
        states = [_get(module, ctx.bdevs, "bdev_rbd_get_stats", p.name)] if p.name is not None else None
        with module.lock:
            if states is None:
                states = list(module.states.values())
            out = [_stats(s) for s in states]
        return [s for s in out if s is not None]
