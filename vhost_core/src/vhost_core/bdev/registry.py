"""The daemon's bdevs by name, and the descriptors through which devices use them.

A device does not take a bdev, it opens it (SPDK's ``spdk_bdev_open_ext``)::

    desc = bdevs.open("Malloc0", "vhost.0", reactor=ctx.reactor,
                      on_remove=self.bdev_removed, on_resize=self.bdev_resized)
    ...  # hand desc.address to the device's C half, which submits through it
    desc.close()

The descriptor is the device's use of the bdev, its callbacks, and (with a reactor)
the bdev's channel on that reactor, whose I/O the core counts and times.  Opening does
not claim: as in SPDK, any number of devices (a vhost-blk and a vhost-scsi target, two
VMs sharing a read-only base image) may have one bdev open at once; only a module that
builds on a bdev (``claim=True``) takes it exclusively.  ``close()``
waits for the I/O in flight (with the control lock released), lets the channel go,
releases a claim, drops the callbacks and folds the descriptor's counters into the
bdev's (``bdev_get_iostat`` outlives it).  Deleting a bdev calls each descriptor's
``on_remove`` (the device fails new I/O and closes it), closes what is still open,
then frees the bdev; :meth:`BdevRegistry.resize` calls each ``on_resize``.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

from vhost_core.errors import VhostError
from vhost_core.bdev.interface import QOS_LIMITS, Bdev
from vhost_core.bdev.iostat import WORDS as IOSTAT_WORDS, IoStat
from vhost_core.log import get_logger, notice

log = get_logger("bdev")

#: How long closing a descriptor waits for the bdev I/O in flight.
CLOSE_TIMEOUT_S = 30.0
#: How often that wait looks again.
CLOSE_POLL_S = 0.001
#: Native QoS state of bdevs deleted while I/O was stuck in them: a stuck descriptor
#: may still look at it, so it is never freed.
_LEAKED_QOS: list[Any] = []

Callback = Callable[["BdevDescriptor"], None]


class BdevDescriptor:
    """An open bdev: what a device holds while it uses one (SPDK's ``spdk_bdev_desc``).

    ``bdev``: the bdev (geometry, name); ``owner``: who opened it (a controller name);
    ``address``: the native ``struct vn_bdev_desc *`` (vhost_native.h) the device's C
    half submits through, 0 without a reactor.  Made by :meth:`BdevRegistry.open`.
    """

    def __init__(self, registry: BdevRegistry, bdev: Bdev, owner: str, reactor: Any, claim: bool,
                 on_remove: Callback | None, on_resize: Callback | None) -> None:
        self._registry = registry
        self.bdev = bdev
        self.owner = owner
        self.claim = claim
        self.on_remove = on_remove
        self.on_resize = on_resize
        self._native: Any = None
        self._state = "open"
        #: Its I/O never completed: the native half stays on the reactor (leaked).
        self.stuck = False
        if reactor is not None:
            from vhost_core.native import ffi, lib

            err = ffi.new("int *")
            native = lib.vn_desc_open(reactor.native, ffi.cast("vn_bdev *", bdev.native), err)
            if native == ffi.NULL:
                raise OSError(-err[0], f"cannot open bdev '{bdev.name}' on reactor {reactor.core}")
            # Freed when the last reference goes (the device's C half may keep reading
            # the closed descriptor until the device is freed).
            self._native = ffi.gc(native, lib.vn_desc_free)

    @property
    def address(self) -> int:
        if self._native is None:
            return 0
        from vhost_core.native import ffi

        return int(ffi.cast("uintptr_t", self._native))

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    @property
    def in_flight(self) -> int:
        """bdev I/O submitted through this descriptor and not completed (read racily)."""
        if self._native is None:
            return 0
        from vhost_core.native import lib

        return int(lib.vn_desc_in_flight(self._native))

    def iostat(self) -> IoStat:
        """What completed through this descriptor (bdev_get_iostat)."""
        if self._native is None:
            return IoStat()
        from vhost_core.native import ffi, lib

        words = ffi.new("uint64_t[]", IOSTAT_WORDS)
        lib.vn_desc_get_iostat(self._native, words)
        return IoStat.from_words(list(words))

    def reset_iostat_maxmin(self) -> None:
        if self._native is not None and not self.closed:
            from vhost_core.native import lib

            lib.vn_desc_reset_iostat_maxmin(self._native)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Let go of the bdev: new I/O fails at once, the I/O in flight is waited for
        (with the control lock released), then the channel goes, the claim and the
        callbacks are dropped and the counters stay with the bdev.  Idempotent; a
        second caller waits for the first."""
        if self._state == "closed":
            return
        if self._state == "closing":
            while self._state != "closed":
                self._registry.wait_unlocked(CLOSE_POLL_S)
            return
        self._state = "closing"
        try:
            if self._native is not None:
                self._drain(timeout_s)
        finally:
            self.bdev.iostat_retired.add(self.iostat())
            if self in self.bdev.descriptors:
                self.bdev.descriptors.remove(self)
            self.on_remove = self.on_resize = None
            self._state = "closed"

    def _drain(self, timeout_s: float) -> None:
        from vhost_core.native import lib

        deadline = time.monotonic() + timeout_s
        left = lib.vn_desc_close(self._native)
        while left > 0 and time.monotonic() < deadline:
            self._registry.wait_unlocked(CLOSE_POLL_S)
            left = lib.vn_desc_close(self._native)
        if left > 0:
            self.stuck = True
            log.error("bdev %s: %d I/O of %s still in flight after %d s; letting go of it anyway: the bdev "
                      "is not freed until the daemon exits", self.bdev.name, left, self.owner, timeout_s)

    def __repr__(self) -> str:
        return f"<BdevDescriptor {self.bdev.name} of {self.owner} ({self._state})>"


class BdevRegistry:
    def __init__(self) -> None:
        self._bdevs: dict[str, Bdev] = {}
        #: Waits that must not hold up the control plane (draining a descriptor) call
        #: this; the daemon sets it to a wait that releases its control lock.
        self.wait_unlocked: Callable[[float], Any] = time.sleep
        #: The daemon's control lock (a context manager; the daemon sets it to its own),
        #: which every command handler runs under.  A module that learns of a change on a
        #: thread of its own (an NVMe controller lost for good, an RBD image resized or
        #: removed from outside) holds it around its calls to ``resize`` or ``delete``.
        #: Never hold it while waiting for the network.
        self.lock: Any = threading.RLock()

    def __iter__(self) -> Iterator[Bdev]:
        return iter(list(self._bdevs.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._bdevs

    def add(self, bdev: Bdev) -> Bdev:
        """Register ``bdev`` (on refusal it is destructed and a VhostError raised)."""
        from vhost_core.native import abi_mismatch, bdev_ops_address

        why = abi_mismatch(f"bdev '{bdev.name}' (module {bdev.module})",
                           bdev_ops_address(bdev.native) if bdev.native else 0)
        if why is not None:
            bdev.destruct()
            log.error("%s", why)
            raise VhostError(errno.EPROTO, why)
        if bdev.name in self._bdevs or any(bdev.name in b.aliases for b in self._bdevs.values()):
            bdev.destruct()
            raise VhostError(errno.EEXIST, f"bdev name '{bdev.name}' is already taken: "
                                          f"pick another name or delete the existing bdev first")
        self._bdevs[bdev.name] = bdev
        return bdev

    def get(self, name: str) -> Bdev:
        bdev = self._bdevs.get(name)
        if bdev is None:
            for b in self._bdevs.values():
                if name in b.aliases:
                    return b
            known = ", ".join(sorted(self._bdevs)) or "none"
            raise VhostError(errno.ENODEV, f"bdev '{name}' does not exist (existing bdevs: {known}); "
                                          f"create it first, e.g. bdev_malloc_create")
        return bdev

    def open(self, name: str, owner: str, *, reactor: Any = None, claim: bool = False,
             on_remove: Callback | None = None, on_resize: Callback | None = None) -> BdevDescriptor:
        """Open bdev ``name`` for ``owner`` (a controller name).

        :param reactor: the device's reactor: the bdev's channel is made there and the
            descriptor's ``address`` is what the device's C half submits through.
            None: a control-plane-only descriptor (callbacks and claim, no I/O).
        :param claim: hold the bdev exclusively for ``owner`` (SPDK's module claim, for
            a module that builds on the bdev); False (devices): share it with every other
            opener.  While another owner claims it, or when a claim is asked while others
            have it open, ``EBUSY``.
        :param on_remove: ``cb(desc)`` when the bdev is being deleted: fail new I/O and
            ``desc.close()`` (the registry closes what is left open after it).  Every
            opener's is called.
        :param on_resize: ``cb(desc)`` after ``desc.bdev.num_blocks`` changed (every
            opener's).
        """
        bdev = self.get(name)
        if bdev.deleting:
            raise VhostError(errno.EBUSY, f"bdev '{name}' is being deleted")
        holder = bdev.claimed_by
        if holder is not None and holder != owner:
            raise VhostError(errno.EBUSY, f"bdev '{name}' is claimed exclusively by '{holder}': "
                                         f"open the bdev built on it instead, or delete '{holder}' first")
        others = sorted({d.owner for d in bdev.descriptors if d.owner != owner})
        if claim and others:
            raise VhostError(errno.EBUSY, f"bdev '{name}' cannot be claimed by '{owner}': it is open by "
                                         f"{', '.join(others)}; delete those controllers (or their "
                                         f"targets) first")
        try:
            desc = BdevDescriptor(self, bdev, owner, reactor, claim, on_remove, on_resize)
        except OSError as exc:
            raise VhostError(exc.errno or errno.EIO, str(exc.strerror or exc)) from None
        bdev.descriptors.append(desc)
        if desc._native is not None and any(bdev.qos_limits.values()):
            from vhost_core.native import lib

            lib.vn_desc_set_qos(desc._native, bdev.qos_native)
        return desc

    def set_qos(self, name: str, limits: dict[str, int]) -> dict[str, int]:
        """Set some of ``bdev_set_qos_limit``'s limits (SPDK's units: IOPS, MiB/s; 0
        clears one; absent ones stay) on bdev ``name``: every descriptor of it, on every
        reactor, throttles through one shared set of token buckets.  Returns the limits
        now in force."""
        from vhost_core.native import ffi, lib

        bdev = self.get(name)
        new = {**bdev.qos_limits, **limits}
        if bdev.qos_native is None and any(new.values()):
            q = lib.vn_qos_new()
            if q == ffi.NULL:
                raise VhostError(errno.ENOMEM, f"bdev '{name}': no memory for its QoS state")
            bdev.qos_native = ffi.gc(q, lib.vn_qos_free)
        if bdev.qos_native is not None:
            for i, key in enumerate(QOS_LIMITS):
                per_sec = new[key] if i == 0 else new[key] << 20
                lib.vn_qos_set_limit(bdev.qos_native, i, per_sec, 1 if i == 0 else 512)
            on = bdev.qos_native if any(new.values()) else ffi.NULL
            for desc in bdev.descriptors:
                if desc._native is not None and not desc.closed:
                    lib.vn_desc_set_qos(desc._native, on)
        bdev.qos_limits = new
        return dict(new)

    def resize(self, name: str, num_blocks: int) -> None:
        """The bdev's module changed its size: every reactor and every device learns it."""
        bdev = self.get(name)
        if bdev.native:
            from vhost_core.native import ffi, lib

            lib.vn_bdev_set_num_blocks(ffi.cast("vn_bdev *", bdev.native), num_blocks)
        bdev.num_blocks = num_blocks
        for desc in list(bdev.descriptors):
            if desc.on_resize is None:
                continue
            try:
                desc.on_resize(desc)
            except Exception:
                log.exception("bdev %s: the resize callback of %s failed", bdev.name, desc.owner)

    def delete(self, name: str, module: str | None = None) -> None:
        """Remove a bdev: whoever has it open is told first (hot-detach) and lets go,
        then it is freed."""
        bdev = self.get(name)
        if module is not None and bdev.module != module:
            raise VhostError(errno.EINVAL, f"bdev '{name}' is a {bdev.module} bdev, not {module}: "
                                          f"use bdev_{bdev.module}_delete")
        if bdev.deleting:
            raise VhostError(errno.EBUSY, f"bdev '{name}' is already being deleted")
        bdev.deleting = True
        opened = list(bdev.descriptors)
        for desc in opened:
            if desc.on_remove is None:
                continue
            try:
                desc.on_remove(desc)
            except Exception:
                log.exception("bdev %s: the removal callback of %s failed", name, desc.owner)
        for desc in list(bdev.descriptors):
            desc.close()
        del self._bdevs[bdev.name]
        if any(desc.stuck for desc in opened):
            _LEAKED_QOS.append(bdev.qos_native)
            log.error("bdev %s: deleted with I/O that never completed; its memory is not freed", name)
            return
        if bdev.drain is not None:
            bdev.drain(self.wait_unlocked)
        bdev.destruct()
        notice(log, "bdev %s deleted", name)
