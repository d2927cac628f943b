"""The bdev conformance suite: what every bdev backend must do, checked the same way for all.

Usage (one import, in your plugin's ``tests/test_conformance.py``)::

    import pytest
    from vhost_core.testing.conformance.bdev import BdevConformance, BdevRecipe


    class TestMyBdev(BdevConformance):
        @pytest.fixture
        def bdev_recipe(self, tmp_path):
            return BdevRecipe("bdev_example_create",
                              {"name": "Example0", "num_blocks": 8192, "block_size": 512},
                              delete_method="bdev_example_delete")

Run it with pytest and vhost-core's pytest plugin, which provides the ``vhost_daemon``
fixture the suite uses: ``pytest_plugins = ["vhost_core.testing.pytest_plugin"]`` in
your ``tests/conftest.py`` (or ``pytest -p vhost_core.testing.pytest_plugin``).
The fixture may depend on other fixtures (``tmp_path`` for a backing file, a
parametrised fixture to run the suite over several configurations...).

What it checks, each test on a fresh daemon (interrupt mode, core 0): the bdev's
``bdev_get_bdevs`` entry and two controllers sharing it; through a vhost-blk controller (so vhost-dev-blk
must be installed: every test fails and says so otherwise, a suite that did not run
must not pass) and the fake front-end:
write/read round trips (one block, many blocks, many small segments, first and last
block), flush, unmap and write_zeroes reading back zeroes (when the bdev offers
them), out-of-bounds I/O failing with IOERR, read-only controllers, concurrent I/O
on two queues, deleting the bdev while I/O is in flight (every I/O completes, OK or
IOERR, later I/O fails, the daemon keeps serving), deleting a bdev a controller has open, and
re-creating a bdev under the same name.

Recipe flags for backends that cannot keep data: ``data_integrity=False`` (reads are
not compared, e.g. a null bdev), ``unmap_reads_zeroes=False`` (unmapped blocks may
read back as anything).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import attrs
import pytest

from vhost_core.rpc.registry import RpcError
from vhost_core.testing.constants import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_RING_F_INDIRECT_DESC,
    VirtioBlkFeature,
)
from vhost_core.testing.blk import BlkIOError, BlkRequest, VirtioBlkDevice, connect_blk
from vhost_core.testing.daemon import wait_no_session

__all__ = ["BdevConformance", "BdevRecipe"]

CTRLR = "conformance.0"
NEEDS_BLK = "the bdev conformance suite drives bdevs through vhost-blk: pip install vhost-dev-blk"
SECTOR = 512


@attrs.frozen
class BdevRecipe:
    """How to make (and delete) the bdev under test over JSON-RPC.

    ``create_method``/``params``: the create call; it must return the bdev's name, as
    SPDK's ``bdev_*_create`` methods do.  ``delete_method`` is called as
    ``{"name": <name>}`` (default: the core's ``delete_bdev``, which deletes a bdev
    of any module).  ``data_integrity``: reads return what was written (False for a
    null bdev).  ``unmap_reads_zeroes``: unmapped blocks read back as zeroes.
    """

    create_method: str
    params: dict[str, Any] = attrs.field(factory=dict)
    delete_method: str | None = None
    data_integrity: bool = True
    unmap_reads_zeroes: bool = True
    #: For a create method that answers a list of bdev names (SPDK's
    #: ``bdev_nvme_attach_controller``): the one under test.  None: it answers the name.
    bdev_name: str | None = None
    #: Parameters of the delete call (default ``{"name": <bdev name>}``): e.g. the
    #: controller's name for ``bdev_nvme_detach_controller``.
    delete_params: dict[str, Any] | None = None


@attrs.frozen
class BdevUnderTest:
    """What the suite's tests receive: the daemon, the recipe, and the bdev as listed."""

    daemon: Any
    recipe: BdevRecipe
    name: str
    block_size: int
    num_blocks: int
    io_types: dict[str, bool]

    @property
    def sectors_per_block(self) -> int:
        return self.block_size // SECTOR

    def sector(self, block: int) -> int:
        return block * self.sectors_per_block

    def pattern(self, block: int, nblocks: int, seed: int = 0) -> bytes:
        """Distinct, position-dependent data (a misplaced block is caught)."""
        out = bytearray()
        for b in range(block, block + nblocks):
            head = f"{seed}:{b}:".encode()
            out += (head * (self.block_size // len(head) + 1))[:self.block_size]
        return bytes(out)

    def delete(self) -> None:
        method = self.recipe.delete_method or "delete_bdev"
        self.daemon.rpc(method, **(self.recipe.delete_params or {"name": self.name}))


def _create(daemon, recipe: BdevRecipe) -> BdevUnderTest:
    name = daemon.rpc(recipe.create_method, **recipe.params)
    if recipe.bdev_name is not None:
        assert isinstance(name, list) and recipe.bdev_name in name, \
            f"{recipe.create_method} answered {name!r}, without {recipe.bdev_name!r}"
        name = recipe.bdev_name
    assert isinstance(name, str) and name, f"{recipe.create_method} must return the bdev name, got {name!r}"
    info = daemon.rpc("bdev_get_bdevs", name=name)[0]
    return BdevUnderTest(daemon, recipe, name, info["block_size"], info["num_blocks"],
                         info["supported_io_types"])


class BdevConformance:
    """Subclass it and provide the ``bdev_recipe`` fixture (see the module docstring)."""

    @pytest.fixture
    def bdev_recipe(self) -> BdevRecipe:
        pytest.fail(f"{type(self).__name__} runs the bdev conformance suite without a bdev: "
                    f"override the bdev_recipe fixture (see vhost_core.testing.conformance.bdev)")

    @pytest.fixture
    def bdev_under_test(self, vhost_daemon, bdev_recipe) -> BdevUnderTest:
        return _create(vhost_daemon, bdev_recipe)

    @pytest.fixture
    def blk_controller(self, bdev_under_test):
        """A vhost-blk controller (2 queues) on the bdev; returns its socket path."""
        d = bdev_under_test.daemon
        if "vhost_create_blk_controller" not in d.rpc("rpc_get_methods"):
            pytest.fail(NEEDS_BLK)
        d.rpc("vhost_create_blk_controller", ctrlr=CTRLR, dev_name=bdev_under_test.name, num_queues=2)
        return d.socket(CTRLR)

    @pytest.fixture
    def blk(self, blk_controller):
        dev = connect_blk(blk_controller, num_queues=2, timeout=20)
        try:
            yield dev
        finally:
            dev.close()

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _check_data(bdev: BdevUnderTest, got: bytes, want: bytes) -> None:
        if bdev.recipe.data_integrity:
            assert got == want, "read data differs from what was written"

    @staticmethod
    def _read(dev: VirtioBlkDevice, bdev: BdevUnderTest, block: int, nblocks: int, **kw) -> bytes:
        return dev.read(bdev.sector(block), nblocks * bdev.sectors_per_block, **kw)

    @staticmethod
    def _no_traceback(bdev: BdevUnderTest) -> None:
        assert bdev.daemon.alive(), bdev.daemon.log()
        assert "Traceback" not in bdev.daemon.log(), bdev.daemon.log()

    # ------------------------------------------------------------ the bdev itself

    def test_bdev_is_listed_with_its_geometry_and_shared_by_controllers(self, bdev_under_test):
        b = bdev_under_test
        d = b.daemon
        info = d.rpc("bdev_get_bdevs", name=b.name)[0]
        assert info["block_size"] >= 512 and info["block_size"] & (info["block_size"] - 1) == 0
        assert info["num_blocks"] > 0
        assert info["product_name"]
        assert info["supported_io_types"]["read"] is True
        assert info["claimed"] is False
        assert b.name in [x["name"] for x in d.rpc("bdev_get_bdevs")]
        if "vhost_create_blk_controller" not in d.rpc("rpc_get_methods"):
            pytest.fail(NEEDS_BLK)
        d.rpc("vhost_create_blk_controller", ctrlr=CTRLR, dev_name=b.name)
        # vhost opens a bdev, it does not claim it (SPDK): a second controller shares it.
        d.rpc("vhost_create_blk_controller", ctrlr="conformance.1", dev_name=b.name, readonly=True)
        assert d.rpc("bdev_get_bdevs", name=b.name)[0]["claimed"] is False
        served = {c["ctrlr"]: c["backend_specific"]["block"] for c in d.rpc("vhost_get_controllers")}
        assert served[CTRLR]["bdev"] == served["conformance.1"]["bdev"] == b.name
        d.rpc("vhost_delete_controller", ctrlr="conformance.1")
        d.rpc("vhost_delete_controller", ctrlr=CTRLR)

    def test_capacity_and_block_size_reach_the_driver(self, bdev_under_test, blk):
        b = bdev_under_test
        assert blk.config.capacity * SECTOR == b.block_size * b.num_blocks
        assert blk.config.blk_size == b.block_size

    def test_delete_then_create_again_under_the_same_name(self, bdev_under_test):
        b = bdev_under_test
        b.delete()
        assert b.name not in [x["name"] for x in b.daemon.rpc("bdev_get_bdevs")]
        again = _create(b.daemon, b.recipe)
        assert again.name == b.name and again.num_blocks == b.num_blocks
        self._no_traceback(b)

    # ------------------------------------------------------------ data

    def test_write_read_round_trip(self, bdev_under_test, blk):
        b = bdev_under_test
        last = b.num_blocks - 1
        for block, n in ((0, 1), (1, 7), (last, 1), (max(0, last - 3), 4)):
            data = b.pattern(block, n, seed=1)
            blk.write(b.sector(block), data)
            self._check_data(b, self._read(blk, b, block, n), data)
        # Many small descriptors (one per 512 bytes) and indirect descriptors.
        n = min(max(1, 16 * SECTOR // b.block_size), b.num_blocks)
        data = b.pattern(0, n, seed=2)
        blk.write(0, data, seg_size=SECTOR)
        self._check_data(b, self._read(blk, b, 0, n, seg_size=SECTOR), data)
        if blk.has_feature(VIRTIO_RING_F_INDIRECT_DESC):
            self._check_data(b, self._read(blk, b, 0, n, indirect=True), data)

    def test_flush_succeeds(self, bdev_under_test, blk):
        b = bdev_under_test
        blk.write(0, b.pattern(0, 1))
        blk.flush()
        assert blk.has_feature(VirtioBlkFeature.FLUSH) == bool(b.io_types.get("flush"))

    def _check_unsupported(self, b, blk, request) -> None:
        data = b.pattern(0, 1, seed=5)
        blk.write(0, data)
        with pytest.raises(BlkIOError) as err:
            request()
        assert err.value.status == VIRTIO_BLK_S_UNSUPP
        self._check_data(b, self._read(blk, b, 0, 1), data)

    def test_unmap_reads_back_zeroes(self, bdev_under_test, blk):
        b = bdev_under_test
        if not blk.has_feature(VirtioBlkFeature.DISCARD):
            # Not offered: a driver that discards anyway gets UNSUPP, and nothing else changes.
            assert not b.io_types.get("unmap")
            self._check_unsupported(b, blk, lambda: blk.discard(0, b.sectors_per_block))
            return
        n = min(8, b.num_blocks)
        blk.write(0, b.pattern(0, n, seed=3))
        if n > 2:
            blk.discard(b.sector(1), (n - 2) * b.sectors_per_block)
        else:
            blk.discard(0, n * b.sectors_per_block)
        got = self._read(blk, b, 0, n)
        if b.recipe.data_integrity and b.recipe.unmap_reads_zeroes and n > 2:
            assert got[:b.block_size] == b.pattern(0, 1, seed=3)
            assert got[b.block_size:(n - 1) * b.block_size] == bytes((n - 2) * b.block_size)
            assert got[(n - 1) * b.block_size:] == b.pattern(n - 1, 1, seed=3)

    def test_write_zeroes_reads_back_zeroes(self, bdev_under_test, blk):
        b = bdev_under_test
        if not blk.has_feature(VirtioBlkFeature.WRITE_ZEROES):
            assert not b.io_types.get("write_zeroes")
            self._check_unsupported(b, blk, lambda: blk.write_zeroes(0, b.sectors_per_block))
            return
        n = min(8, b.num_blocks)
        blk.write(0, b.pattern(0, n, seed=4))
        blk.write_zeroes(0, n * b.sectors_per_block)
        self._check_data(b, self._read(blk, b, 0, n), bytes(n * b.block_size))

    def test_out_of_bounds_io_fails_with_ioerr_and_the_bdev_keeps_serving(self, bdev_under_test, blk):
        b = bdev_under_test
        end = b.sector(b.num_blocks)
        bs = b.block_size
        results = blk.submit_many([
            BlkRequest(VIRTIO_BLK_T_IN, end, b"", bs),                      # just past the end
            BlkRequest(VIRTIO_BLK_T_IN, b.sector(b.num_blocks - 1), b"", 2 * bs),  # across the end
            BlkRequest(VIRTIO_BLK_T_OUT, end, b"\1" * bs, 0),
            BlkRequest(VIRTIO_BLK_T_OUT, b.sector(b.num_blocks - 1), b"\1" * 2 * bs, 0),
            BlkRequest(VIRTIO_BLK_T_IN, (1 << 63) // SECTOR, b"", bs),      # overflowing offset
        ])
        assert [r.status for r in results] == [VIRTIO_BLK_S_IOERR] * len(results)
        data = b.pattern(b.num_blocks - 1, 1, seed=5)
        blk.write(b.sector(b.num_blocks - 1), data)
        self._check_data(b, self._read(blk, b, b.num_blocks - 1, 1), data)
        self._no_traceback(b)

    def test_concurrent_io_on_two_queues(self, bdev_under_test, blk):
        b = bdev_under_test
        n = min(64, b.num_blocks)
        writes = [BlkRequest(VIRTIO_BLK_T_OUT, b.sector(i), b.pattern(i, 1, seed=6), 0, queue=i % 2)
                  for i in range(n)]
        assert all(r.status == VIRTIO_BLK_S_OK for r in blk.submit_many(writes))
        reads = [BlkRequest(VIRTIO_BLK_T_IN, b.sector(i), b"", b.block_size, queue=(i + 1) % 2)
                 for i in range(n)]
        results = blk.submit_many(reads)
        assert all(r.status == VIRTIO_BLK_S_OK for r in results)
        for i, r in enumerate(results):
            self._check_data(b, r.data, b.pattern(i, 1, seed=6))

    # ------------------------------------------------------------ read-only

    def test_readonly_controller_refuses_writes_and_serves_reads(self, bdev_under_test):
        b = bdev_under_test
        d = b.daemon
        if "vhost_create_blk_controller" not in d.rpc("rpc_get_methods"):
            pytest.fail(NEEDS_BLK)
        d.rpc("vhost_create_blk_controller", ctrlr=CTRLR, dev_name=b.name, readonly=True)
        with connect_blk(d.socket(CTRLR), timeout=20) as dev:
            assert dev.has_feature(VirtioBlkFeature.RO)
            assert not dev.has_feature(VirtioBlkFeature.DISCARD)
            assert not dev.has_feature(VirtioBlkFeature.WRITE_ZEROES)
            with pytest.raises(BlkIOError):
                dev.write(0, b.pattern(0, 1))
            dev.read(0, b.sectors_per_block)
        assert d.rpc("vhost_get_controllers", name=CTRLR)[0]["backend_specific"]["block"]["readonly"] is True
        self._no_traceback(b)

    # ------------------------------------------------------------ removal

    def test_delete_with_io_in_flight_fails_io_cleanly_and_the_daemon_survives(self, bdev_under_test, blk):
        b = bdev_under_test
        d = b.daemon
        n = min(32, b.num_blocks)
        statuses: list[int] = []
        errors: list[BaseException] = []
        stop = threading.Event()
        rounds = [0]

        def io_loop() -> None:
            try:
                while not stop.is_set():
                    reqs = [BlkRequest(VIRTIO_BLK_T_OUT if i % 2 else VIRTIO_BLK_T_IN, b.sector(i),
                                       b.pattern(i, 1) if i % 2 else b"", 0 if i % 2 else b.block_size,
                                       queue=i % 2) for i in range(n)]
                    statuses.extend(r.status for r in blk.submit_many(reqs))
                    rounds[0] += 1
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        t = threading.Thread(target=io_loop, daemon=True)
        t.start()
        deadline = time.monotonic() + 20
        while rounds[0] < 2 and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        b.delete()
        # A whole round submitted after the delete returned: the loop's last statuses.
        after = rounds[0] + 2
        while rounds[0] < after and not errors and time.monotonic() < deadline + 10:
            time.sleep(0.01)
        stop.set()
        t.join(30)
        assert not t.is_alive(), "I/O did not complete after the bdev was deleted"
        assert not errors, errors
        assert set(statuses) <= {VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR}
        assert statuses and statuses[-1] == VIRTIO_BLK_S_IOERR, "I/O after the delete must fail"
        with pytest.raises(BlkIOError):
            blk.read(0, b.sectors_per_block)
        assert b.name not in [x["name"] for x in d.rpc("bdev_get_bdevs")]
        ctrlr = d.rpc("vhost_get_controllers", name=CTRLR)[0]
        assert ctrlr["backend_specific"]["block"]["bdev"] is None
        blk.close()
        wait_no_session(d, CTRLR)
        d.rpc("vhost_delete_controller", ctrlr=CTRLR)
        self._no_traceback(b)

    def test_delete_while_open_without_a_front_end(self, bdev_under_test, blk_controller):
        b = bdev_under_test
        d = b.daemon
        b.delete()
        assert b.name not in [x["name"] for x in d.rpc("bdev_get_bdevs")]
        assert d.rpc("vhost_get_controllers", name=CTRLR)[0]["backend_specific"]["block"]["bdev"] is None
        with connect_blk(blk_controller, timeout=20) as dev:
            with pytest.raises(BlkIOError):
                dev.read(0, b.sectors_per_block)
        wait_no_session(d, CTRLR)
        d.rpc("vhost_delete_controller", ctrlr=CTRLR)
        # The name is free again, and a new bdev of that name serves a new controller.
        again = _create(d, b.recipe)
        d.rpc("vhost_create_blk_controller", ctrlr=CTRLR, dev_name=again.name)
        with connect_blk(blk_controller, timeout=20) as dev:
            data = again.pattern(0, 1, seed=7)
            dev.write(0, data)
            self._check_data(again, dev.read(0, again.sectors_per_block), data)
        self._no_traceback(b)
