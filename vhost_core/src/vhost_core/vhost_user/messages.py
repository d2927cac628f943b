"""vhost-user wire format (QEMU docs/interop/vhost-user.rst), back-end side.

A message is a 12-byte header ``{u32 request, u32 flags, u32 size}`` then ``size``
bytes of payload, with file descriptors passed as SCM_RIGHTS ancillary data.
All integers are little-endian (the protocol is host-endian; we serve x86 and other
little-endian hosts only).
"""

from __future__ import annotations

import enum
import struct

import attrs

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
#: Largest payload we accept: GET/SET_CONFIG is 12 + 256 bytes, a memory table
#: 8 + 8 * 32; anything longer is a broken or hostile frontend.
MAX_PAYLOAD = 4096
#: Most file descriptors one message may carry.
MAX_FDS = 8
#: SET_MEM_TABLE region limit without CONFIGURE_MEM_SLOTS.
MAX_MEM_REGIONS = 8
#: Largest virtqueue size the virtio spec allows for split rings.
MAX_QUEUE_SIZE = 32768

VERSION_MASK = 0x3
VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100


class Request(enum.IntEnum):
    """Front-end -> back-end request codes."""

    GET_FEATURES = 1  #: which virtio/vhost feature bits the back-end offers
    SET_FEATURES = 2  #: the bits the driver acknowledged
    SET_OWNER = 3  #: the front-end claims the session
    RESET_OWNER = 4  #: deprecated session reset
    SET_MEM_TABLE = 5  #: guest memory regions, one fd each
    SET_LOG_BASE = 6  #: dirty log for live migration (shared memory; we reply)
    SET_LOG_FD = 7  #: eventfd for log-resize notices (accepted, unused)
    SET_VRING_NUM = 8  #: queue size
    SET_VRING_ADDR = 9  #: desc/avail/used ring addresses (front-end virtual)
    SET_VRING_BASE = 10  #: next avail index to process
    GET_VRING_BASE = 11  #: stop the ring, return its next avail index
    SET_VRING_KICK = 12  #: eventfd the driver kicks; starts the ring
    SET_VRING_CALL = 13  #: eventfd we signal on used buffers
    SET_VRING_ERR = 14  #: eventfd to report ring errors
    GET_PROTOCOL_FEATURES = 15  #: vhost-user protocol extensions offered
    SET_PROTOCOL_FEATURES = 16  #: extensions the front-end uses
    GET_QUEUE_NUM = 17  #: most queues the back-end serves (MQ)
    SET_VRING_ENABLE = 18  #: enable or disable one ring
    SEND_RARP = 19  #: net only
    NET_SET_MTU = 20  #: net only
    SET_BACKEND_REQ_FD = 21  #: socket for back-end initiated requests
    IOTLB_MSG = 22  #: IOMMU translations (not offered)
    SET_VRING_ENDIAN = 23  #: legacy cross-endian rings (not offered)
    GET_CONFIG = 24  #: read device config space
    SET_CONFIG = 25  #: write device config space
    CREATE_CRYPTO_SESSION = 26  #: crypto only
    CLOSE_CRYPTO_SESSION = 27  #: crypto only
    POSTCOPY_ADVISE = 28  #: postcopy migration (not offered)
    POSTCOPY_LISTEN = 29  #: postcopy migration (not offered)
    POSTCOPY_END = 30  #: postcopy migration (not offered)
    GET_INFLIGHT_FD = 31  #: a new shared buffer for in-flight tracking (we create it)
    SET_INFLIGHT_FD = 32  #: the buffer to track in (after a target restart: the old one)
    GPU_SET_SOCKET = 33  #: gpu only
    RESET_DEVICE = 34  #: reset the device (RESET_DEVICE protocol feature)
    VRING_KICK = 35  #: in-band kick (not offered)
    GET_MAX_MEM_SLOTS = 36  #: CONFIGURE_MEM_SLOTS (not offered)
    ADD_MEM_REG = 37  #: CONFIGURE_MEM_SLOTS (not offered)
    REM_MEM_REG = 38  #: CONFIGURE_MEM_SLOTS (not offered)
    SET_STATUS = 39  #: virtio device status byte (STATUS)
    GET_STATUS = 40  #: virtio device status byte (STATUS)


class BackendRequest(enum.IntEnum):
    """Back-end -> front-end requests, sent on the SET_BACKEND_REQ_FD socket."""

    IOTLB_MSG = 1  #: IOMMU miss (not used)
    CONFIG_CHANGE_MSG = 2  #: device config space changed: the front-end re-reads it (GET_CONFIG)
    VRING_HOST_NOTIFIER_MSG = 3  #: host notifier area (not used)


class ProtocolFeature(enum.IntEnum):
    """Bits of GET/SET_PROTOCOL_FEATURES."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# virtio feature bits handled by the core (device types add their own)
VHOST_F_LOG_ALL = 26
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_HEADER = struct.Struct("<II")
MEM_REGION = struct.Struct("<QQQQ")
CONFIG_HEADER = struct.Struct("<III")
#: VhostUserInflight: mmap_size, mmap_offset, num_queues, queue_size (+4 bytes padding)
INFLIGHT = struct.Struct("<QQHH4x")
#: VhostUserLog: mmap_size, mmap_offset
VHOST_USER_LOG = struct.Struct("<QQ")
#: SET_VRING_ADDR flags: log the used ring's writes (at VringAddr.log)
VHOST_VRING_F_LOG = 0


@attrs.frozen
class MemoryRegion:
    """One SET_MEM_TABLE region: guest-physical range, front-end address, fd offset."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@attrs.frozen
class VringAddr:
    """SET_VRING_ADDR payload (addresses are front-end virtual addresses)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


class ProtocolError(Exception):
    """The front-end broke the protocol; the connection is dropped."""
