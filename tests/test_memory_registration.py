"""Memory registration (vhost_core.memory_registration): DMA-capable backends are told
about every guest memory mapping after it is made and before it goes, with the mapping
still in place when they hear of its removal.  Driven through the session's real
memory table code (native mmap of memfds, SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG
payloads as a front-end sends them); the end-to-end use (VFIO mapping guest memory into
an IOMMU) is plugins/bdev_nvme/tests/test_pcie_guest.py.
"""

from __future__ import annotations

import os

import attrs
import pytest

from vhost_core.memory_registration import MemoryRegistry
from vhost_core.vhost_user import messages as m
from vhost_core.vhost_user.connection import Message
from vhost_core.vhost_user.memory_table import MemoryTable

MiB = 1 << 20


def mapped(vaddr: int) -> bool:
    """Whether this process has a mapping starting at vaddr (/proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return any(int(line.split("-", 1)[0], 16) == vaddr for line in f)


class Recorder:
    """A listener that records calls and checks the mapping is there at each one."""

    def __init__(self, fail_register: bool = False) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.fail_register = fail_register

    def mem_register(self, vaddr: int, length: int) -> None:
        assert mapped(vaddr), "registered before it was mapped"
        assert vaddr % 4096 == 0 and length % 4096 == 0
        if self.fail_register:
            raise OSError(12, "no IOMMU room")
        self.calls.append(("reg", vaddr, length))

    def mem_unregister(self, vaddr: int, length: int) -> None:
        assert mapped(vaddr), "unregistered after it was unmapped"
        self.calls.append(("unreg", vaddr, length))

    def live(self) -> set[tuple[int, int]]:
        out: set[tuple[int, int]] = set()
        for op, v, n in self.calls:
            (out.add if op == "reg" else out.discard)((v, n))
        return out


def memfd(size: int) -> int:
    fd = os.memfd_create("vhost-test-memreg")
    os.ftruncate(fd, size)
    return fd


def region(gpa: int, size: int, uva: int) -> m.MemoryRegion:
    return m.MemoryRegion(gpa, size, uva, 0)


def set_mem_table(regions: list[m.MemoryRegion]) -> Message:
    payload = m.MEM_HEADER.pack(len(regions), 0) + b"".join(m.MEM_REGION.pack(*attrs.astuple(r)) for r in regions)
    return Message(m.Request.SET_MEM_TABLE, 0, payload, [memfd(r.memory_size) for r in regions])


def one_region(request: int, r: m.MemoryRegion, with_fd: bool) -> Message:
    return Message(request, 0, bytes(8) + m.MEM_REGION.pack(*attrs.astuple(r)), [memfd(r.memory_size)] if with_fd else [])


@pytest.fixture
def table():
    reg = MemoryRegistry()
    t = MemoryTable("vhost.test", reg)
    yield t, reg
    t.free()


def test_each_mapping_is_registered_after_mmap_and_unregistered_before_munmap(table):
    t, reg = table
    rec = Recorder()
    reg.listen(rec)
    msg = set_mem_table([region(0, 4 * MiB, 0x7000_0000), region(1 << 32, 2 * MiB, 0x9000_0000)])
    new, regions = t.map(msg)
    msg.close_fds()
    # Registered before the table is installed (before any ring can translate into it).
    first = rec.live()
    assert sorted(n for _, n in first) == [2 * MiB, 4 * MiB]
    assert set(reg.regions()) == first
    t.install(new, regions)

    # A new table replaces it: the new regions come first, the old ones go (still mapped
    # while the listener is told, so that it can unmap them from its IOMMU first).
    msg = set_mem_table([region(0, 8 * MiB, 0x7000_0000)])
    new, regions = t.map(msg)
    msg.close_fds()
    t.install(new, regions)
    assert len(rec.live()) == 1 and next(iter(rec.live()))[1] == 8 * MiB
    for vaddr, _ in first:
        assert ("unreg", vaddr, dict(first)[vaddr]) in rec.calls
        assert not mapped(vaddr)

    # A listener that comes later hears of what is there; unlisten takes it all back.
    late = Recorder()
    reg.listen(late)
    assert late.live() == rec.live()
    reg.unlisten(late)
    assert late.live() == set() and len(late.calls) == 2

    t.free()
    assert rec.live() == set() and reg.regions() == []


def test_hot_plugged_regions_register_alone_and_a_removed_one_waits_for_the_graveyard(table):
    t, reg = table
    rec = Recorder()
    reg.listen(rec)
    msg = set_mem_table([region(0, 4 * MiB, 0x7000_0000)])
    t.install(*t.map(msg))
    msg.close_fds()
    base = rec.live()

    dimm = region(8 << 30, 2 * MiB, 0xA000_0000)
    msg = one_region(m.Request.ADD_MEM_REG, dimm, True)
    new, r = t.with_region(msg)
    msg.close_fds()
    added = rec.live() - base
    assert len(added) == 1 and next(iter(added))[1] == 2 * MiB
    t.install(new, t.regions + [r])
    assert rec.live() == base | added       # the old table's regions were not re-registered

    msg = one_region(m.Request.REM_MEM_REG, dimm, False)
    new, gone, r = t.without_region(msg)
    t.install(new, [x for x in t.regions if x != r])
    t.graveyard.append(gone)
    # Requests fetched before the removal may still write there: still registered.
    assert rec.live() == base | added
    t.free_graveyard()
    assert rec.live() == base
    assert not mapped(next(iter(added))[0])


def test_a_listener_that_cannot_map_fails_its_own_listen_whole_and_never_the_table(table, caplog):
    t, reg = table
    good = Recorder()
    reg.listen(good)
    msg = set_mem_table([region(0, 4 * MiB, 0x7000_0000), region(1 << 32, 2 * MiB, 0x9000_0000)])
    t.install(*t.map(msg))
    msg.close_fds()

    class FailsSecond(Recorder):
        def mem_register(self, vaddr, length):
            if self.calls:
                raise OSError(28, "IOMMU full")
            super().mem_register(vaddr, length)

    bad = FailsSecond()
    with pytest.raises(OSError, match="IOMMU full"):
        reg.listen(bad)
    # The one it did register was taken back: nothing half-registered.
    assert bad.live() == set() and len(bad.calls) == 2
    reg.unlisten(bad)                       # not a listener: nothing happens
    assert len(bad.calls) == 2

    # At run time, a failing listener costs only itself: the table goes in, the others map.
    failing = Recorder()
    reg.listen(failing)
    failing.fail_register = True            # its IOMMU has no room left
    msg = set_mem_table([region(0, 8 * MiB, 0x7000_0000)])
    new, regions = t.map(msg)
    msg.close_fds()
    t.install(new, regions)
    assert len(good.live()) == 1
    assert "cannot map" in caplog.text and "no IOMMU room" in caplog.text


def test_a_stale_registration_is_replaced_not_refused():
    """Guest memory is never refused for the registry's sake: a mapping at an address still
    registered (freed without being unregistered) replaces the old entry, and the listeners
    hear of both."""
    reg = MemoryRegistry()
    calls: list[tuple[str, int, int]] = []

    class L:
        def mem_register(self, v, n):
            calls.append(("reg", v, n))

        def mem_unregister(self, v, n):
            calls.append(("unreg", v, n))

    reg.listen(L())
    reg.register(0x10000, 4096)
    reg.register(0x10000, 8192)
    assert calls == [("reg", 0x10000, 4096), ("unreg", 0x10000, 4096), ("reg", 0x10000, 8192)]
    assert reg.regions() == [(0x10000, 8192)]
