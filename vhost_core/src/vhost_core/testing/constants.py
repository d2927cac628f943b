"""Wire constants for the fake vhost-user frontend.

These are written down independently from the vhost-user specification
(QEMU ``docs/interop/vhost-user.rst``) and the VIRTIO 1.x specification.
They deliberately do *not* import anything from the backend implementation so
that tests built on :mod:`vhost_core.testing` check the backend against the
spec, not against its own (possibly wrong) definitions.

Conventions
-----------
* vhost-user messages use the *host's native* byte order (``struct`` prefix
  ``"="``); virtio structures in guest memory are little-endian (``"<"``).
* Feature "bits" are bit *numbers*; use ``1 << BIT`` to build masks, or the
  :func:`bit` helper.
"""

from __future__ import annotations

import enum

__all__ = [
    "bit",
    "VhostUserRequest",
    "VhostUserBackendRequest",
    "VhostUserProtocolFeature",
    "VHOST_USER_VERSION",
    "VHOST_USER_VERSION_MASK",
    "VHOST_USER_FLAG_REPLY",
    "VHOST_USER_FLAG_NEED_REPLY",
    "VHOST_USER_HDR_SIZE",
    "VHOST_USER_MAX_REGIONS",
    "VHOST_USER_MAX_CONFIG_SIZE",
    "VHOST_USER_VRING_IDX_MASK",
    "VHOST_USER_VRING_NOFD_MASK",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_F_LOG_ALL",
    "VHOST_VRING_F_LOG",
    "REQUESTS_WITH_REPLY",
    "VirtioFeature",
    "VirtioBlkFeature",
    "VIRTIO_F_NOTIFY_ON_EMPTY",
    "VIRTIO_F_ANY_LAYOUT",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_F_ACCESS_PLATFORM",
    "VIRTIO_F_RING_PACKED",
    "VIRTIO_F_IN_ORDER",
    "VIRTIO_BLK_T_IN",
    "VIRTIO_BLK_T_OUT",
    "VIRTIO_BLK_T_FLUSH",
    "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_T_GET_LIFETIME",
    "VIRTIO_BLK_T_DISCARD",
    "VIRTIO_BLK_T_WRITE_ZEROES",
    "VIRTIO_BLK_T_SECURE_ERASE",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_UNSUPP",
    "VIRTIO_BLK_SECTOR_SIZE",
    "VIRTIO_BLK_ID_BYTES",
    "VIRTIO_BLK_WRITE_ZEROES_F_UNMAP",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_DESC_F_INDIRECT",
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_USED_F_NO_NOTIFY",
    "VIRTQUEUE_MAX_SIZE",
]


def bit(n: int) -> int:
    """Return the mask ``1 << n`` (readability helper for feature bits)."""
    return 1 << n


# ---------------------------------------------------------------------------
# vhost-user message header
# ---------------------------------------------------------------------------

#: Header = ``u32 request, u32 flags, u32 size`` (native endian), 12 bytes.
VHOST_USER_HDR_SIZE = 12
#: Protocol version carried in flags bits 0..1. Only version 1 exists.
VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
#: flags bit 2: this message is a reply (backend -> frontend).
VHOST_USER_FLAG_REPLY = 0x4
#: flags bit 3: frontend asks for a REPLY_ACK (only meaningful when the
#: REPLY_ACK protocol feature was negotiated).
VHOST_USER_FLAG_NEED_REPLY = 0x8

#: Max regions in SET_MEM_TABLE (and max fds per message).
VHOST_USER_MAX_REGIONS = 8
#: Max virtio config space bytes in GET_CONFIG / SET_CONFIG.
VHOST_USER_MAX_CONFIG_SIZE = 256

#: SET_VRING_KICK/CALL/ERR u64 payload: bits 0..7 = vring index,
#: bit 8 = "no fd attached" (polling mode / disable).
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x100

#: Device feature bit (in GET/SET_FEATURES) announcing protocol features.
VHOST_USER_F_PROTOCOL_FEATURES = 30
#: vhost feature bit: dirty logging for migration.
VHOST_F_LOG_ALL = 26
#: SET_VRING_ADDR flags bit 0: log used ring writes.
VHOST_VRING_F_LOG = 0


class VhostUserRequest(enum.IntEnum):
    """Frontend -> backend request codes (``request`` header field)."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # a.k.a. SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class VhostUserBackendRequest(enum.IntEnum):
    """Backend -> frontend request codes (on the SET_BACKEND_REQ_FD channel)."""

    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class VhostUserProtocolFeature(enum.IntEnum):
    """Protocol feature *bit numbers* (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5  # a.k.a. SLAVE_REQ
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10  # a.k.a. SLAVE_SEND_FD
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


#: Requests whose *normal* semantics include a reply from the backend.
#: For these NEED_REPLY/REPLY_ACK changes nothing (the reply is the answer).
#: SET_LOG_BASE only replies when LOG_SHMFD was negotiated (handled by caller).
REQUESTS_WITH_REPLY = frozenset(
    {
        VhostUserRequest.GET_FEATURES,
        VhostUserRequest.GET_PROTOCOL_FEATURES,
        VhostUserRequest.GET_VRING_BASE,
        VhostUserRequest.GET_QUEUE_NUM,
        VhostUserRequest.GET_CONFIG,
        VhostUserRequest.GET_INFLIGHT_FD,
        VhostUserRequest.GET_MAX_MEM_SLOTS,
        VhostUserRequest.GET_STATUS,
        VhostUserRequest.IOTLB_MSG,
        VhostUserRequest.POSTCOPY_ADVISE,
        VhostUserRequest.CREATE_CRYPTO_SESSION,
        VhostUserRequest.GET_SHARED_OBJECT,
        VhostUserRequest.SET_DEVICE_STATE_FD,
        VhostUserRequest.CHECK_DEVICE_STATE,
    }
)

# ---------------------------------------------------------------------------
# VIRTIO generic feature bits (bit numbers)
# ---------------------------------------------------------------------------

VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33  # a.k.a. IOMMU_PLATFORM
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_RING_RESET = 40


class VirtioFeature(enum.IntEnum):
    """Device-independent virtio feature bit numbers (plus vhost ones)."""

    NOTIFY_ON_EMPTY = VIRTIO_F_NOTIFY_ON_EMPTY
    LOG_ALL = VHOST_F_LOG_ALL
    ANY_LAYOUT = VIRTIO_F_ANY_LAYOUT
    RING_INDIRECT_DESC = VIRTIO_RING_F_INDIRECT_DESC
    RING_EVENT_IDX = VIRTIO_RING_F_EVENT_IDX
    PROTOCOL_FEATURES = VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = VIRTIO_F_VERSION_1
    ACCESS_PLATFORM = VIRTIO_F_ACCESS_PLATFORM
    RING_PACKED = VIRTIO_F_RING_PACKED
    IN_ORDER = VIRTIO_F_IN_ORDER
    ORDER_PLATFORM = VIRTIO_F_ORDER_PLATFORM
    SR_IOV = VIRTIO_F_SR_IOV
    NOTIFICATION_DATA = VIRTIO_F_NOTIFICATION_DATA
    RING_RESET = VIRTIO_F_RING_RESET


class VirtioBlkFeature(enum.IntEnum):
    """virtio-blk device feature bit numbers."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17


# ---------------------------------------------------------------------------
# virtio-blk requests
# ---------------------------------------------------------------------------

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

#: virtio-blk sectors are always 512 bytes, regardless of blk_size.
VIRTIO_BLK_SECTOR_SIZE = 512
#: GET_ID returns a 20-byte, NUL-padded (not necessarily terminated) string.
VIRTIO_BLK_ID_BYTES = 20
#: flags bit 0 of a discard/write-zeroes segment.
VIRTIO_BLK_WRITE_ZEROES_F_UNMAP = 1

# ---------------------------------------------------------------------------
# split virtqueue
# ---------------------------------------------------------------------------

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
#: Maximum split queue size allowed by the virtio spec.
VIRTQUEUE_MAX_SIZE = 32768
