"""Pure-Python bdevs: the core's adapter between a Python object and the native data path.

A third party that does not want to write C implements :class:`PythonBdev` (a few
methods on any object) and turns it into a registered bdev::

    from vhost_core.bdev.python_adapter import make_python_bdev

    bdev = make_python_bdev("Example0", MyDisk(), module="example", product_name="Example disk")
    ctx.bdevs.add(bdev)          # in a command; now vhost_create_blk_controller can serve it

How an I/O flows: the device type (vhost-blk, vhost-scsi) calls the adapter's native
``submit`` on its reactor thread; the I/O is queued and an eventfd wakes the bdev's
Python worker thread (one per adapter bdev), which takes a batch, calls the object's
methods with the GIL held, copies data between them and the guest's buffers, and
hands each I/O back to the submitting reactor, where the completion runs.  Python
never runs on a reactor thread.  Expect tens of thousands of I/Os per second, not
millions: this is the path for prototypes, remote/unusual backends and tests.

Threading: every method of the object is called from that one worker thread, one
I/O at a time (no locking needed inside the object), except ``close()``, which the
control plane calls after the worker stopped.

Errors: raise ``OSError`` (its ``errno`` becomes the I/O status, ``EIO`` if unset);
any other exception fails the I/O with ``EIO`` and is logged (the first one per
bdev with its traceback, later ones counted).  The guest sees an I/O error either
way; the daemon and the bdev keep serving.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any, Callable, Protocol, runtime_checkable

from vhost_core.bdev.interface import IO_TYPES, Bdev, check_block_size, io_type_mask
from vhost_core.log import get_logger

log = get_logger("bdev_python")

#: Most I/Os the worker takes from the queue at once.
BATCH = 64
#: How long deleting a bdev waits for its worker to finish the I/O in hand.
STOP_TIMEOUT_S = 30
#: Largest zero buffer written at once when write_zeroes/unmap is emulated with write().
_ZERO_CHUNK = 1 << 20

_READ, _WRITE, _FLUSH, _UNMAP, _WRITE_ZEROES, _RESET = range(len(IO_TYPES))


@runtime_checkable
class PythonBdev(Protocol):
    """What a pure-Python block device provides.

    Required:

    ``block_size: int``
        bytes per block, a power of two from 512 to 65536.
    ``num_blocks: int``
        capacity in blocks (read once, when the bdev is made).
    ``read(offset_blocks: int, num_blocks: int) -> bytes``
        return exactly ``num_blocks * block_size`` bytes.  Not needed when the
        object has ``readinto``.
    ``write(offset_blocks: int, data: bytes) -> None``
        store ``data`` (a whole number of blocks) from ``offset_blocks`` on.  ``data``
        is a ``bytes`` copy: keeping it, or slices of it, is safe.

    Optional (looked up once, with ``getattr``; a missing method means the I/O
    type is not offered to the guest, except as stated):

    ``readinto(offset_blocks: int, buffers: list[memoryview]) -> None``
        fill the buffers, in order, with the blocks from ``offset_blocks`` on
        (their total length is a whole number of blocks).  They are the guest's own
        memory: no copy, but valid only during the call; never keep them.  Used
        instead of ``read`` when present.
    ``flush() -> None``
        make completed writes durable.  Without it, flush is not offered (virtio-blk
        drivers then treat the disk as write-through).
    ``unmap(offset_blocks: int, num_blocks: int) -> None``
        discard; reads of the range may return anything afterwards (zeroes are
        kindest).  Without it, discard is not offered.
    ``write_zeroes(offset_blocks: int, num_blocks: int) -> None``
        the range reads back as zeroes.  Without it, the adapter writes zero blocks
        through ``write`` (so write_zeroes is always offered on a writable bdev).
    ``close() -> None``
        the bdev was deleted and no I/O is outstanding: release resources.
    """

    block_size: int
    num_blocks: int

    def write(self, offset_blocks: int, data: bytes) -> None: ...


class _Worker:
    """The Python half of one adapter bdev: the native object and its worker thread."""

    def __init__(self, name: str, impl: Any, io_types: frozenset[str]) -> None:
        from vhost_core.native import ffi, lib

        self._ffi, self._lib = ffi, lib
        self.name = name
        self.impl = impl
        self.block_size = int(impl.block_size)
        self.num_blocks = int(impl.num_blocks)
        self.native = lib.pyb_bdev_new(self.block_size, self.num_blocks, io_type_mask(io_types))
        if self.native == ffi.NULL:
            raise MemoryError(f"bdev {name}: cannot allocate the Python-bdev adapter")
        self._readinto = getattr(impl, "readinto", None)
        self._errors = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"pybdev-{name}", daemon=True)
        self._thread.start()

    @property
    def vn_bdev(self) -> int:
        return int(self._ffi.cast("uintptr_t", self._lib.pyb_bdev_vn(self.native)))

    # ------------------------------------------------------------ worker thread

    def _run(self) -> None:
        ffi, lib = self._ffi, self._lib
        fd = lib.pyb_bdev_submit_fd(self.native)
        reqs = ffi.new("struct pyb_req[]", BATCH)
        while True:
            os.read(fd, 8)                       # sleeps without the GIL
            while True:
                n = lib.pyb_bdev_take(self.native, reqs, BATCH)
                for i in range(n):
                    req = reqs[i]
                    lib.pyb_bdev_complete(self.native, req.handle, self._serve(req))
                if n < BATCH:
                    break
            if self._stopping and lib.pyb_bdev_queued(self.native) == 0:
                return

    def _serve(self, req) -> int:
        try:
            t, off, n = req.type, req.offset_blocks, req.num_blocks
            if t != _FLUSH and (off > self.num_blocks or n > self.num_blocks - off):
                return -errno.EINVAL
            if t == _READ:
                self._read(off, n, self._buffers(req))
            elif t == _WRITE:
                self.impl.write(off, b"".join(bytes(b) for b in self._buffers(req)))
            elif t == _FLUSH:
                self.impl.flush()
            elif t == _UNMAP:
                self.impl.unmap(off, n)
            elif t == _WRITE_ZEROES:
                self._write_zeroes(off, n)
            else:
                return -errno.ENOTSUP
            return 0
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        except Exception:
            self._errors += 1
            if self._errors == 1:
                log.exception("bdev %s: the Python bdev failed an I/O (EIO to the guest); "
                              "later failures are only counted", self.name)
            return -errno.EIO

    def _buffers(self, req) -> list[memoryview]:
        ffi = self._ffi
        return [memoryview(ffi.buffer(ffi.cast("char *", req.iov[i].iov_base), req.iov[i].iov_len))
                for i in range(req.iovcnt)]

    def _read(self, off: int, n: int, bufs: list[memoryview]) -> None:
        if self._readinto is not None:
            self._readinto(off, bufs)
            return
        data = self.impl.read(off, n)
        if len(data) != n * self.block_size:
            raise ValueError(f"read({off}, {n}) returned {len(data)} bytes, "
                             f"expected {n * self.block_size}")
        pos = 0
        for b in bufs:
            b[:] = data[pos:pos + len(b)]
            pos += len(b)

    def _write_zeroes(self, off: int, n: int) -> None:
        wz = getattr(self.impl, "write_zeroes", None)
        if wz is not None:
            wz(off, n)
            return
        step = max(1, _ZERO_CHUNK // self.block_size)
        zero = bytes(min(n, step) * self.block_size)
        while n > 0:
            k = min(n, step)
            self.impl.write(off, zero if k * self.block_size == len(zero) else bytes(k * self.block_size))
            off += k
            n -= k

    # ------------------------------------------------------------ control plane

    def drain(self, wait: Callable[[float], Any]) -> None:
        """Stop the worker once it served what was queued, waiting with ``wait`` (the
        registry's, which releases the control lock).  Called by the bdev registry before
        :meth:`destruct`."""
        if self.native == self._ffi.NULL or self._stopping:
            return
        self._stopping = True
        self._lib.pyb_bdev_shutdown(self.native)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self._thread.is_alive() and time.monotonic() < deadline:
            wait(0.01)

    def destruct(self) -> None:
        """Free the native half and close the object (after :meth:`drain`, or stopping the
        worker here).  Called once by the bdev registry."""
        if self.native == self._ffi.NULL:
            return
        if not self._stopping:
            self.drain(time.sleep)
        if self._thread.is_alive():
            # A method that never returns: the worker still holds an I/O of this
            # native object, so it must outlive the bdev (leaked, not freed).
            log.error("bdev %s: the Python bdev did not finish its I/O within %d s of being deleted; "
                      "its worker thread is abandoned", self.name, STOP_TIMEOUT_S)
            self.native = self._ffi.NULL
            return
        self._lib.pyb_bdev_free(self.native)
        self.native = self._ffi.NULL
        close = getattr(self.impl, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("bdev %s: close() failed", self.name)


def python_io_types(impl: Any, readonly: bool = False) -> frozenset[str]:
    """The I/O types a Python bdev object supports (see :class:`PythonBdev`)."""
    types = {"read"}
    if not readonly:
        types |= {"write", "write_zeroes"}
        if callable(getattr(impl, "unmap", None)):
            types.add("unmap")
    if callable(getattr(impl, "flush", None)):
        types.add("flush")
    return frozenset(types)


def make_python_bdev(name: str, impl: Any, *, module: str, product_name: str = "Python disk",
                     uuid: str | None = None, readonly: bool = False,
                     driver_specific: dict[str, Any] | None = None) -> Bdev:
    """Wrap a :class:`PythonBdev` object as a :class:`~vhost_core.bdev.interface.Bdev`.

    The result is not registered yet: add it with ``ctx.bdevs.add(bdev)`` (which
    destructs it if the name is taken).  Deleting the bdev stops its worker and
    calls ``impl.close()``.

    :raises ValueError: ``block_size``/``num_blocks`` unusable, or neither ``read``
        nor ``readinto`` (nor ``write`` on a writable bdev) is implemented.
    """
    check_block_size(int(impl.block_size))
    if int(impl.num_blocks) <= 0:
        raise ValueError(f"bdev {name}: num_blocks must be positive, got {impl.num_blocks}")
    if not (callable(getattr(impl, "readinto", None)) or callable(getattr(impl, "read", None))):
        raise ValueError(f"bdev {name}: {type(impl).__name__} implements neither read() nor readinto()")
    if not readonly and not callable(getattr(impl, "write", None)):
        raise ValueError(f"bdev {name}: {type(impl).__name__} has no write(): pass readonly=True")
    io_types = python_io_types(impl, readonly)
    worker = _Worker(name, impl, io_types)
    kwargs: dict[str, Any] = {} if uuid is None else {"uuid": uuid}
    return Bdev(name=name, module=module, product_name=product_name, block_size=worker.block_size,
                num_blocks=worker.num_blocks, native=worker.vn_bdev, destruct=worker.destruct, drain=worker.drain,
                io_types=io_types, readonly=readonly, driver_specific=dict(driver_specific or {}),
                **kwargs)
