"""bdev_aio plugin: ``bdev_aio_create`` / ``_delete`` / ``_rescan``: files and block devices.

Everything that can go wrong with the backing file is found here, before a byte of
native state exists: a failed create leaves nothing behind.  The data path is
``aio.c``; this module also reports its I/O errors (rate-limited) from a small
monitor thread, so that the reactor never writes a log line.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import threading
import time
import uuid as uuid_mod
from typing import Any

import attrs

from vhost_core.errors import VhostError
from vhost_core.bdev.interface import IO_TYPES, Bdev, BdevModule, check_block_size
from vhost_core.bdev.registry import BdevRegistry
from vhost_core.commands import Cli, CommandContext, cli, extension, param, unsupported
from vhost_core.hookspecs import hookimpl
from vhost_core.log import get_logger, notice

from vhost_bdev_aio._aio_native import ffi, lib

VHOST_CORE_API = (2,)
log = get_logger("bdev_aio")

BLKSSZGET = 0x1268
BLKGETSIZE64 = 0x80081272
#: ``engine`` values (and the daemon-wide default from this environment variable).
ENGINES = {"aio": lib.AIO_ENGINE_AIO, "io_uring": lib.AIO_ENGINE_URING}
ENGINE_ENV = "VHOST_BDEV_AIO_ENGINE"
#: Set to 1 to treat io_uring as unavailable (a broken io_uring, or tests of the fallback).
NO_URING_ENV = "VHOST_BDEV_AIO_DISABLE_URING"
#: Set to 1 to run Linux AIO's fdatasync on the helper thread, as on kernels without
#: IOCB_CMD_FDSYNC (< 4.18), where it is found out on the first flush anyway.
FSYNC_THREAD_ENV = "VHOST_BDEV_AIO_FSYNC_THREAD"
#: After the first I/O error of a bdev is logged, further ones are summarised at most this often.
ERROR_SUMMARY_S = float(os.environ.get("VHOST_BDEV_AIO_ERROR_SUMMARY_S", "10"))
MONITOR_TICK_S = 1.0


@attrs.frozen
class AioCreateParams:
    """SPDK's parameters (v24.01 to 26.9) and ``engine``, ours."""

    filename: str = param(help="Path to device or file (ex: /dev/sda)")
    name: str = param(help="Block device name")
    # 0: the device's logical block size, 512 for files
    block_size: int = param(0, positional=True, help="Block size for this bdev (default: the device's "
                                                     "logical block size, 512 for files)")
    readonly: bool = param(False, "-r", "--readonly", help="Set this bdev as read-only")
    # None: unmap/write-zeroes where the file or device can; true: required; false: none (SPDK's default)
    fallocate: bool | None = param(None, "--fallocate", help="Require unmap/write_zeroes by fallocate "
                                                             "(default: offered where it works)")
    uuid: str | None = param(None, "-u", "--uuid", help="UUID of the bdev (optional)")
    nowait: bool = unsupported(False, "it does not submit with RWF_NOWAIT (io_uring or its helper thread "
                                      "keep the reactor from blocking): omit --no-wait",
                               cli=cli("--no-wait", help="RWF_NOWAIT (SPDK's option): not supported"))
    engine: str | None = extension(None, "I/O engine: aio (Linux AIO) or io_uring",
                                   cli=cli("--engine", choices=sorted(ENGINES),
                                           help=f"I/O engine (default aio, or ${ENGINE_ENV} of the daemon)"))


@attrs.frozen
class NameParams:
    name: str = param(help="Block device name")


@attrs.frozen
class StatsParams:
    name: str | None = param(None, "-b", "--name", help="aio bdev name (default: all)")


@attrs.define(eq=False)
class _Backing:
    """The opened file, and what the kernel told us about it."""

    fd: int
    is_blockdev: bool
    size: int
    direct: bool
    logical_block_size: int
    align: int
    identity: tuple[int, ...]
    fs_type: str


@attrs.define(eq=False)
class _AioBdev:
    """Module state of one aio bdev (the Bdev object is the registry's)."""

    bdev: Bdev
    native: Any
    fd: int
    filename: str
    is_blockdev: bool
    identity: tuple[int, ...]
    block_size_override: bool
    engine: str
    freed: bool = False
    logged_errors: int = 0
    last_log: float = 0.0
    uring_fallbacks: int = 0


class AioModule(BdevModule):
    """The aio bdev module: its bdevs' state and the thread that reports their errors."""

    def __init__(self) -> None:
        super().__init__("aio")
        self.lock = threading.Lock()
        #: Module state of each aio bdev, by name (the Bdev objects are the registry's).
        self.states: dict[str, _AioBdev] = {}
        self.monitor = _ErrorMonitor(self)

    def config_json(self, bdevs: list[Bdev]) -> list[dict[str, Any]]:
        calls = []
        for b in bdevs:
            with self.lock:
                state = self.states.get(b.name)
            if state is None:
                continue
            params: dict[str, Any] = {"name": b.name, "filename": state.filename, "readonly": b.readonly,
                                      "uuid": b.uuid}
            if state.block_size_override:
                params["block_size"] = b.block_size
            if not b.readonly and not b.driver_specific["aio"]["fallocate"]:
                params["fallocate"] = False     # no unmap now: none after a reload either
            if state.engine != "aio":
                params["engine"] = state.engine
            calls.append({"method": "bdev_aio_create", "params": params})
        return calls

    def fini(self) -> None:
        self.monitor.stop()


# --------------------------------------------------------------------------
# opening and checking the backing file
# --------------------------------------------------------------------------


def _fs_type(dev: int) -> str:
    want = f"{os.major(dev)}:{os.minor(dev)}"
    found = "unknown filesystem"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 2 and fields[2] == want and right:
                    found = right.split()[0]
    except OSError:
        pass
    return found


def _sysfs_queue(dev: int, attr: str) -> int | None:
    """A /sys/.../queue/<attr> value of the block device `dev` (or of its whole disk)."""
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for path in (f"{base}/queue/{attr}", f"{base}/../queue/{attr}"):
        try:
            with open(path) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return None


def _blk_size_bytes(fd: int) -> int:
    return struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]


def _current_size(fd: int, is_blockdev: bool) -> int:
    return _blk_size_bytes(fd) if is_blockdev else os.fstat(fd).st_size


def _open_error(method: str, filename: str, readonly: bool, exc: OSError) -> VhostError:
    e = exc.errno or errno.EIO
    how = "read-only" if readonly else "read-write"
    if e in (errno.EACCES, errno.EPERM):
        fix = ("check its owner and mode (ls -l), its immutable attribute (lsattr; chattr -i), "
               "and any SELinux/AppArmor policy")
        if not readonly:
            fix += ", or create the bdev read-only (readonly=true, -r)"
        return VhostError(e, f"{method}: permission denied opening '{filename}' {how} "
                            f"({os.strerror(e)}): {fix}")
    if e == errno.EROFS:
        return VhostError(e, f"{method}: '{filename}' is on a read-only filesystem: remount it "
                            f"read-write, or create the bdev read-only (readonly=true, -r)")
    if e == errno.EBUSY:
        return VhostError(e, f"{method}: block device '{filename}' is in use (mounted, or held by "
                            f"device-mapper, md or another program): unmount or release it first")
    if e == errno.ENOENT:
        return VhostError(e, f"{method}: '{filename}' does not exist: create it first "
                            f"(e.g. truncate -s 1G {filename}) or fix the path")
    return VhostError(e, f"{method}: cannot open '{filename}' {how}: {os.strerror(e)}")


def _open_backing(method: str, filename: str, readonly: bool) -> _Backing:
    try:
        st = os.stat(filename)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(filename))
        if not os.path.isdir(parent):
            raise VhostError(errno.ENOENT, f"{method}: cannot open '{filename}': directory '{parent}' "
                                          f"does not exist: fix the path") from None
        raise VhostError(errno.ENOENT, f"{method}: '{filename}' does not exist: create it first "
                                      f"(e.g. truncate -s 1G {filename}) or fix the path") from None
    except OSError as exc:
        raise _open_error(method, filename, readonly, exc) from None
    if stat.S_ISDIR(st.st_mode):
        raise VhostError(errno.EISDIR, f"{method}: '{filename}' is a directory: give a regular file "
                                      f"or a block device (e.g. {filename.rstrip('/')}/disk.img)")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise VhostError(errno.EINVAL, f"{method}: '{filename}' is neither a regular file nor a block "
                                      f"device: give a disk image file or a block device such as /dev/sdb")
    is_blockdev = stat.S_ISBLK(st.st_mode)
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    if is_blockdev and not readonly:
        flags |= os.O_EXCL      # refuse a mounted device: we would corrupt its filesystem
    direct = True
    try:
        fd = os.open(filename, flags | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise _open_error(method, filename, readonly, exc) from None
        direct = False
        try:
            fd = os.open(filename, flags)
        except OSError as exc2:
            raise _open_error(method, filename, readonly, exc2) from None
    try:
        st = os.fstat(fd)
        fs_type = "block device" if is_blockdev else _fs_type(st.st_dev)
        if is_blockdev:
            lbs = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
            size = _blk_size_bytes(fd)
            identity: tuple[int, ...] = ("blk", st.st_rdev)
        else:
            lbs = 0
            size = st.st_size
            identity = ("file", st.st_dev, st.st_ino)
        mem, off = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        has_dio_align = lib.aio_dio_align(fd, mem, off) == 0
        if direct and has_dio_align and off[0] == 0:
            # The filesystem accepted O_DIRECT but says it cannot do it.
            os.close(fd)
            fd = os.open(filename, flags)
            direct = False
        if not lbs:
            if has_dio_align and off[0]:
                lbs = off[0]
            else:
                lbs = _sysfs_queue(st.st_dev, "logical_block_size") or 512
        align = lbs
        if direct and has_dio_align:
            align = max(mem[0], off[0], lbs)
        return _Backing(fd=fd, is_blockdev=is_blockdev, size=size, direct=direct,
                        logical_block_size=lbs, align=align, identity=identity, fs_type=fs_type)
    except BaseException:
        os.close(fd)
        raise


def _choose_engine(method: str, name: str, requested: str | None) -> tuple[str, int]:
    engine = requested or os.environ.get(ENGINE_ENV) or "aio"
    if engine not in ENGINES:
        raise VhostError(errno.EINVAL, f"{method}: engine '{engine}' is unknown: use "
                                      f"{' or '.join(sorted(ENGINES))}")
    if engine == "io_uring":
        rc = -errno.ENOSYS if os.environ.get(NO_URING_ENV) == "1" else lib.aio_probe_uring()
        if rc == 0:
            return engine, ENGINES[engine]
        notice(log, "bdev %s: io_uring is not available here (%s); using Linux AIO instead",
               name, os.strerror(-rc))
        engine = "aio"
    rc = lib.aio_probe_kaio()
    if rc:
        hint = " (raise fs.aio-max-nr with sysctl)" if rc == -errno.EAGAIN else ""
        raise VhostError(-rc, f"{method}: Linux AIO is not available: {os.strerror(-rc)}{hint}")
    return engine, ENGINES[engine]


def _parse_uuid(method: str, value: str | None) -> str:
    if value is None:
        return str(uuid_mod.uuid4())
    try:
        return str(uuid_mod.UUID(value))
    except ValueError:
        raise VhostError(errno.EINVAL, f"{method}: uuid '{value}' is not a UUID "
                                      f"(e.g. 1b9e4f5a-6a3c-4a2b-9b8e-0d3c5f7a9e21)") from None


def _create(module: AioModule, bdevs: BdevRegistry, method: str, p: AioCreateParams) -> str:
    if not p.name:
        raise VhostError(errno.EINVAL, f"{method}: name must not be empty")
    if p.name in bdevs:
        raise VhostError(errno.EEXIST, f"{method}: bdev name '{p.name}' is already taken: "
                                      f"pick another name or delete the existing bdev first")
    if p.block_size:
        try:
            check_block_size(p.block_size)
        except ValueError as exc:
            raise VhostError(errno.EINVAL, f"{method}: {exc}") from None
    bdev_uuid = _parse_uuid(method, p.uuid)
    engine, engine_id = _choose_engine(method, p.name, p.engine)
    b = _open_backing(method, p.filename, p.readonly)
    try:
        with module.lock:
            for other in module.states.values():
                if other.identity == b.identity:
                    raise VhostError(errno.EBUSY, f"{method}: '{p.filename}' is already used by aio bdev "
                                                 f"'{other.bdev.name}': two bdevs on one file would "
                                                 f"overwrite each other's data; use that bdev")
        what = "block device" if b.is_blockdev else "file"
        if p.block_size:
            block_size = p.block_size
            if b.direct and block_size % b.logical_block_size:
                raise VhostError(errno.EINVAL, f"{method}: block_size {block_size} is smaller than the "
                                              f"logical block size {b.logical_block_size} of "
                                              f"'{p.filename}': use {b.logical_block_size} or a larger "
                                              f"power of two, or omit block_size")
        else:
            # The device's own block size; for a file, 512 unless O_DIRECT needs more.
            block_size = max(512, b.logical_block_size) if (b.is_blockdev or b.direct) else 512
        if b.size == 0:
            raise VhostError(errno.EINVAL, f"{method}: {what} '{p.filename}' is empty (0 bytes): "
                                          f"give it a size first (truncate -s 1G {p.filename})")
        if b.size % block_size:
            up = -(-b.size // block_size) * block_size
            raise VhostError(errno.EINVAL, f"{method}: {what} '{p.filename}' is {b.size} bytes, not a "
                                          f"multiple of the block size {block_size}: resize it to a "
                                          f"multiple (truncate -s {up} {p.filename}) or use a block "
                                          f"size that divides its size")
        flags = (lib.AIO_F_DIRECT if b.direct else 0)
        if os.environ.get(FSYNC_THREAD_ENV) == "1":
            flags |= lib.AIO_F_FSYNC_ON_HELPER
        unmap = ""
        if p.readonly:
            flags |= lib.AIO_F_READONLY
        elif p.fallocate is not False:
            flags |= lib.AIO_F_WRITE_ZEROES | lib.AIO_F_ZERO_RANGE
            if b.is_blockdev:
                st_rdev = os.fstat(b.fd).st_rdev
                if (_sysfs_queue(st_rdev, "write_zeroes_max_bytes") or 0) > 0:
                    flags |= lib.AIO_F_UNMAP_PUNCH
                    unmap = "unmap by write-zeroes with deallocation"
                elif (_sysfs_queue(st_rdev, "discard_max_bytes") or 0) > 0:
                    flags |= lib.AIO_F_UNMAP_DISCARD
                    unmap = "unmap by discard"
            elif lib.aio_probe_punch(b.fd, b.size, block_size) == 0:
                # Probed past the end of the file: no data is touched.
                flags |= lib.AIO_F_UNMAP_PUNCH
                unmap = "unmap by punching holes"
            if p.fallocate and not unmap:
                raise VhostError(errno.EOPNOTSUPP, f"{method}: fallocate=true, but '{p.filename}' "
                                                  f"({b.fs_type}) cannot punch holes or discard: "
                                                  f"omit fallocate (the bdev then offers no unmap)")
        native = lib.aio_bdev_new(b.fd, block_size, b.size // block_size, b.align, engine_id, flags)
        if native == ffi.NULL:
            raise VhostError(errno.ENOMEM, f"{method}: out of memory creating bdev '{p.name}'")
    except BaseException:
        os.close(b.fd)
        raise
    num_blocks = b.size // block_size
    io_types = {"read", "flush"}
    if not p.readonly:
        io_types.add("write")
        if flags & (lib.AIO_F_UNMAP_PUNCH | lib.AIO_F_UNMAP_DISCARD):
            io_types.add("unmap")
        if flags & lib.AIO_F_WRITE_ZEROES:
            io_types.add("write_zeroes")
    state: _AioBdev | None = None

    def destruct() -> None:
        with module.lock:
            if state is not None:
                s = _stats(state)
                if s is not None:
                    module.monitor.report(state, s, time.monotonic(), final=True)
                state.freed = True
                if module.states.get(state.bdev.name) is state:
                    del module.states[state.bdev.name]
            lib.aio_bdev_free(native)

    bdev = Bdev(
        name=p.name,
        module="aio",
        product_name="AIO disk",
        block_size=block_size,
        num_blocks=num_blocks,
        native=int(ffi.cast("uintptr_t", native)),
        destruct=destruct,
        uuid=bdev_uuid,
        io_types=frozenset(io_types),
        readonly=p.readonly,
        driver_specific={"aio": {"filename": p.filename, "block_size_override": bool(p.block_size),
                                 "readonly": p.readonly, "fallocate": bool(unmap),
                                 "engine": engine, "direct_io": b.direct}},
    )
    state = _AioBdev(bdev=bdev, native=native, fd=b.fd, filename=p.filename, is_blockdev=b.is_blockdev,
                     identity=b.identity, block_size_override=bool(p.block_size), engine=engine)
    bdevs.add(bdev)          # on a name clash it calls destruct(): nothing is left behind
    with module.lock:
        module.states[p.name] = state
    module.monitor.ensure_running()
    if not b.direct:
        notice(log, "bdev %s: '%s' is on a filesystem without O_DIRECT (%s); using buffered I/O: "
                    "durability relies on the fdatasync done for each guest flush", p.name, p.filename,
               b.fs_type)
    notice(log, "bdev %s: AIO disk on %s '%s' created: %d blocks of %d bytes, %s, engine %s%s%s",
           p.name, what, p.filename, num_blocks, block_size, "O_DIRECT" if b.direct else "buffered",
           engine, ", read-only" if p.readonly else "", f", {unmap}" if unmap else "")
    return p.name


def _get(module: AioModule, bdevs: BdevRegistry, method: str, name: str) -> _AioBdev:
    bdev = bdevs.get(name)
    with module.lock:
        state = module.states.get(bdev.name)
    if bdev.module != "aio" or state is None:
        raise VhostError(errno.EINVAL, f"{method}: bdev '{name}' is a {bdev.module} bdev, not an aio one")
    return state


def _rescan(module: AioModule, bdevs: BdevRegistry, method: str, name: str) -> bool:
    state = _get(module, bdevs, method, name)
    bdev = state.bdev
    try:
        size = _current_size(state.fd, state.is_blockdev)
    except OSError as exc:
        raise VhostError(exc.errno or errno.EIO, f"{method}: cannot read the size of '{state.filename}': "
                                                  f"{os.strerror(exc.errno or errno.EIO)}") from None
    bs = bdev.block_size
    if size == 0 or size % bs:
        up = max(bs, -(-size // bs) * bs)
        raise VhostError(errno.EINVAL, f"{method}: '{state.filename}' is now {size} bytes, not a positive "
                                      f"multiple of the block size {bs} of bdev '{bdev.name}': resize it "
                                      f"to a multiple (truncate -s {up} {state.filename}); the bdev keeps "
                                      f"its size of {bdev.num_blocks} blocks")
    new = size // bs
    old = bdev.num_blocks
    if new == old:
        return True
    notice(log, "bdev %s: size changed from %d to %d blocks of %d bytes ('%s' %s)", bdev.name, old, new, bs,
           state.filename, "grew" if new > old else "shrank")
    # Every reactor sees the new size; the devices serving it tell their guests.
    bdevs.resize(bdev.name, new)
    return True


# --------------------------------------------------------------------------
# statistics and rate-limited error reports
# --------------------------------------------------------------------------


def _errname(neg_errno: int) -> str:
    e = -neg_errno
    return f"{os.strerror(e)} ({errno.errorcode.get(e, e)})"


def _stats(state: _AioBdev) -> dict[str, Any] | None:
    """Live counters; None once the bdev is freed.  Call with the module's lock held."""
    if state.freed:
        return None
    s = ffi.new("struct aio_bdev_stats *")
    lib.aio_bdev_get_stats(state.native, s)

    def err(prefix: str) -> dict[str, Any] | None:
        e = getattr(s, f"{prefix}_errno")
        if not e:
            return None
        t = getattr(s, f"{prefix}_type")
        return {"io_type": IO_TYPES[t] if t < len(IO_TYPES) else str(t), "errno": -e,
                "error": os.strerror(-e), "offset_blocks": getattr(s, f"{prefix}_offset"),
                "num_blocks": getattr(s, f"{prefix}_blocks")}

    return {
        "name": state.bdev.name,
        "filename": state.filename,
        "engine": state.engine,
        "completed": {t: s.ops[i] for i, t in enumerate(IO_TYPES)},
        "errors": {t: s.errors[i] for i, t in enumerate(IO_TYPES)},
        "io_errors": sum(s.errors[i] for i in range(len(IO_TYPES))),
        "bytes_read": s.bytes_read,
        "bytes_written": s.bytes_written,
        "bounced": s.bounced,
        "queued_full": s.queued_full,
        "helper_ops": s.helper_ops,
        "uring_fallbacks": s.uring_fallbacks,
        "first_error": err("first"),
        "last_error": err("last"),
    }


class _ErrorMonitor:
    """Logs a bdev's first I/O error at once (within a tick), then at most one summary per
    ERROR_SUMMARY_S: a failing disk costs a few lines, not one per request."""

    def __init__(self, module: AioModule) -> None:
        self._module = module
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="bdev_aio_monitor", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(MONITOR_TICK_S):
            try:
                self.tick(time.monotonic())
            except Exception:
                log.exception("bdev_aio: the error monitor failed")

    def tick(self, now: float) -> None:
        lock = self._module.lock
        with lock:
            states = list(self._module.states.values())
        for state in states:
            with lock:
                s = _stats(state)
                if s is not None:
                    self.report(state, s, now)

    def report(self, state: _AioBdev, s: dict[str, Any], now: float, final: bool = False) -> None:
        """Log what is new in `s` (from _stats), with the module's lock held."""
        name = state.bdev.name
        if s["uring_fallbacks"] > state.uring_fallbacks:
            state.uring_fallbacks = s["uring_fallbacks"]
            notice(log, "bdev %s: a channel could not set up io_uring; it uses Linux AIO", name)
        total = s["io_errors"]
        if total <= state.logged_errors:
            return
        if state.logged_errors == 0:
            f = s["first_error"] or s["last_error"] or {}
            more = f" ({total} errors so far)" if total > 1 else ""
            log.error("bdev %s: %s of %d blocks at block %d of '%s' failed: %s; the guest gets an "
                      "I/O error for that request%s. Further errors are summarised every %g s "
                      "(counters: bdev_aio_get_stats %s)", name, f.get("io_type"), f.get("num_blocks", 0),
                      f.get("offset_blocks", 0), state.filename, _errname(-f.get("errno", errno.EIO)),
                      more, ERROR_SUMMARY_S, name)
        elif final or now - state.last_log >= ERROR_SUMMARY_S:
            last = s["last_error"] or {}
            by_type = ", ".join(f"{t} {n}" for t, n in s["errors"].items() if n)
            log.error("bdev %s: %d more I/O errors since the last report (%d in total: %s); the "
                      "latest: %s of %d blocks at block %d: %s", name, total - state.logged_errors,
                      total, by_type, last.get("io_type"), last.get("num_blocks", 0),
                      last.get("offset_blocks", 0), _errname(-last.get("errno", errno.EIO)))
        else:
            return
        state.logged_errors = total
        state.last_log = now


# --------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------


@hookimpl
def vhost_register_bdev_modules(registry) -> None:
    registry.add(AioModule())


@hookimpl
def vhost_register_commands(registry) -> None:
    @registry.command("bdev_aio_create", params=AioCreateParams, aliases=("construct_aio_bdev",))
    def bdev_aio_create(ctx: CommandContext, p: AioCreateParams) -> str:
        """Add a bdev with aio backend."""
        return _create(ctx.bdev_module("aio"), ctx.bdevs, "bdev_aio_create", p)

    @registry.command("bdev_aio_delete", params=NameParams, aliases=("delete_aio_bdev",), blocking=True,
                      cli=Cli(prints=False))
    def bdev_aio_delete(ctx: CommandContext, p: NameParams) -> bool:
        """Delete an aio disk."""
        _get(ctx.bdev_module("aio"), ctx.bdevs, "bdev_aio_delete", p.name)
        ctx.bdevs.delete(p.name, module="aio")
        return True

    @registry.command("bdev_aio_rescan", params=NameParams)
    def bdev_aio_rescan(ctx: CommandContext, p: NameParams) -> bool:
        """Rescan a bdev size with aio backend."""
        return _rescan(ctx.bdev_module("aio"), ctx.bdevs, "bdev_aio_rescan", p.name)

    @registry.command("bdev_aio_get_stats", params=StatsParams)
    def bdev_aio_get_stats(ctx: CommandContext, p: StatsParams) -> list[dict[str, Any]]:
        """I/O and error counters of aio bdevs."""
        module = ctx.bdev_module("aio")
        states = [_get(module, ctx.bdevs, "bdev_aio_get_stats", p.name)] if p.name is not None else None
        with module.lock:
            if states is None:
                states = list(module.states.values())
            out = [_stats(s) for s in states]
        return [s for s in out if s is not None]
