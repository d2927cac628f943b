/*
 * virtio-scsi request handling on the reactor (virtio 1.x, 5.6 SCSI Host Device)
 * and the SCSI emulation behind it (SPC-4 / SBC-3): one LUN per target, up to
 * SCSI_MAX_TARGETS targets per controller, each backed by a bdev.
 *
 * Queue 0 is the control queue (task management, asynchronous notification
 * queries), queue 1 the event queue (buffers are held until a hot-attach or
 * hot-detach fires an event), queues 2.. carry commands.  Every request header is
 * copied out of guest memory once before it is looked at; every length the guest
 * gives (CDB fields, parameter lists, buffers) is checked against the others
 * before a byte moves.
 */
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

static const uint8_t zero_block[65536];

static inline void put_be16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }
static inline void put_be32(uint8_t *p, uint32_t v) { put_be16(p, v >> 16); put_be16(p + 2, v); }
static inline void put_be64(uint8_t *p, uint64_t v) { put_be32(p, v >> 32); put_be32(p + 4, v); }
static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t be32(const uint8_t *p) { return (uint32_t)be16(p) << 16 | be16(p + 2); }
static inline uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }
static inline void put_le32(uint8_t *p, uint32_t v) { v = htole32(v); memcpy(p, &v, 4); }
static inline uint32_t le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return le32toh(v); }

static int supports(const struct scsi_target *t, int type) { return (t->io_types >> type) & 1; }
static int has_write_cache(const struct scsi_target *t) { return supports(t, VN_IO_FLUSH); }
static int thin(const struct scsi_target *t) { return supports(t, VN_IO_UNMAP) && !t->readonly; }

static uint64_t max_unmap_blocks(const struct scsi_target *t) { return MAX_UNMAP_BYTES / t->block_size; }

static const struct iovec *in_iov(const vn_req *req) { return &req->iov[req->n_out]; }

/* ------------------------------------------------------------------ */
/* responses                                                           */
/* ------------------------------------------------------------------ */

static void respond(struct scsi_dev *d, struct scsi_req *sr, uint8_t response, uint8_t status,
                    const uint8_t *sense, uint32_t sense_len)
{
    vn_req *req = sr->req;
    uint8_t hdr[12 + SENSE_SIZE];
    uint64_t total = sr->din_len + sr->dout_len;
    uint64_t resid = total > sr->xfer ? total - sr->xfer : 0;

    if (resid > UINT32_MAX) resid = UINT32_MAX;
    if (sense_len > SENSE_SIZE) sense_len = SENSE_SIZE;
    put_le32(hdr, sense_len);
    put_le32(hdr + 4, (uint32_t)resid);
    hdr[8] = hdr[9] = 0;
    hdr[10] = status;
    hdr[11] = response;
    if (sense_len) memcpy(hdr + 12, sense, sense_len);
    vn_iov_copy_to(in_iov(req), req->n_in, 0, hdr, 12 + sense_len);
    if (response == VIRTIO_SCSI_S_BAD_TARGET) d->stats.bad_target++;
    else if (response == VIRTIO_SCSI_S_OVERRUN) d->stats.overrun++;
    else if (response != VIRTIO_SCSI_S_OK) d->stats.invalid++;
    else if (status != GOOD) d->stats.check_conditions++;
    /* in_len <= UINT32_MAX was checked on entry and xfer never exceeds din_len. */
    req->complete(req, RESP_SIZE + (uint32_t)(sr->din_len ? sr->xfer : 0));
}

static void transport(struct scsi_dev *d, struct scsi_req *sr, uint8_t response)
{
    sr->xfer = 0;
    respond(d, sr, response, GOOD, NULL, 0);
}

static void good(struct scsi_dev *d, struct scsi_req *sr)
{
    respond(d, sr, VIRTIO_SCSI_S_OK, GOOD, NULL, 0);
}

/* Fixed-format sense data (SPC-4 4.5.3); `field` >= 0 adds a sense-key specific
 * field pointer into the CDB (cdb = 1) or the parameter list (cdb = 0). */
static uint32_t build_sense(uint8_t *s, uint8_t key, uint16_t asc, int field, int cdb)
{
    memset(s, 0, 18);
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc >> 8;
    s[13] = asc & 0xff;
    if (field >= 0) {
        s[15] = 0x80 | (cdb ? 0x40 : 0);
        put_be16(s + 16, (uint16_t)field);
    }
    return 18;
}

static void check(struct scsi_dev *d, struct scsi_req *sr, uint8_t key, uint16_t asc, int field, int cdb)
{
    uint8_t s[18];
    uint32_t n = build_sense(s, key, asc, field, cdb);
    sr->xfer = 0;
    respond(d, sr, VIRTIO_SCSI_S_OK, CHECK_CONDITION, s, n);
}

static void invalid_cdb(struct scsi_dev *d, struct scsi_req *sr, int field)
{
    check(d, sr, ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, field, 1);
}

static void invalid_param(struct scsi_dev *d, struct scsi_req *sr, int field)
{
    check(d, sr, ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAM, field, 0);
}

/* Send `len` bytes of emulated data-in, cut to the allocation length and to the
 * buffer the driver gave (an allocation length larger than the buffer is the
 * driver's lie: it gets what fits, and resid says how much that was). */
static void data_in(struct scsi_dev *d, struct scsi_req *sr, const void *buf, uint64_t len, uint64_t alloc)
{
    uint64_t n = len < alloc ? len : alloc;
    if (n > sr->din_len) n = sr->din_len;
    sr->xfer = vn_iov_copy_to(in_iov(sr->req), sr->req->n_in, RESP_SIZE, buf, n);
    good(d, sr);
}

static uint16_t take_ua(struct scsi_target *t)
{
    if (t->ua & UA_RESET) { t->ua &= ~UA_RESET; return ASC_BUS_DEVICE_RESET; }
    if (t->ua & UA_NEXUS_LOSS) { t->ua &= ~UA_NEXUS_LOSS; return ASC_I_T_NEXUS_LOSS; }
    if (t->ua & UA_LUNS_CHANGED) { t->ua &= ~UA_LUNS_CHANGED; return ASC_LUNS_CHANGED; }
    if (t->ua & UA_CAPACITY_CHANGED) { t->ua &= ~UA_CAPACITY_CHANGED; return ASC_CAPACITY_CHANGED; }
    return ASC_NONE;
}

/* ------------------------------------------------------------------ */
/* events                                                              */
/* ------------------------------------------------------------------ */

static void write_event(struct scsi_req *sr, uint32_t event, int target, uint32_t reason)
{
    uint8_t ev[EVENT_SIZE];
    memset(ev, 0, sizeof(ev));
    put_le32(ev, event);
    if (target >= 0) {
        ev[4] = 1;
        ev[5] = (uint8_t)target;
    }
    put_le32(ev + 12, reason);
    vn_iov_copy_to(in_iov(sr->req), sr->req->n_in, 0, ev, sizeof(ev));
    sr->req->complete(sr->req, EVENT_SIZE);
}

static struct scsi_req *pop_event(struct scsi_dev *d)
{
    struct scsi_req *sr = d->ev_head;
    if (sr) {
        d->ev_head = sr->next;
        if (!d->ev_head) d->ev_tail = NULL;
        d->ev_held--;
    }
    return sr;
}

/* Complete a held event buffer with `event`; with none held, flag EVENTS_MISSED
 * on the next one instead. */
static void send_event(struct scsi_dev *d, uint32_t event, int target, uint32_t reason)
{
    struct scsi_req *sr = pop_event(d);
    if (!sr) {
        d->events_missed = 1;
        d->stats.events_missed++;
        return;
    }
    if (d->events_missed) event |= VIRTIO_SCSI_T_EVENTS_MISSED;
    d->events_missed = 0;
    d->stats.events_sent++;
    write_event(sr, event, target, reason);
}

/* A target appeared or went away: tell the driver with a transport reset event
 * (VIRTIO_SCSI_F_HOTPLUG), or else with a unit attention on the other targets. */
static void notify(struct scsi_dev *d, int target, uint32_t reason)
{
    if (!d->hotplug) {
        for (int i = 0; i < SCSI_MAX_TARGETS; i++)
            if (i != target && d->tgt[i].state == TGT_PRESENT) d->tgt[i].ua |= UA_LUNS_CHANGED;
        return;
    }
    send_event(d, VIRTIO_SCSI_T_TRANSPORT_RESET, target, reason);
}

static void event_submit(struct scsi_dev *d, struct scsi_req *sr)
{
    vn_req *req = sr->req;
    if (req->error || req->in_len < EVENT_SIZE) {
        d->stats.invalid++;
        req->complete(req, 0);
        return;
    }
    if (d->events_missed) {
        d->events_missed = 0;
        d->stats.events_sent++;
        write_event(sr, VIRTIO_SCSI_T_NO_EVENT | VIRTIO_SCSI_T_EVENTS_MISSED, -1, 0);
        return;
    }
    sr->next = NULL;
    if (d->ev_tail) d->ev_tail->next = sr;
    else d->ev_head = sr;
    d->ev_tail = sr;
    d->ev_held++;
}

/* ------------------------------------------------------------------ */
/* control queue                                                       */
/* ------------------------------------------------------------------ */

/* LUN field of a request: the LUN number, or -1 for an address we do not use. */
static int parse_lun(const uint8_t *lun)
{
    if (lun[4] | lun[5] | lun[6] | lun[7]) return -1;
    switch (lun[2] >> 6) {
    case 0:                     /* peripheral device addressing, bus 0 */
        return lun[2] ? -1 : lun[3];
    case 1:                     /* flat space addressing (what Linux sends) */
        return ((lun[2] & 0x3f) << 8) | lun[3];
    default:
        return -1;
    }
}

static struct scsi_target *lookup_target(struct scsi_dev *d, const uint8_t *lun)
{
    if (lun[0] != 1 || lun[1] >= SCSI_MAX_TARGETS) return NULL;
    struct scsi_target *t = &d->tgt[lun[1]];
    if (t->state != TGT_PRESENT || !vn_desc_usable(t->desc)) return NULL;
    return t;
}

static void ctrl_reply(vn_req *req, const void *resp, uint32_t len)
{
    vn_iov_copy_to(in_iov(req), req->n_in, 0, resp, len);
    req->complete(req, len);
}

static void tmf_finish(struct scsi_dev *d, struct scsi_req *sr, uint8_t resp)
{
    struct scsi_target *t = &d->tgt[sr->tmf_target];
    if (resp == VIRTIO_SCSI_S_FUNCTION_COMPLETE && t->state == TGT_PRESENT) {
        if (sr->tmf_subtype == TMF_LOGICAL_UNIT_RESET) t->ua |= UA_RESET;
        else if (sr->tmf_subtype == TMF_I_T_NEXUS_RESET) t->ua |= UA_NEXUS_LOSS;
    }
    ctrl_reply(sr->req, &resp, 1);
}

/* Every command that was in flight on the target when the TMF arrived is done. */
static int tmf_ready(const struct scsi_target *t, const struct scsi_req *tmf)
{
    return !t->oldest || t->oldest->seq >= tmf->seq;
}

/* Complete the target's held TMFs that wait on nothing any more; with `force`,
 * all of them, rejecting those that still would (their queue is stopping).  They
 * are held in arrival order, so the first that must wait ends the pass. */
static int tmf_release(struct scsi_dev *d, struct scsi_target *t, int force)
{
    int n = 0;
    struct scsi_req *sr;
    while ((sr = t->tmf_head) != NULL) {
        int ready = tmf_ready(t, sr);
        if (!ready && !force) break;
        t->tmf_head = sr->next;
        if (!t->tmf_head) t->tmf_tail = NULL;
        d->tmf_held--;
        tmf_finish(d, sr, ready ? VIRTIO_SCSI_S_FUNCTION_COMPLETE : VIRTIO_SCSI_S_FUNCTION_REJECTED);
        n++;
    }
    return n;
}

static void tmf_submit(struct scsi_dev *d, struct scsi_req *sr)
{
    vn_req *req = sr->req;
    uint8_t tmf[TMF_REQ_SIZE], resp;
    vn_iov_copy_from(req->iov, req->n_out, 0, tmf, sizeof(tmf));
    uint32_t subtype = le32(tmf + 4);
    struct scsi_target *t = lookup_target(d, tmf + 8);
    d->stats.tmfs++;
    if (!t) {
        resp = VIRTIO_SCSI_S_BAD_TARGET;
        ctrl_reply(req, &resp, 1);
        return;
    }
    if (parse_lun(tmf + 8) != 0) {
        resp = VIRTIO_SCSI_S_INCORRECT_LUN;
        ctrl_reply(req, &resp, 1);
        return;
    }
    switch (subtype) {
    case TMF_ABORT_TASK:
    case TMF_ABORT_TASK_SET:
    case TMF_CLEAR_TASK_SET:
    case TMF_I_T_NEXUS_RESET:
    case TMF_LOGICAL_UNIT_RESET:
        /* Commands cannot be recalled from a bdev: the function completes once
         * every command the logical unit had when it arrived has.  Not those sent
         * after it: a driver that keeps I/O flowing would hold it forever. */
        sr->tmf_target = (uint8_t)(t - d->tgt);
        sr->tmf_subtype = (uint8_t)subtype;
        sr->seq = t->next_seq;
        if (tmf_ready(t, sr)) {
            tmf_finish(d, sr, VIRTIO_SCSI_S_FUNCTION_COMPLETE);
        } else {
            sr->next = NULL;
            if (t->tmf_tail) t->tmf_tail->next = sr;
            else t->tmf_head = sr;
            t->tmf_tail = sr;
            d->tmf_held++;
        }
        return;
    default:
        /* CLEAR ACA (we never establish ACA), QUERY TASK / TASK SET and the
         * unknown ones. */
        resp = VIRTIO_SCSI_S_FUNCTION_REJECTED;
        ctrl_reply(req, &resp, 1);
        return;
    }
}

static void ctrl_submit(struct scsi_dev *d, struct scsi_req *sr)
{
    vn_req *req = sr->req;
    uint8_t type_buf[4];
    if (req->error || req->out_len < 4) {
        d->stats.invalid++;
        req->complete(req, 0);
        return;
    }
    vn_iov_copy_from(req->iov, req->n_out, 0, type_buf, 4);
    uint32_t type = le32(type_buf);
    switch (type) {
    case VIRTIO_SCSI_T_TMF:
        if (req->in_len < 1) break;
        if (req->out_len < TMF_REQ_SIZE) {
            uint8_t resp = VIRTIO_SCSI_S_FAILURE;
            d->stats.invalid++;
            ctrl_reply(req, &resp, 1);
            return;
        }
        tmf_submit(d, sr);
        return;
    case VIRTIO_SCSI_T_AN_QUERY:
    case VIRTIO_SCSI_T_AN_SUBSCRIBE: {
        uint8_t an[AN_REQ_SIZE], resp[AN_RESP_SIZE];
        if (req->in_len < AN_RESP_SIZE) break;
        memset(resp, 0, sizeof(resp));
        if (req->out_len < AN_REQ_SIZE) {
            resp[4] = VIRTIO_SCSI_S_FAILURE;
            d->stats.invalid++;
        } else {
            vn_iov_copy_from(req->iov, req->n_out, 0, an, sizeof(an));
            /* No asynchronous event is supported: event_actual stays 0. */
            resp[4] = lookup_target(d, an + 4) ? VIRTIO_SCSI_S_OK : VIRTIO_SCSI_S_BAD_TARGET;
        }
        ctrl_reply(req, resp, sizeof(resp));
        return;
    }
    default:
        break;
    }
    /* Unknown request type, or no room for the response it would need. */
    d->stats.invalid++;
    req->complete(req, 0);
}

/* ------------------------------------------------------------------ */
/* bdev I/O                                                            */
/* ------------------------------------------------------------------ */

static void step(struct scsi_dev *d, struct scsi_req *sr);

static void io_done(vn_bdev_io *io, int status)
{
    struct scsi_req *sr = io->cb_arg;
    if (status && !sr->io_status) sr->io_status = status;
    if (sr->inline_wait) {
        sr->inline_done = 1;
        return;
    }
    step(sr->req->dev_ctx, sr);
}

/* Fill `io` with the command's next bdev I/O; 0 when there is none left. */
static int next_io(struct scsi_req *sr, vn_bdev_io *io)
{
    struct scsi_target *t = sr->t;
    io->iov = NULL;
    io->iovcnt = 0;
    switch (sr->op) {
    case OP_RW:
        if (sr->stage == 0) {
            sr->stage = 1;
            io->type = sr->is_write ? VN_IO_WRITE : VN_IO_READ;
            io->offset_blocks = sr->lba;
            io->num_blocks = sr->nblocks;
            io->iov = sr->u.iov;
            io->iovcnt = sr->niov;
            return 1;
        }
        if (sr->stage == 1 && sr->is_write && sr->fua && supports(t, VN_IO_FLUSH)) {
            sr->stage = 2;
            io->type = VN_IO_FLUSH;
            io->offset_blocks = 0;
            io->num_blocks = t->num_blocks;
            return 1;
        }
        return 0;
    case OP_FLUSH:
        if (sr->stage++) return 0;
        io->type = VN_IO_FLUSH;
        io->offset_blocks = 0;
        io->num_blocks = t->num_blocks;
        return 1;
    case OP_UNMAP:
        while (sr->idesc < sr->ndesc) {
            const struct unmap_desc *u = &sr->u.unmap[sr->idesc++];
            if (u->n == 0) continue;
            io->type = VN_IO_UNMAP;
            io->offset_blocks = u->lba;
            io->num_blocks = u->n;
            return 1;
        }
        return 0;
    case OP_WS_ZERO:
        if (sr->stage++) return 0;
        io->type = sr->ws_type;
        io->offset_blocks = sr->lba;
        io->num_blocks = sr->nblocks;
        return 1;
    case OP_WS_DATA: {
        if (sr->nblocks == 0) return 0;
        /* Each write repeats the block's segments; with large blocks the segment
         * count is not what bounds it: bdevs refuse I/O over VN_MAX_TRANSFER. */
        uint64_t chunk = VN_MAX_IOV / sr->blk_niov;
        if (chunk > MAX_XFER_BYTES / t->block_size) chunk = MAX_XFER_BYTES / t->block_size;
        if (chunk > sr->nblocks) chunk = sr->nblocks;
        uint32_t n = 0;
        for (uint64_t b = 0; b < chunk; b++)
            for (uint32_t i = 0; i < sr->blk_niov; i++) sr->u.iov[n++] = sr->blk_iov[i];
        io->type = VN_IO_WRITE;
        io->offset_blocks = sr->lba;
        io->num_blocks = chunk;
        io->iov = sr->u.iov;
        io->iovcnt = n;
        sr->lba += chunk;
        sr->nblocks -= chunk;
        return 1;
    }
    }
    return 0;
}

static void finish_io(struct scsi_dev *d, struct scsi_req *sr)
{
    struct scsi_target *t = sr->t;
    t->outstanding--;
    if (sr->older) sr->older->newer = sr->newer;
    else t->oldest = sr->newer;
    if (sr->newer) sr->newer->older = sr->older;
    else t->newest = sr->older;
    if (sr->io_status == -ERANGE) {
        check(d, sr, ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, NOFIELD, 0);
        return;
    }
    if (sr->io_status) {
        d->stats.io_errors++;
        if (sr->op == OP_RW && !sr->is_write)
            check(d, sr, MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR, NOFIELD, 0);
        else if (sr->op == OP_RW || sr->op == OP_WS_DATA)
            check(d, sr, MEDIUM_ERROR, ASC_WRITE_ERROR, NOFIELD, 0);
        else
            check(d, sr, HARDWARE_ERROR, ASC_INTERNAL_TARGET_FAILURE, NOFIELD, 0);
        return;
    }
    enum vn_stat_kind kind;
    switch (sr->op) {
    case OP_RW:
        if (sr->is_write) { d->stats.writes++; d->stats.bytes_written += sr->xfer; kind = VN_STAT_WRITE; }
        else { d->stats.reads++; d->stats.bytes_read += sr->xfer; kind = VN_STAT_READ; }
        break;
    case OP_FLUSH: d->stats.flushes++; kind = VN_STAT_FLUSH; break;
    case OP_UNMAP: d->stats.unmaps++; kind = VN_STAT_UNMAP; break;
    case OP_WS_ZERO: d->stats.write_sames++; kind = VN_STAT_WRITE_ZEROES; break;
    default: d->stats.write_sames++; kind = VN_STAT_WRITE; break;
    }
    vn_desc_account(t->desc, kind, sr->stat_bytes, sr->start_ticks);
    good(d, sr);
}

/* Run the command's bdev I/Os one after the other.  A bdev that completes inline
 * (malloc) calls io_done from inside submit: that only marks the I/O done and the
 * loop carries on, so a long WRITE SAME or UNMAP list never recurses.  Such a bdev
 * copies or zeroes on this thread, though: once a command has had more than one
 * maximum transfer's worth done inline, the rest waits for the next reactor
 * iteration (scsi_poll), or a WRITE SAME of gigabytes would be one long memcpy
 * that every other device on the reactor waits for.  A single READ or WRITE
 * never reaches that. */
static void step(struct scsi_dev *d, struct scsi_req *sr)
{
    struct scsi_target *t = sr->t;
    uint64_t inline_bytes = 0;
    for (;;) {
        if (sr->io_status || !next_io(sr, &sr->io)) {
            finish_io(d, sr);
            return;
        }
        /* The disk may have shrunk (a resize) since the command was checked, while
         * its earlier I/Os ran: the rest must not go past the new end (nor to a
         * descriptor the core closed under it). */
        const vn_bdev *b = t->desc->bdev;
        uint64_t nb = b ? __atomic_load_n(&b->num_blocks, __ATOMIC_RELAXED) : 0;
        if (sr->io.type != VN_IO_FLUSH &&
            (sr->io.offset_blocks > nb || sr->io.num_blocks > nb - sr->io.offset_blocks)) {
            sr->io_status = -ERANGE;
            finish_io(d, sr);
            return;
        }
        /* Counted once per command, in finish_io. */
        sr->io.flags = VN_IO_F_NO_STAT;
        sr->inline_wait = 1;
        sr->inline_done = 0;
        vn_desc_submit(t->desc, &sr->io, io_done, sr);
        sr->inline_wait = 0;
        if (!sr->inline_done) return;
        if (sr->io.type != VN_IO_FLUSH) inline_bytes += sr->io.num_blocks * t->block_size;
        if (inline_bytes > MAX_XFER_BYTES && !sr->io_status) {
            sr->next = NULL;
            if (d->resume_tail) d->resume_tail->next = sr;
            else d->resume_head = sr;
            d->resume_tail = sr;
            return;
        }
    }
}

/* One parked command per reactor iteration, round robin (one that uses up its
 * share again goes to the back): however many a driver parks, an iteration does
 * one share of their work, as it would for one such command. */
static int resume_parked(struct scsi_dev *d)
{
    struct scsi_req *sr = d->resume_head;
    d->resume_head = sr->next;
    if (!d->resume_head) d->resume_tail = NULL;
    step(d, sr);
    return 1;
}

static void start_io(struct scsi_dev *d, struct scsi_req *sr, uint8_t op)
{
    uint64_t blocks = sr->nblocks;
    if (op == OP_FLUSH) blocks = 0;
    else if (op == OP_UNMAP) {
        blocks = 0;
        for (uint32_t i = 0; i < sr->ndesc; i++) blocks += sr->u.unmap[i].n;
    }
    sr->stat_bytes = blocks * sr->t->block_size;
    sr->start_ticks = vn_desc_now(sr->t->desc);
    sr->op = op;
    sr->stage = 0;
    sr->io_status = 0;
    struct scsi_target *t = sr->t;
    t->outstanding++;
    sr->seq = t->next_seq++;
    sr->newer = NULL;
    sr->older = t->newest;
    if (t->newest) t->newest->newer = sr;
    else t->oldest = sr;
    t->newest = sr;
    step(d, sr);
}

/* ------------------------------------------------------------------ */
/* SCSI commands                                                       */
/* ------------------------------------------------------------------ */

static int lba_out_of_range(const struct scsi_target *t, uint64_t lba, uint64_t n)
{
    return lba > t->num_blocks || n > t->num_blocks - lba;
}

static void cmd_rw(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    vn_req *req = sr->req;
    uint64_t lba;
    uint32_t n;
    int len_field, flags = 0;
    int is_write = cdb[0] == 0x0a || cdb[0] == 0x2a || cdb[0] == 0xaa || cdb[0] == 0x8a;

    switch (cdb[0]) {
    case 0x08: case 0x0a:
        lba = (uint64_t)(cdb[1] & 0x1f) << 16 | be16(cdb + 2);
        n = cdb[4] ? cdb[4] : 256;
        len_field = 4;
        break;
    case 0x28: case 0x2a:
        flags = cdb[1];
        lba = be32(cdb + 2);
        n = be16(cdb + 7);
        len_field = 7;
        break;
    case 0xa8: case 0xaa:
        flags = cdb[1];
        lba = be32(cdb + 2);
        n = be32(cdb + 6);
        len_field = 6;
        break;
    default: /* 0x88, 0x8a */
        flags = cdb[1];
        lba = be64(cdb + 2);
        n = be32(cdb + 10);
        len_field = 10;
        break;
    }
    if (flags & 0xe0) {         /* RDPROTECT / WRPROTECT: no protection information */
        invalid_cdb(d, sr, 1);
        return;
    }
    if (lba_out_of_range(t, lba, n)) {
        check(d, sr, ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, NOFIELD, 0);
        return;
    }
    if (is_write && t->readonly) {
        check(d, sr, DATA_PROTECT, ASC_WRITE_PROTECTED, NOFIELD, 0);
        return;
    }
    if (n == 0) {
        good(d, sr);
        return;
    }
    if ((uint64_t)n * t->block_size > MAX_XFER_BYTES) {
        invalid_cdb(d, sr, len_field);
        return;
    }
    uint64_t bytes = (uint64_t)n * t->block_size;
    int niov;
    if (is_write) {
        if (bytes > sr->dout_len) { transport(d, sr, VIRTIO_SCSI_S_OVERRUN); return; }
        niov = vn_iov_slice(req->iov, req->n_out, REQ_SIZE, bytes, sr->u.iov, VN_MAX_IOV);
    } else {
        if (bytes > sr->din_len) { transport(d, sr, VIRTIO_SCSI_S_OVERRUN); return; }
        niov = vn_iov_slice(in_iov(req), req->n_in, RESP_SIZE, bytes, sr->u.iov, VN_MAX_IOV);
    }
    if (niov < 0) {
        transport(d, sr, VIRTIO_SCSI_S_FAILURE);
        return;
    }
    sr->niov = (uint32_t)niov;
    sr->is_write = is_write;
    sr->fua = (flags & 0x08) != 0;
    sr->lba = lba;
    sr->nblocks = n;
    sr->xfer = bytes;
    start_io(d, sr, OP_RW);
}

static void cmd_sync_cache(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    uint64_t lba = cdb[0] == 0x35 ? be32(cdb + 2) : be64(cdb + 2);
    uint64_t n = cdb[0] == 0x35 ? be16(cdb + 7) : be32(cdb + 10);
    if (lba_out_of_range(t, lba, n)) {
        check(d, sr, ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, NOFIELD, 0);
        return;
    }
    if (!supports(t, VN_IO_FLUSH)) {
        good(d, sr);
        return;
    }
    start_io(d, sr, OP_FLUSH);
}

static void cmd_write_same(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    int ws16 = cdb[0] == 0x93;
    uint64_t lba = ws16 ? be64(cdb + 2) : be32(cdb + 2);
    uint64_t n = ws16 ? be32(cdb + 10) : be16(cdb + 7);
    int ndob = ws16 && (cdb[1] & 0x01);
    int unmap = (cdb[1] & 0x08) != 0;
    /* WRPROTECT, ANCHOR (not supported), PBDATA/LBDATA (obsolete); bit 0 is NDOB
     * in WRITE SAME (16) and reserved in WRITE SAME (10) */
    if ((cdb[1] & 0xf6) || (!ws16 && (cdb[1] & 0x01))) {
        invalid_cdb(d, sr, 1);
        return;
    }
    if (n == 0 || n > max_unmap_blocks(t)) {  /* WSNZ = 1; MAXIMUM WRITE SAME LENGTH */
        invalid_cdb(d, sr, ws16 ? 10 : 7);
        return;
    }
    if (lba_out_of_range(t, lba, n)) {
        check(d, sr, ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, NOFIELD, 0);
        return;
    }
    if (t->readonly) {
        check(d, sr, DATA_PROTECT, ASC_WRITE_PROTECTED, NOFIELD, 0);
        return;
    }
    int zero = 1;
    if (!ndob) {
        if (sr->dout_len < t->block_size) { transport(d, sr, VIRTIO_SCSI_S_OVERRUN); return; }
        int k = vn_iov_slice(sr->req->iov, sr->req->n_out, REQ_SIZE, t->block_size, sr->blk_iov, WS_BLOCK_IOV);
        if (k < 0) { transport(d, sr, VIRTIO_SCSI_S_FAILURE); return; }
        sr->blk_niov = (uint32_t)k;
        for (int i = 0; i < k && zero; i++) {
            const uint8_t *p = sr->blk_iov[i].iov_base;
            for (size_t j = 0; j < sr->blk_iov[i].iov_len; j++)
                if (p[j]) { zero = 0; break; }
        }
        sr->xfer = t->block_size;
    }
    sr->lba = lba;
    sr->nblocks = n;
    if (zero && supports(t, VN_IO_WRITE_ZEROES)) {
        sr->ws_type = VN_IO_WRITE_ZEROES;
        start_io(d, sr, OP_WS_ZERO);
        return;
    }
    (void)unmap;    /* without LBPRZ an unmap would not guarantee the zeros: write them */
    if (ndob) {
        sr->blk_iov[0].iov_base = (void *)zero_block;
        sr->blk_iov[0].iov_len = t->block_size;
        sr->blk_niov = 1;
    }
    start_io(d, sr, OP_WS_DATA);
}

static void cmd_unmap(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    uint8_t hdr[8], desc[16];
    if (!thin(t)) {
        check(d, sr, ILLEGAL_REQUEST, ASC_INVALID_OPCODE, 0, 1);
        return;
    }
    if (cdb[1] & 0x01) {        /* ANCHOR */
        invalid_cdb(d, sr, 1);
        return;
    }
    uint32_t plen = be16(cdb + 7);
    if (plen == 0) {
        good(d, sr);
        return;
    }
    if (plen < 8) {
        check(d, sr, ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH_ERROR, NOFIELD, 0);
        return;
    }
    if (plen > sr->dout_len) {
        transport(d, sr, VIRTIO_SCSI_S_OVERRUN);
        return;
    }
    vn_iov_copy_from(sr->req->iov, sr->req->n_out, REQ_SIZE, hdr, sizeof(hdr));
    uint32_t bdl = be16(hdr + 2);
    if (bdl > plen - 8) bdl = plen - 8;
    uint32_t ndesc = bdl / 16;
    if (ndesc > MAX_UNMAP_DESC) {
        invalid_param(d, sr, 2);
        return;
    }
    uint64_t total = 0;
    for (uint32_t i = 0; i < ndesc; i++) {
        vn_iov_copy_from(sr->req->iov, sr->req->n_out, REQ_SIZE + 8 + 16 * i, desc, sizeof(desc));
        uint64_t lba = be64(desc);
        uint64_t n = be32(desc + 8);
        if (lba_out_of_range(t, lba, n)) {
            check(d, sr, ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, NOFIELD, 0);
            return;
        }
        /* MAXIMUM UNMAP LBA COUNT bounds the whole list (SBC-3, UNMAP), not each
         * descriptor: 64 descriptors of the maximum would be 64 times the work. */
        total += n;
        if (total > max_unmap_blocks(t)) {
            invalid_param(d, sr, 8 + 16 * i + 8);
            return;
        }
        sr->u.unmap[i].lba = lba;
        sr->u.unmap[i].n = n;
    }
    sr->ndesc = ndesc;
    sr->idesc = 0;
    sr->xfer = plen;
    start_io(d, sr, OP_UNMAP);
}

static uint32_t std_inquiry(const struct scsi_target *t, uint8_t *b, int present)
{
    static const uint16_t versions[] = { 0x00a0 /* SAM-5 */, 0x0460 /* SPC-4 */, 0x04c0 /* SBC-3 */ };
    memset(b, 0, 96);
    b[0] = present ? 0x00 : 0x7f;   /* direct access block device, or PQ 011b: no LUN here */
    b[2] = 0x06;                    /* SPC-4 */
    b[3] = 0x02;                    /* response data format 2 */
    b[4] = 96 - 5;
    b[7] = 0x02;                    /* CMDQUE */
    memcpy(b + 8, "INTEL   ", 8);
    memcpy(b + 16, t->product, 16);
    memcpy(b + 32, "0001", 4);
    for (int i = 0; i < 3; i++) put_be16(b + 58 + 2 * i, versions[i]);
    return 96;
}

static void cmd_inquiry(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    uint8_t b[256];
    uint32_t len;
    uint16_t alloc = be16(cdb + 3);
    if (cdb[1] & 0xfe) {        /* CMDDT (obsolete) and reserved bits */
        invalid_cdb(d, sr, 1);
        return;
    }
    if (!(cdb[1] & 0x01)) {
        if (cdb[2]) { invalid_cdb(d, sr, 2); return; }
        len = std_inquiry(t, b, 1);
        data_in(d, sr, b, len, alloc);
        return;
    }
    memset(b, 0, sizeof(b));
    b[1] = cdb[2];
    switch (cdb[2]) {
    case 0x00: {                /* supported VPD pages */
        static const uint8_t pages[] = { 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2 };
        memcpy(b + 4, pages, sizeof(pages));
        len = 4 + sizeof(pages);
        break;
    }
    case 0x80:                  /* unit serial number: the bdev name, as SPDK */
        memcpy(b + 4, t->serial, t->serial_len);
        len = 4 + t->serial_len;
        break;
    case 0x83: {                /* device identification */
        uint8_t *p = b + 4;
        p[0] = 0x01;            /* binary */
        p[1] = 0x03;            /* associated with the LU, NAA */
        p[3] = 8;
        memcpy(p + 4, t->naa, 8);
        p += 12;
        p[0] = 0x02;            /* ASCII */
        p[1] = 0x01;            /* associated with the LU, T10 vendor ID based */
        p[3] = (uint8_t)(8 + t->t10_id_len);
        memcpy(p + 4, "INTEL   ", 8);
        memcpy(p + 12, t->t10_id, t->t10_id_len);
        p += 12 + t->t10_id_len;
        len = (uint32_t)(p - b);
        break;
    }
    case 0xb0: {                /* block limits */
        b[3] = 0x3c;
        b[4] = 0x01;            /* WSNZ */
        put_be32(b + 8, MAX_XFER_BYTES / t->block_size);
        if (thin(t)) {
            put_be32(b + 20, (uint32_t)max_unmap_blocks(t));
            put_be32(b + 24, MAX_UNMAP_DESC);
            put_be32(b + 28, 1);
        }
        put_be64(b + 36, max_unmap_blocks(t));
        len = 64;
        break;
    }
    case 0xb1:                  /* block device characteristics */
        b[3] = 0x3c;
        put_be16(b + 4, 0x0001); /* non-rotating medium */
        len = 64;
        break;
    case 0xb2:                  /* logical block provisioning */
        b[3] = 0x04;
        if (thin(t)) {
            b[5] = 0x80 | 0x40 | 0x20;  /* LBPU, LBPWS, LBPWS10 */
            b[6] = 0x02;                /* thin provisioned */
        }
        len = 8;
        break;
    default:
        invalid_cdb(d, sr, 2);
        return;
    }
    put_be16(b + 2, (uint16_t)(len - 4));
    data_in(d, sr, b, len, alloc);
}

/* One mode page (current/default values, or the changeable mask: all zeros). */
static int mode_page(const struct scsi_target *t, uint8_t code, int changeable, uint8_t *p)
{
    switch (code) {
    case 0x08:                  /* caching */
        memset(p, 0, 20);
        p[0] = 0x08;
        p[1] = 0x12;
        if (!changeable && has_write_cache(t)) p[2] = 0x04;    /* WCE */
        return 20;
    case 0x0a:                  /* control */
        memset(p, 0, 12);
        p[0] = 0x0a;
        p[1] = 0x0a;
        if (!changeable) {
            p[2] = 0x02;        /* GLTSD; D_SENSE = 0: fixed format sense */
            p[3] = 0x10;        /* queue algorithm modifier 1: unrestricted reordering */
            put_be16(p + 8, 0xffff);
        }
        return 12;
    }
    return -1;
}

static void cmd_mode_sense(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    int ten = cdb[0] == 0x5a;
    int dbd = (cdb[1] & 0x08) != 0;
    int llbaa = ten && (cdb[1] & 0x10);
    uint8_t pc = cdb[2] >> 6, page = cdb[2] & 0x3f, sub = cdb[3];
    uint32_t alloc = ten ? be16(cdb + 7) : cdb[4];
    uint8_t b[128];
    memset(b, 0, sizeof(b));

    if (pc == 3) {
        check(d, sr, ILLEGAL_REQUEST, ASC_SAVING_PARAMS_UNSUP, NOFIELD, 0);
        return;
    }
    if (sub != 0 && sub != 0xff) { invalid_cdb(d, sr, 3); return; }
    if (page != 0x08 && page != 0x0a && page != 0x3f) { invalid_cdb(d, sr, 2); return; }

    uint32_t hdr = ten ? 8 : 4, bdl = dbd ? 0 : (llbaa ? 16 : 8), off = hdr;
    uint8_t devspec = (t->readonly ? 0x80 : 0) | (has_write_cache(t) ? 0x10 : 0);  /* WP, DPOFUA */
    if (bdl == 8) {
        put_be32(b + off, t->num_blocks > 0xffffffffu ? 0xffffffffu : (uint32_t)t->num_blocks);
        put_be32(b + off + 4, t->block_size);   /* byte 4 (density code) is 0 */
    } else if (bdl == 16) {
        put_be64(b + off, t->num_blocks);
        put_be32(b + off + 12, t->block_size);
    }
    off += bdl;
    if (page == 0x08 || page == 0x3f) off += mode_page(t, 0x08, pc == 1, b + off);
    if (page == 0x0a || page == 0x3f) off += mode_page(t, 0x0a, pc == 1, b + off);
    if (ten) {
        put_be16(b, (uint16_t)(off - 2));
        b[3] = devspec;
        b[4] = llbaa ? 0x01 : 0x00;     /* LONGLBA */
        put_be16(b + 6, (uint16_t)bdl);
    } else {
        b[0] = (uint8_t)(off - 1);
        b[2] = devspec;
        b[3] = (uint8_t)bdl;
    }
    data_in(d, sr, b, off, alloc);
}

static void cmd_mode_select(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    int ten = cdb[0] == 0x55;
    uint32_t plen = ten ? be16(cdb + 7) : cdb[4];
    uint32_t hdr = ten ? 8 : 4;
    uint8_t p[512], cur[32];

    if (cdb[1] & 0x01) {        /* SP: nothing can be saved */
        invalid_cdb(d, sr, 1);
        return;
    }
    if (plen == 0) { good(d, sr); return; }
    if (plen > sr->dout_len) { transport(d, sr, VIRTIO_SCSI_S_OVERRUN); return; }
    if (plen < hdr || plen > sizeof(p)) {
        check(d, sr, ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH_ERROR, NOFIELD, 0);
        return;
    }
    vn_iov_copy_from(sr->req->iov, sr->req->n_out, REQ_SIZE, p, plen);
    uint32_t bdl = ten ? be16(p + 6) : p[3];
    int longlba = ten && (p[4] & 0x01);
    if (hdr + bdl > plen) {
        check(d, sr, ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH_ERROR, NOFIELD, 0);
        return;
    }
    if (bdl) {
        uint32_t want = longlba ? 16 : 8;
        if (bdl != want) { invalid_param(d, sr, ten ? 6 : 3); return; }
        uint32_t bs = longlba ? be32(p + hdr + 12) : (be32(p + hdr + 4) & 0xffffff);
        if (bs != t->block_size) { invalid_param(d, sr, hdr + (longlba ? 12 : 5)); return; }
    }
    uint32_t off = hdr + bdl;
    while (off < plen) {
        if (plen - off < 2) {
            check(d, sr, ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH_ERROR, NOFIELD, 0);
            return;
        }
        uint32_t len = 2u + p[off + 1];
        if (off + len > plen) {
            check(d, sr, ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH_ERROR, NOFIELD, 0);
            return;
        }
        int n = (p[off] & 0x40) ? -1 : mode_page(t, p[off] & 0x3f, 0, cur);
        if (n < 0 || (uint32_t)n != len) { invalid_param(d, sr, off); return; }
        /* Nothing is changeable: every field must keep its current value. */
        for (uint32_t i = 2; i < len; i++)
            if (p[off + i] != cur[i]) { invalid_param(d, sr, off + i); return; }
        off += len;
    }
    sr->xfer = plen;
    good(d, sr);
}

static void cmd_report_luns(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    uint8_t b[16];
    uint32_t alloc = be32(cdb + 6);
    if (alloc < 16) { invalid_cdb(d, sr, 6); return; }
    memset(b, 0, sizeof(b));
    switch (cdb[2]) {
    case 0x00:                  /* all LUNs (LUN 0) */
    case 0x02:
        put_be32(b, 8);
        break;
    case 0x01:                  /* well known LUNs only: none */
        break;
    default:
        invalid_cdb(d, sr, 2);
        return;
    }
    sr->t->ua &= ~UA_LUNS_CHANGED;
    data_in(d, sr, b, cdb[2] == 0x01 ? 8 : 16, alloc);
}

static void cmd_read_capacity(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    uint8_t b[32];
    uint64_t last = t->num_blocks - 1;
    memset(b, 0, sizeof(b));
    if (cdb[0] == 0x25) {
        if (!(cdb[8] & 0x01) && be32(cdb + 2)) { invalid_cdb(d, sr, 2); return; }
        put_be32(b, last > 0xffffffffu ? 0xffffffffu : (uint32_t)last);
        put_be32(b + 4, t->block_size);
        data_in(d, sr, b, 8, 8);
        return;
    }
    put_be64(b, last);
    put_be32(b + 8, t->block_size);
    if (thin(t)) b[14] = 0x80;  /* LBPME */
    data_in(d, sr, b, 32, be32(cdb + 10));
}

static void cmd_request_sense(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb, int present)
{
    uint8_t s[18];
    if (cdb[1] & 0x01) {        /* DESC: only fixed format sense is supported */
        invalid_cdb(d, sr, 1);
        return;
    }
    uint16_t asc = present ? take_ua(sr->t) : ASC_LUN_NOT_SUPPORTED;
    uint8_t key = asc == ASC_NONE ? NO_SENSE : (present ? UNIT_ATTENTION : ILLEGAL_REQUEST);
    build_sense(s, key, asc, NOFIELD, 0);
    data_in(d, sr, s, 18, cdb[4]);
}

/* A LUN other than 0 on a present target: there is no logical unit there. */
static void absent_lun(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    uint8_t b[96];
    switch (cdb[0]) {
    case 0x12:
        if (cdb[1] & 0x01 || cdb[2]) break;
        data_in(d, sr, b, std_inquiry(sr->t, b, 0), be16(cdb + 3));
        return;
    case 0xa0:
        cmd_report_luns(d, sr, cdb);
        return;
    case 0x03:
        cmd_request_sense(d, sr, cdb, 0);
        return;
    }
    check(d, sr, ILLEGAL_REQUEST, ASC_LUN_NOT_SUPPORTED, NOFIELD, 0);
}

/* CDB length by group code, 0 for groups without a fixed length. */
static int cdb_len(uint8_t op)
{
    switch (op >> 5) {
    case 0: return 6;
    case 1: case 2: return 10;
    case 4: return 16;
    case 5: return 12;
    default: return 0;
    }
}

static void cmd_submit(struct scsi_dev *d, struct scsi_req *sr)
{
    vn_req *req = sr->req;
    uint8_t hdr[REQ_SIZE];
    const uint8_t *cdb = hdr + CDB_OFFSET;

    d->stats.commands++;
    sr->xfer = 0;
    sr->din_len = sr->dout_len = 0;
    /* No room for a response (or a chain we could not map): nothing to write. */
    if (req->error || req->in_len < RESP_SIZE || req->in_len > UINT32_MAX) {
        d->stats.invalid++;
        req->complete(req, 0);
        return;
    }
    sr->din_len = req->in_len - RESP_SIZE;
    if (req->out_len < REQ_SIZE) {
        transport(d, sr, VIRTIO_SCSI_S_FAILURE);
        return;
    }
    sr->dout_len = req->out_len - REQ_SIZE;
    vn_iov_copy_from(req->iov, req->n_out, 0, hdr, sizeof(hdr));
    struct scsi_target *t = lookup_target(d, hdr);
    if (!t) {
        transport(d, sr, VIRTIO_SCSI_S_BAD_TARGET);
        return;
    }
    if (sr->din_len && sr->dout_len) {      /* bidirectional: VIRTIO_SCSI_F_INOUT not offered */
        transport(d, sr, VIRTIO_SCSI_S_FAILURE);
        return;
    }
    sr->t = t;
    if (parse_lun(hdr) != 0) {
        absent_lun(d, sr, cdb);
        return;
    }
    int len = cdb_len(cdb[0]);
    if (len && (cdb[len - 1] & 0x04)) {     /* NACA: ACA is not supported */
        invalid_cdb(d, sr, len - 1);
        return;
    }
    if (t->ua && cdb[0] != 0x12 && cdb[0] != 0xa0 && cdb[0] != 0x03) {
        check(d, sr, UNIT_ATTENTION, take_ua(t), NOFIELD, 0);
        return;
    }
    switch (cdb[0]) {
    case 0x00: good(d, sr); return;                         /* TEST UNIT READY */
    case 0x03: cmd_request_sense(d, sr, cdb, 1); return;
    case 0x08: case 0x0a: case 0x28: case 0x2a:
    case 0x88: case 0x8a: case 0xa8: case 0xaa:
        cmd_rw(d, sr, cdb);
        return;
    case 0x12: cmd_inquiry(d, sr, cdb); return;
    case 0x15: case 0x55: cmd_mode_select(d, sr, cdb); return;
    case 0x1a: case 0x5a: cmd_mode_sense(d, sr, cdb); return;
    case 0x1b: good(d, sr); return;                         /* START STOP UNIT */
    case 0x25: cmd_read_capacity(d, sr, cdb); return;
    case 0x35: case 0x91: cmd_sync_cache(d, sr, cdb); return;
    case 0x41: case 0x93: cmd_write_same(d, sr, cdb); return;
    case 0x42: cmd_unmap(d, sr, cdb); return;
    case 0x9e:                                              /* SERVICE ACTION IN (16) */
        if ((cdb[1] & 0x1f) == 0x10) { cmd_read_capacity(d, sr, cdb); return; }
        invalid_cdb(d, sr, 1);
        return;
    case 0xa0: cmd_report_luns(d, sr, cdb); return;
    }
    check(d, sr, ILLEGAL_REQUEST, ASC_INVALID_OPCODE, 0, 1);
}

/* ------------------------------------------------------------------ */
/* the device table                                                    */
/* ------------------------------------------------------------------ */

static void scsi_submit(void *ctx, vn_req *req)
{
    struct scsi_dev *d = ctx;
    struct scsi_req *sr = (struct scsi_req *)req->dev_priv;
    sr->req = req;
    sr->next = NULL;
    sr->t = NULL;
    switch (req->queue_index) {
    case 0: ctrl_submit(d, sr); return;
    case 1: event_submit(d, sr); return;
    default: cmd_submit(d, sr); return;
    }
}

/* The device's own work, once per reactor iteration after the bdev channels
 * were polled: parked commands go on, TMFs whose commands are done complete. */
static int scsi_poll(void *ctx)
{
    struct scsi_dev *d = ctx;
    int work = 0;
    if (d->resume_head) work += resume_parked(d);
    if (d->tmf_held)
        for (int i = 0; i < SCSI_MAX_TARGETS; i++)
            if (d->tgt[i].tmf_head) work += tmf_release(d, &d->tgt[i], 0);
    return work;
}

static const struct vn_device_ops scsi_ops = {
    .abi_version = VN_ABI_VERSION,
    .submit = scsi_submit,
    .poll = scsi_poll,
};

const void *scsi_device_ops(void) { return &scsi_ops; }

uint32_t scsi_dev_max_transfer(void) { return MAX_XFER_BYTES; }

struct scsi_dev *scsi_dev_new(void) { return calloc(1, sizeof(struct scsi_dev)); }

void scsi_dev_free(struct scsi_dev *d) { free(d); }

/* ------------------------------------------------------------------ */
/* control plane calls (run on the reactor through vn_reactor_exec)   */
/* ------------------------------------------------------------------ */

int scsi_dev_add_target(void *arg)
{
    struct scsi_target_desc *desc = arg;
    struct scsi_dev *d = desc->dev;
    vn_bdev_desc *bd = desc->desc;
    if (desc->target >= SCSI_MAX_TARGETS || !vn_desc_usable(bd)) return -EINVAL;
    struct scsi_target *t = &d->tgt[desc->target];
    if (t->state != TGT_EMPTY) return -EEXIST;
    memset(t, 0, sizeof(*t));
    t->desc = bd;
    t->block_size = bd->bdev->block_size;
    t->num_blocks = bd->bdev->num_blocks;
    t->io_types = bd->bdev->io_types;
    t->readonly = desc->readonly != 0;
    memcpy(t->product, desc->product, sizeof(t->product));
    t->serial_len = desc->serial_len < sizeof(t->serial) ? desc->serial_len : sizeof(t->serial);
    memcpy(t->serial, desc->serial, t->serial_len);
    memcpy(t->naa, desc->naa, sizeof(t->naa));
    t->t10_id_len = desc->t10_id_len < sizeof(t->t10_id) ? desc->t10_id_len : sizeof(t->t10_id);
    memcpy(t->t10_id, desc->t10_id, t->t10_id_len);
    t->state = TGT_PRESENT;
    notify(d, (int)desc->target, VIRTIO_SCSI_EVT_RESET_RESCAN);
    return 0;
}

/* New commands to the target answer BAD_TARGET from the first call on; returns
 * the commands still in flight at its bdev, 0 once the target is gone (the
 * caller retries until then, and then closes the bdev's descriptor). */
int scsi_dev_remove_target(void *arg)
{
    struct scsi_ctl *c = arg;
    struct scsi_dev *d = c->dev;
    if (c->target >= SCSI_MAX_TARGETS) return -EINVAL;
    struct scsi_target *t = &d->tgt[c->target];
    if (t->state == TGT_EMPTY) return 0;
    t->state = TGT_REMOVING;
    if (t->outstanding) return (int)t->outstanding;
    tmf_release(d, t, 1);      /* nothing left for them to wait on */
    memset(t, 0, sizeof(*t));
    notify(d, (int)c->target, VIRTIO_SCSI_EVT_RESET_REMOVED);
    return 0;
}

/* The target's bdev was resized: adopt the new size, tell the driver with a
 * CAPACITY DATA HAS CHANGED unit attention and, with VIRTIO_SCSI_F_CHANGE, a
 * PARAM_CHANGE event (Linux then re-reads the capacity at once). */
int scsi_dev_capacity_changed(void *arg)
{
    struct scsi_ctl *c = arg;
    struct scsi_dev *d = c->dev;
    if (c->target >= SCSI_MAX_TARGETS) return -EINVAL;
    struct scsi_target *t = &d->tgt[c->target];
    if (t->state != TGT_PRESENT || !vn_desc_usable(t->desc)) return -ENODEV;
    t->num_blocks = __atomic_load_n(&t->desc->bdev->num_blocks, __ATOMIC_RELAXED);
    t->ua |= UA_CAPACITY_CHANGED;
    if (d->change)   /* reason: asc | ascq << 8 */
        send_event(d, VIRTIO_SCSI_T_PARAM_CHANGE, (int)c->target,
                   ASC_CAPACITY_CHANGED >> 8 | (ASC_CAPACITY_CHANGED & 0xff) << 8);
    return 0;
}

/* A driver (re)negotiated features: a fresh start for events and attentions. */
int scsi_dev_set_features(void *arg)
{
    struct scsi_ctl *c = arg;
    struct scsi_dev *d = c->dev;
    d->hotplug = (c->value & 1) != 0;
    d->change = (c->value & 2) != 0;
    d->events_missed = 0;
    for (int i = 0; i < SCSI_MAX_TARGETS; i++) d->tgt[i].ua = 0;
    return 0;
}

/* Queue `value` stops fetching: hand back what we hold on it.  Event buffers (as
 * VIRTIO_SCSI_T_NO_EVENT) would never complete otherwise; a held TMF would
 * complete only once commands on the request queues did, which the driver
 * stopping the control queue may keep busy, or which may be stuck on their bdev:
 * the stop must not wait for either.  A TMF whose commands are not all done is
 * rejected (the driver then treats it as failed), the others complete. */
int scsi_dev_queue_stopping(void *arg)
{
    struct scsi_ctl *c = arg;
    struct scsi_dev *d = c->dev;
    int n = 0;
    if (c->value == 0) {
        for (int i = 0; i < SCSI_MAX_TARGETS; i++) n += tmf_release(d, &d->tgt[i], 1);
        return n;
    }
    if (c->value != 1) return 0;
    struct scsi_req *sr;
    while ((sr = pop_event(d)) != NULL) {
        write_event(sr, VIRTIO_SCSI_T_NO_EVENT, -1, 0);
        n++;
    }
    return n;
}

int scsi_dev_target_outstanding(struct scsi_dev *d, uint32_t target)
{
    return target < SCSI_MAX_TARGETS ? (int)d->tgt[target].outstanding : 0;
}

void scsi_dev_get_stats(struct scsi_dev *d, struct scsi_dev_stats *out) { *out = d->stats; }
