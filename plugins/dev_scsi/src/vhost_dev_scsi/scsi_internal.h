/*
 * dev_scsi's two halves share these: the virtio-scsi transport (virtio_scsi.c:
 * queues, task management, events, the request and response headers) and the
 * SCSI logical unit emulation behind it (scsi_lun.c: SPC-4 / SBC-3 commands,
 * sense data, the bdev I/O a command becomes), as SPDK keeps lib/scsi apart from
 * its vhost-scsi transport.  Internal: the plugin's C API is scsi.h.
 */
#ifndef VHOST_DEV_SCSI_INTERNAL_H
#define VHOST_DEV_SCSI_INTERNAL_H

#include <endian.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vhost_core/vhost_native.h"
#include "scsi.h"

#define SCSI_MAX_TARGETS 8

#define REQ_SIZE 51                 /* lun[8] tag task_attr prio crn cdb[32] */
#define RESP_SIZE 108               /* sense_len resid status_qualifier status response sense[96] */
#define CDB_OFFSET 19
#define SENSE_SIZE 96
#define EVENT_SIZE 16
#define TMF_REQ_SIZE 24
#define AN_REQ_SIZE 16
#define AN_RESP_SIZE 5

#define VIRTIO_SCSI_S_OK 0
#define VIRTIO_SCSI_S_OVERRUN 1
#define VIRTIO_SCSI_S_BAD_TARGET 3
#define VIRTIO_SCSI_S_FAILURE 9
#define VIRTIO_SCSI_S_FUNCTION_COMPLETE 0
#define VIRTIO_SCSI_S_FUNCTION_REJECTED 11
#define VIRTIO_SCSI_S_INCORRECT_LUN 12

#define VIRTIO_SCSI_T_TMF 0
#define VIRTIO_SCSI_T_AN_QUERY 1
#define VIRTIO_SCSI_T_AN_SUBSCRIBE 2
#define TMF_ABORT_TASK 0
#define TMF_ABORT_TASK_SET 1
#define TMF_CLEAR_TASK_SET 3
#define TMF_I_T_NEXUS_RESET 4
#define TMF_LOGICAL_UNIT_RESET 5

#define VIRTIO_SCSI_T_NO_EVENT 0
#define VIRTIO_SCSI_T_TRANSPORT_RESET 1
#define VIRTIO_SCSI_T_PARAM_CHANGE 3
#define VIRTIO_SCSI_T_EVENTS_MISSED 0x80000000u
#define VIRTIO_SCSI_EVT_RESET_RESCAN 1
#define VIRTIO_SCSI_EVT_RESET_REMOVED 2

/* SCSI status and sense keys */
#define GOOD 0x00
#define CHECK_CONDITION 0x02
#define NO_SENSE 0x00
#define MEDIUM_ERROR 0x03
#define HARDWARE_ERROR 0x04
#define ILLEGAL_REQUEST 0x05
#define UNIT_ATTENTION 0x06
#define DATA_PROTECT 0x07

/* Additional sense codes (ASC << 8 | ASCQ) */
#define ASC_NONE 0x0000
#define ASC_WRITE_ERROR 0x0c00
#define ASC_UNRECOVERED_READ_ERROR 0x1100
#define ASC_PARAM_LIST_LENGTH_ERROR 0x1a00
#define ASC_INVALID_OPCODE 0x2000
#define ASC_LBA_OUT_OF_RANGE 0x2100
#define ASC_INVALID_FIELD_IN_CDB 0x2400
#define ASC_LUN_NOT_SUPPORTED 0x2500
#define ASC_INVALID_FIELD_IN_PARAM 0x2600
#define ASC_WRITE_PROTECTED 0x2700
#define ASC_BUS_DEVICE_RESET 0x2903
#define ASC_I_T_NEXUS_LOSS 0x2907
#define ASC_SAVING_PARAMS_UNSUP 0x3900
#define ASC_LUNS_CHANGED 0x3f0e
#define ASC_CAPACITY_CHANGED 0x2a09
#define ASC_INTERNAL_TARGET_FAILURE 0x4400

/* Unit attentions a target may hold, reported lowest bit first. */
#define UA_RESET 1u
#define UA_NEXUS_LOSS 2u
#define UA_LUNS_CHANGED 4u
#define UA_CAPACITY_CHANGED 8u

/* Limits we advertise (block limits VPD page, config max_sectors) and enforce.  The
 * transfer limit is the core's: a larger one would be advertised only to have the
 * core fail the chains that use it (E2BIG) without a SCSI status. */
#define MAX_XFER_BYTES VN_MAX_TRANSFER
#define MAX_UNMAP_BYTES (2ull << 30)
#define MAX_UNMAP_DESC 64
#define WS_BLOCK_IOV 8

/* Field pointer "none" for sense data. */
#define NOFIELD -1

enum { TGT_EMPTY = 0, TGT_PRESENT, TGT_REMOVING };
enum { OP_RW = 1, OP_FLUSH, OP_UNMAP, OP_WS_ZERO, OP_WS_DATA };

struct scsi_target {
    int state;
    vn_bdev_desc *desc;         /* the bdev, opened by the controller on its reactor */
    uint32_t block_size;
    uint64_t num_blocks;
    uint32_t io_types;
    int readonly;
    uint32_t outstanding;       /* commands with bdev I/O in flight */
    /* Those commands in the order they started, oldest first, and the number the
     * next one gets: a task management function waits for the commands older
     * than it, not for those the driver keeps sending after it. */
    struct scsi_req *oldest, *newest;
    uint64_t next_seq;
    struct scsi_req *tmf_head, *tmf_tail;  /* held TMFs, in arrival order */
    uint32_t ua;
    char product[16];
    char serial[64];
    uint32_t serial_len;
    uint8_t naa[8];
    char t10_id[40];
    uint32_t t10_id_len;
};

struct scsi_req;

struct scsi_dev {
    struct scsi_target tgt[SCSI_MAX_TARGETS];
    int hotplug;                /* the driver negotiated VIRTIO_SCSI_F_HOTPLUG */
    int change;                 /* ... and VIRTIO_SCSI_F_CHANGE */
    int events_missed;
    struct scsi_req *ev_head, *ev_tail;
    uint32_t ev_held;
    uint32_t tmf_held;
    /* Commands that used up their share of inline bdev work (see step). */
    struct scsi_req *resume_head, *resume_tail;
    struct scsi_dev_stats stats;
};

struct unmap_desc { uint64_t lba; uint64_t n; };

/* Lives in vn_req.dev_priv. */
struct scsi_req {
    vn_bdev_io io;
    vn_req *req;
    struct scsi_req *next;      /* held event buffers and TMFs; commands to resume */
    struct scsi_req *older, *newer;     /* the target's commands in flight */
    uint64_t seq;               /* command: its start order; TMF: the first command it does not wait for */
    struct scsi_target *t;
    uint64_t din_len, dout_len; /* data-in / data-out bytes past the response / request header */
    uint64_t xfer;              /* data bytes moved, for resid and the used length */
    uint64_t lba, nblocks;
    uint64_t start_ticks, stat_bytes;   /* bdev_get_iostat */
    uint32_t niov, blk_niov, ndesc, idesc;
    int io_status;
    uint8_t op, stage, is_write, fua, ws_type;
    uint8_t inline_wait, inline_done;
    uint8_t tmf_target, tmf_subtype;
    struct iovec blk_iov[WS_BLOCK_IOV];
    union {
        struct iovec iov[VN_MAX_IOV];
        struct unmap_desc unmap[MAX_UNMAP_DESC];
    } u;
};

_Static_assert(sizeof(struct scsi_req) <= VN_DEV_PRIV_SIZE, "scsi_req must fit in dev_priv");
/* The VPD page states the limit in blocks, config max_sectors in 512-byte sectors. */
_Static_assert(MAX_XFER_BYTES % 65536 == 0, "MAX_XFER_BYTES must be a whole number of blocks of any size");

static inline void put_be16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }
static inline void put_be32(uint8_t *p, uint32_t v) { put_be16(p, v >> 16); put_be16(p + 2, v); }
static inline void put_be64(uint8_t *p, uint64_t v) { put_be32(p, v >> 32); put_be32(p + 4, v); }
static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t be32(const uint8_t *p) { return (uint32_t)be16(p) << 16 | be16(p + 2); }
static inline uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }
static inline void put_le32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static inline uint32_t le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }

static inline int supports(const struct scsi_target *t, int type) { return (t->io_types >> type) & 1; }
static inline int has_write_cache(const struct scsi_target *t) { return supports(t, VN_IO_FLUSH); }
static inline int thin(const struct scsi_target *t) { return supports(t, VN_IO_UNMAP) && !t->readonly; }

static inline uint64_t max_unmap_blocks(const struct scsi_target *t) { return MAX_UNMAP_BYTES / t->block_size; }

static inline const struct iovec *in_iov(const vn_req *req) { return &req->iov[req->n_out]; }

/* ---- the transport's, for the emulation (virtio_scsi.c) ---- */

/* Answer a command: the virtio-scsi response header (response, SCSI status,
 * sense, residual), then hand the chain back. */
void scsi_respond(struct scsi_dev *d, struct scsi_req *sr, uint8_t response, uint8_t status,
                  const uint8_t *sense, uint32_t sense_len);
/* A transport-level failure (no SCSI status): OVERRUN, FAILURE, BAD_TARGET. */
void scsi_transport_fail(struct scsi_dev *d, struct scsi_req *sr, uint8_t response);
/* GOOD, with whatever data the command moved. */
void scsi_good(struct scsi_dev *d, struct scsi_req *sr);

/* ---- the emulation's, for the transport (scsi_lun.c) ---- */

/* Execute the CDB of a command addressed to LUN 0 of a present target (sr->t). */
void scsi_lun_execute(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb);
/* The same for a LUN other than 0: there is no logical unit there. */
void scsi_lun_absent(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb);
/* Go on with one command parked after its share of inline bdev work (round robin). */
int scsi_lun_resume_parked(struct scsi_dev *d);

#endif
