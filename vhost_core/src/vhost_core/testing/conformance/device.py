"""The device-type conformance suite: what every vhost-user device type must do.

Usage (one import, in your plugin's ``tests/test_conformance.py``)::

    import pytest
    from vhost_core.testing.conformance.device import DeviceConformance, DeviceRecipe


    class TestBlkDevice(DeviceConformance):
        @pytest.fixture
        def device_recipe(self):
            return DeviceRecipe(
                ctrlr="vhost.0",
                setup=[("bdev_malloc_create", {"name": "Malloc0", "num_blocks": 2048, "block_size": 512}),
                       ("vhost_create_blk_controller", {"ctrlr": "vhost.0", "dev_name": "Malloc0"})],
                num_queues=16, config_size=60)

The recipe is a list of RPC calls run in order on a fresh ``vhost_daemon`` (vhost-core's
pytest plugin provides that fixture) and leaves controller ``ctrlr`` listening.

What it checks, without knowing the device's request format: feature and protocol
feature negotiation (VERSION_1 and PROTOCOL_FEATURES offered, bits that were not
offered refused), config space reads (stable, the size asked), GET_QUEUE_NUM, that
rings start, stop with GET_VRING_BASE (which reports the index they stopped at) and
start again where told (on split and on packed rings: VIRTIO_F_RING_PACKED, which
the core offers for every device type), that front-ends can disconnect and reconnect (mid-setup too),
and hostile basics: unknown requests, truncated headers, bad vring indices, regions
without file descriptors, rings outside guest memory.  After each of those the
connection may be dropped, but the daemon keeps serving: a new connection to the
same controller works, and so does every RPC.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import attrs
import pytest

from vhost_core.testing.constants import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VhostUserProtocolFeature as PF,
    VhostUserRequest as R,
    bit,
)
from vhost_core.testing.daemon import wait_no_session
from vhost_core.testing.frontend import VhostUserError, VhostUserFrontend
from vhost_core.testing.memory import GuestMemory
from vhost_core.testing.virtqueue import packed_vring_base

__all__ = ["DeviceConformance", "DeviceRecipe"]


@attrs.frozen
class DeviceRecipe:
    """How to make the controller under test.

    ``setup``: ``(method, params)`` RPC calls, in order.  ``ctrlr``: the controller
    they create.  ``num_queues``: what GET_QUEUE_NUM must answer (None: at least 1).
    ``config_size``: bytes of config space the device defines (None: the device has
    no config space; GET_CONFIG is then only checked not to kill the daemon).
    """

    ctrlr: str
    setup: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)
    num_queues: int | None = None
    config_size: int | None = None


def _dropped_or_refused(fe: VhostUserFrontend, timeout: float = 5.0) -> None:
    """The backend either closed the connection or NACKed (and stays usable)."""
    if fe.wait_closed(timeout):
        return
    fe.ping()


class DeviceConformance:
    """Subclass it and provide the ``device_recipe`` fixture (see the module docstring)."""

    @pytest.fixture
    def device_recipe(self) -> DeviceRecipe:
        pytest.fail(f"{type(self).__name__} runs the device conformance suite without a device: "
                    f"override the device_recipe fixture (see vhost_core.testing.conformance.device)")

    @pytest.fixture
    def controller(self, vhost_daemon, device_recipe):
        """The daemon, with the recipe applied; yields ``(daemon, socket path)``."""
        for method, params in device_recipe.setup:
            vhost_daemon.rpc(method, **params)
        yield vhost_daemon, vhost_daemon.socket(device_recipe.ctrlr)
        assert vhost_daemon.alive(), vhost_daemon.log()
        assert "Traceback" not in vhost_daemon.log(), vhost_daemon.log()

    @pytest.fixture(params=["split", "packed"])
    def ring_layout(self, request) -> str:
        """The ring tests run on both layouts; the others negotiate split rings."""
        self._packed = request.param == "packed"
        return request.param

    _packed = False

    def _ring_features(self, offered: int) -> int:
        """What the ring tests ack: VERSION_1, PROTOCOL_FEATURES, and RING_PACKED on the
        packed layout (which must then be offered)."""
        want = bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES)
        if self._packed:
            assert offered & bit(VIRTIO_F_RING_PACKED), "VIRTIO_F_RING_PACKED must be offered"
            want |= bit(VIRTIO_F_RING_PACKED)
        return offered & want

    def _base(self, index: int) -> int:
        """SET_VRING_BASE of a ring at avail index ``index`` (packed: position and wrap 1)."""
        return packed_vring_base(index, 1, index, 1) if self._packed else index

    @pytest.fixture
    def memory(self):
        mem = GuestMemory.pc_like(4 << 20)
        try:
            yield mem
        finally:
            mem.close()

    @pytest.fixture
    def frontends(self):
        made: list[VhostUserFrontend] = []

        def connect(path: str) -> VhostUserFrontend:
            fe = VhostUserFrontend(path, timeout=10)
            made.append(fe)
            return fe

        try:
            yield connect
        finally:
            for fe in made:
                fe.close()

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _negotiate(fe: VhostUserFrontend) -> int:
        """QEMU's opening: features, protocol features (REPLY_ACK if offered), owner."""
        offered = fe.get_features()
        if offered & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            pf = fe.get_protocol_features()
            fe.set_protocol_features(pf & (bit(PF.MQ) | bit(PF.REPLY_ACK) | bit(PF.CONFIG)))
        fe.set_owner()
        return offered

    def _start_ring(self, fe: VhostUserFrontend, memory: GuestMemory, index: int = 0, base: int | None = None):
        vq = fe.setup_vring(index, 64, memory=memory, base=self._base(0) if base is None else base)
        if fe.acked_features and fe.acked_features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            fe.set_vring_enable(index, True)
        return vq

    def _full_setup(self, fe: VhostUserFrontend, memory: GuestMemory) -> None:
        offered = self._negotiate(fe)
        fe.set_features(self._ring_features(offered))
        fe.set_mem_table(memory)
        self._start_ring(fe, memory)
        fe.ping()

    @staticmethod
    def _serves_again(daemon, path: str, recipe: DeviceRecipe) -> None:
        """After whatever happened: the daemon answers RPCs and a new front-end is served."""
        assert daemon.alive(), daemon.log()
        assert daemon.rpc("vhost_get_controllers", name=recipe.ctrlr)[0]["ctrlr"] == recipe.ctrlr
        wait_no_session(daemon, recipe.ctrlr)
        with VhostUserFrontend(path, timeout=10) as fe:
            assert fe.get_features() & bit(VIRTIO_F_VERSION_1)
        wait_no_session(daemon, recipe.ctrlr)

    # ------------------------------------------------------------ negotiation

    def test_features_offered_and_negotiated(self, controller, frontends):
        _daemon, path = controller
        fe = frontends(path)
        offered = self._negotiate(fe)
        assert offered & bit(VIRTIO_F_VERSION_1), "virtio 1.x (VERSION_1) must be offered"
        assert offered & bit(VHOST_USER_F_PROTOCOL_FEATURES), "PROTOCOL_FEATURES must be offered"
        assert fe.get_features() == offered, "the offer must not change between two asks"
        fe.set_features(offered)
        fe.ping()

    def test_unoffered_feature_bits_are_refused(self, controller, device_recipe, frontends):
        daemon, path = controller
        fe = frontends(path)
        offered = fe.get_features()
        unoffered = next(b for b in range(63, 0, -1) if not offered & bit(b))
        fe.send(R.SET_FEATURES, struct.pack("=Q", offered | bit(unoffered)))
        _dropped_or_refused(fe)
        self._serves_again(daemon, path, device_recipe)

    def test_get_queue_num(self, controller, device_recipe, frontends):
        _daemon, path = controller
        fe = frontends(path)
        self._negotiate(fe)
        # The core offers MQ for every device type (QEMU asks GET_QUEUE_NUM only then).
        assert fe.protocol_features & bit(PF.MQ), "MQ was not negotiated"
        n = fe.get_queue_num()
        assert n >= 1
        if device_recipe.num_queues is not None:
            assert n == device_recipe.num_queues

    def test_config_space_reads_are_stable_and_sized_as_asked(self, controller, device_recipe, frontends):
        daemon, path = controller
        fe = frontends(path)
        self._negotiate(fe)
        # The core offers CONFIG for every device type; one without a config space
        # answers zeros.
        assert fe.protocol_features & bit(PF.CONFIG), "CONFIG was not negotiated"
        size = device_recipe.config_size or 8
        first = fe.get_config(0, size)
        assert len(first) == size and fe.get_config(0, size) == first
        assert fe.get_config(0, 256)[:size] == first     # SPDK's initiator asks 256 bytes
        if size > 4:
            assert fe.get_config(4, size - 4) == first[4:]
        fe.ping()
        assert daemon.alive()

    # ------------------------------------------------------------ rings

    def test_ring_stops_with_get_vring_base_and_restarts_where_told(self, controller, memory, frontends,
                                                                    ring_layout):
        _daemon, path = controller
        fe = frontends(path)
        self._full_setup(fe, memory)
        assert fe.get_vring_base(0) == self._base(0)    # nothing was submitted
        vq = fe.vrings[0]
        fe.setup_vring(0, vq=vq, base=self._base(0))    # same ring again
        if fe.acked_features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            fe.set_vring_enable(0, True)
        fe.ping()
        assert fe.get_vring_base(0) == self._base(0)
        # A ring restarted at another index reports that index when stopped (packed: the
        # position and the wrap counters, as they were given).
        self._start_ring(fe, memory, base=self._base(7))
        assert fe.get_vring_base(0) == self._base(7)
        if self._packed:
            self._start_ring(fe, memory, base=packed_vring_base(9, 0, 9, 0))
            assert fe.get_vring_base(0) == packed_vring_base(9, 0, 9, 0)
        fe.ping()

    def test_reconnect_after_disconnects_at_every_stage(self, controller, device_recipe, memory, ring_layout):
        daemon, path = controller

        def session_until(stage: str) -> None:
            with VhostUserFrontend(path, timeout=10) as fe:
                offered = self._negotiate(fe)
                if stage == "features":
                    return
                fe.set_features(self._ring_features(offered))
                fe.set_mem_table(memory)
                if stage == "mem_table":
                    return
                self._start_ring(fe, memory)
                fe.ping()
                if stage == "ring_stopped":
                    fe.get_vring_base(0)

        for stage in ("features", "mem_table", "ring", "ring_stopped"):
            session_until(stage)
            wait_no_session(daemon, device_recipe.ctrlr)
        with VhostUserFrontend(path, timeout=10) as fe:
            self._full_setup(fe, memory)
            sessions = daemon.rpc("vhost_get_controllers", name=device_recipe.ctrlr)[0]["sessions"]
            assert len(sessions) == 1

    # ------------------------------------------------------------ hostile basics

    def test_unknown_request_drops_only_that_connection(self, controller, device_recipe, frontends):
        daemon, path = controller
        fe = frontends(path)
        fe.get_features()
        fe.send(9999, b"")
        _dropped_or_refused(fe)
        self._serves_again(daemon, path, device_recipe)

    def test_truncated_header_and_lying_size(self, controller, device_recipe, frontends):
        daemon, path = controller
        fe = frontends(path)
        fe.send_raw(struct.pack("=II", R.GET_FEATURES, 1))       # 8 of 12 header bytes
        fe.close()
        self._serves_again(daemon, path, device_recipe)
        fe = frontends(path)
        fe.send(R.SET_FEATURES, b"\0" * 8, size=1 << 20)           # claims a 1 MiB payload
        fe.close()
        self._serves_again(daemon, path, device_recipe)

    def test_vring_index_out_of_range(self, controller, device_recipe, frontends):
        daemon, path = controller
        fe = frontends(path)
        self._negotiate(fe)
        n = fe.get_queue_num() if fe.protocol_features & bit(PF.MQ) else 1
        fe.send(R.SET_VRING_NUM, struct.pack("=II", n, 64))
        _dropped_or_refused(fe)
        fe.close()
        self._serves_again(daemon, path, device_recipe)
        fe = frontends(path)
        self._negotiate(fe)
        fe.send(R.GET_VRING_BASE, struct.pack("=II", 255, 0))
        _dropped_or_refused(fe)
        self._serves_again(daemon, path, device_recipe)

    def test_memory_region_without_fd(self, controller, device_recipe, memory, frontends):
        daemon, path = controller
        fe = frontends(path)
        self._negotiate(fe)
        try:
            fe.set_mem_table(memory, fds=[])
        except VhostUserError:
            pass
        _dropped_or_refused(fe)
        self._serves_again(daemon, path, device_recipe)

    def test_ring_outside_guest_memory(self, controller, device_recipe, memory, frontends, ring_layout):
        daemon, path = controller
        fe = frontends(path)
        offered = self._negotiate(fe)
        fe.set_features(self._ring_features(offered))
        # A table whose only region is 64 KiB, then rings placed past its end.
        r0 = memory.regions[0]
        fe.set_mem_table([_region_with(r0, size=1 << 16)])
        uaddr = r0.uaddr + (1 << 20)
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            try:
                fe.set_vring_num(0, 64)
                fe.set_vring_base(0, self._base(0))
                fe.set_vring_addr(0, uaddr, uaddr + 0x1000, uaddr + 0x2000)
                fe.set_vring_kick(0, kick)
            except (VhostUserError, OSError):
                pass
            _dropped_or_refused(fe)
        finally:
            os.close(kick)
        self._serves_again(daemon, path, device_recipe)



def _region_with(region, **changes):
    """A copy of a :class:`~vhost_core.testing.memory.MemoryRegion` with fields changed."""
    return dataclasses.replace(region, **changes)
