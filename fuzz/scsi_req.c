/*
 * Fuzz target: virtio-scsi request handling and the SCSI emulation behind it,
 * plugins/dev_scsi's virtio_scsi.c and scsi_lun.c (linked unchanged, driven through its
 * vn_device_ops table and its control-plane calls as the core and the plugin
 * drive them, with each target's bdev descriptor opened, polled and closed here
 * as the core's reactor would): every CDB, task management, asynchronous
 * notification queries, event buffers, hot-attach and hot-detach of targets,
 * capacity changes.
 *
 * Requests are built as in blk_req.c (separate heap blocks per iovec).  Each
 * of the 8 targets has its own fake bdev, which completes inline or from its
 * channel poll, successfully or with an error.
 *
 * Oracles: each request completes exactly once (held event buffers and task
 * management functions included, once the harness hands them back), with a
 * used length within its writable part; its readable part is never written;
 * bdev I/O stays inside the disk and the request's own data buffers (never
 * its request or response header); no I/O reaches a target after its removal
 * finished; a completed LOGICAL UNIT RESET or other TMF finds no I/O of that
 * target still at the bdev; every bdev channel opened is closed once.
 *
 * Input: an 8-byte config, then records until the input ends.  A request
 * record is {0x01, queue, split, flags, u16 readable length, u16 writable
 * length} and the readable bytes (split and flags: how many iovecs each part
 * becomes; flags bit 0: the chain was partly outside guest memory); a control
 * record is 4 bytes {kind, target, value, pad}: 2 poll, 3 add target,
 * 4 remove target, 5 capacity changed, 6 set features, 7 queue stopping.
 */
#include <errno.h>
#include <stddef.h>

#include "vhost_core/vhost_native.h"
#include "scsi.h"
#include "common.h"

#define NTARGETS 8
#define MAX_REQS 64
#define REQ_SIZE 51
#define RESP_SIZE 108

struct fuzz_req {
    vn_req req;
    int completed;
    uint64_t ro_digest;
    uint32_t nrd, nwr;
    uint8_t *first_out;         /* start of the readable part (the request header) */
    uint8_t *first_in;          /* start of the writable part (the response header) */
    struct { uint8_t *p; uint64_t len; } rd[VN_MAX_IOV], wr[VN_MAX_IOV];
};

static struct fuzz_req *live[MAX_REQS];
static uint32_t nlive, submitted, completions;

/* ---------------------------------------------------------------- fake bdevs */

struct fake_bdev {
    vn_bdev bdev;
    vn_bdev_desc desc;          /* what the core's vn_desc_open makes for the target */
    int target;
    int chan_open;              /* channels created minus destroyed */
    int gone;                   /* the target's removal finished: no I/O may come */
    uint32_t deferred;          /* its I/O held below */
};

static struct {
    struct fake_bdev b[NTARGETS];
    struct vn_iostat_clock clock;   /* the reactor's */
    uint8_t mode;
    vn_bdev_io *held[4 * MAX_REQS];
    struct fake_bdev *held_on[4 * MAX_REQS];
    uint32_t nheld, nio;
} fb;

FUZZ_NOCOV static struct fuzz_req *owner_of_io(vn_bdev_io *io)
{
    for (uint32_t i = 0; i < nlive; i++) {
        uint8_t *priv = live[i]->req.dev_priv;
        if ((uint8_t *)io >= priv && (uint8_t *)io < priv + VN_DEV_PRIV_SIZE) return live[i];
    }
    return NULL;
}

/* Inside the request's data buffers, past the `skip` header bytes at the start. */
FUZZ_NOCOV static int inside_data(const struct fuzz_req *fr, int writable, const uint8_t *p, uint64_t len)
{
    uint32_t n = writable ? fr->nwr : fr->nrd;
    uint64_t skip = writable ? RESP_SIZE : REQ_SIZE, pos = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *b = writable ? fr->wr[i].p : fr->rd[i].p;
        uint64_t l = writable ? fr->wr[i].len : fr->rd[i].len;
        if (p >= b && (uint64_t)(p - b) <= l && len <= l - (uint64_t)(p - b))
            return pos + (uint64_t)(p - b) >= skip;
        pos += l;
    }
    return 0;
}

FUZZ_NOCOV static int all_zero(const uint8_t *p, uint64_t len)
{
    for (uint64_t i = 0; i < len; i++)
        if (p[i]) return 0;
    return 1;
}

static void bdev_complete(vn_bdev_io *io)
{
    int fail = (fb.mode & 4) && (fb.nio & 1);
    io->cb(io, fail ? -EIO : 0);
}

static void bdev_submit(void *ctx, void *chan, vn_bdev_io *io)
{
    struct fake_bdev *b = ctx;
    FUZZ_CHECK(chan == b);
    FUZZ_CHECK(b->chan_open == 1);
    FUZZ_CHECK(!b->gone);
    FUZZ_CHECK(io->type < VN_IO_TYPE_COUNT);
    FUZZ_CHECK((b->bdev.io_types >> io->type) & 1);
    struct fuzz_req *fr = owner_of_io(io);
    FUZZ_CHECK(fr != NULL && !fr->completed);
    if (io->type != VN_IO_FLUSH) {
        FUZZ_CHECK(io->offset_blocks <= b->bdev.num_blocks);
        FUZZ_CHECK(io->num_blocks <= b->bdev.num_blocks - io->offset_blocks);
    }
    if (io->type == VN_IO_READ || io->type == VN_IO_WRITE) {
        int is_read = io->type == VN_IO_READ;
        FUZZ_CHECK(io->num_blocks > 0);
        FUZZ_CHECK(io->iovcnt <= VN_MAX_IOV);
        FUZZ_CHECK(iov_total(io->iov, io->iovcnt) == io->num_blocks * b->bdev.block_size);
        for (uint32_t i = 0; i < io->iovcnt; i++) {
            uint8_t *p = io->iov[i].iov_base;
            uint64_t l = io->iov[i].iov_len;
            if (is_read) {
                FUZZ_CHECK(inside_data(fr, 1, p, l));
                memset(p, 0xd5, l);
            } else {
                /* WRITE SAME with NDOB writes the device's own zero block, the
                 * same one each time: scanning it once per run is enough. */
                static const uint8_t *zero_seen;
                static uint64_t zero_len;
                if (inside_data(fr, 0, p, l) || (p == zero_seen && l <= zero_len)) continue;
                FUZZ_CHECK(l <= 65536 && all_zero(p, l));
                zero_seen = p;
                zero_len = l;
            }
        }
    } else {
        FUZZ_CHECK(io->iovcnt == 0);
    }
    fb.nio++;
    if ((fb.mode & 3) == 1 || ((fb.mode & 3) == 2 && (fb.nio & 1))) {
        FUZZ_CHECK(fb.nheld < sizeof(fb.held) / sizeof(fb.held[0]));
        fb.held[fb.nheld] = io;
        fb.held_on[fb.nheld++] = b;
        b->deferred++;
        return;
    }
    bdev_complete(io);
}

static void *bdev_chan_create(void *ctx)
{
    struct fake_bdev *b = ctx;
    FUZZ_CHECK(b->chan_open == 0);
    b->chan_open++;
    return b;
}

static void bdev_chan_destroy(void *ctx, void *chan)
{
    struct fake_bdev *b = ctx;
    FUZZ_CHECK(chan == b && b->chan_open == 1);
    FUZZ_CHECK(b->deferred == 0);
    b->chan_open--;
}

/* Each channel's poll completes that bdev's held I/O, newest first. */
static int bdev_chan_poll(void *ctx, void *chan)
{
    struct fake_bdev *b = ctx;
    (void)chan;
    int n = 0;
    for (uint32_t i = fb.nheld; i-- > 0;) {
        if (fb.held_on[i] != b) continue;
        vn_bdev_io *io = fb.held[i];
        memmove(&fb.held[i], &fb.held[i + 1], (fb.nheld - i - 1) * sizeof(fb.held[0]));
        memmove(&fb.held_on[i], &fb.held_on[i + 1], (fb.nheld - i - 1) * sizeof(fb.held_on[0]));
        fb.nheld--;
        b->deferred--;
        bdev_complete(io);
        n++;
        /* A completion may have submitted the command's next I/O: rescan. */
        i = fb.nheld;
    }
    return n;
}

static const struct vn_bdev_ops bdev_ops = {
    .abi_version = VN_ABI_VERSION,
    .submit = bdev_submit,
    .channel_create = bdev_chan_create,
    .channel_destroy = bdev_chan_destroy,
    .channel_poll = bdev_chan_poll,
};

/* ------------------------------------------------------------ requests */

static void req_complete(vn_req *req, uint32_t written)
{
    struct fuzz_req *fr = (struct fuzz_req *)((uint8_t *)req - offsetof(struct fuzz_req, req));
    FUZZ_CHECK(!fr->completed);
    fr->completed = 1;
    completions++;
    FUZZ_CHECK(written <= req->in_len);
    uint64_t h = 0;
    for (uint32_t i = 0; i < fr->nrd; i++) h = digest(h, fr->rd[i].p, fr->rd[i].len);
    FUZZ_CHECK(h == fr->ro_digest);
    /* A task management function that completed found none of its target's
     * commands still at the bdev. */
    if (req->queue_index == 0 && req->out_len >= 24 && written == 1 && fr->nwr && fr->first_in[0] == 0) {
        uint8_t tmf[24];
        vn_iov_copy_from(req->iov, req->n_out, 0, tmf, sizeof(tmf));
        if (tmf[0] == 0 && !(tmf[1] | tmf[2] | tmf[3]) && tmf[8] == 1 && tmf[9] < NTARGETS)
            FUZZ_CHECK(fb.b[tmf[9]].deferred == 0);
    }
}

static void free_req(struct fuzz_req *fr)
{
    for (uint32_t i = 0; i < fr->nrd; i++) free(fr->rd[i].p);
    for (uint32_t i = 0; i < fr->nwr; i++) free(fr->wr[i].p);
    free(fr);
}

/* `len` bytes split into `pieces` separate heap blocks, as guest memory
 * regions or a driver's scatter-gather list would split a buffer (never past
 * VN_MAX_IOV in all: the core refuses longer chains). */
static void add_part(struct fuzz_req *fr, int writable, struct reader *r, uint32_t len, uint32_t pieces)
{
    vn_req *req = &fr->req;
    uint32_t off = 0, room = VN_MAX_IOV - req->n_out - req->n_in;
    if (pieces > room) pieces = room;
    if (pieces > len) pieces = len;
    for (uint32_t k = 0; k < pieces; k++) {
        uint32_t l = k + 1 == pieces ? len - off : len / pieces;
        uint8_t *b = malloc(l);
        if (writable) memset(b, 0xee, l);
        else rd_bytes(r, b, l);
        req->iov[req->n_out + req->n_in].iov_base = b;
        req->iov[req->n_out + req->n_in].iov_len = l;
        if (writable) {
            fr->wr[fr->nwr].p = b;
            fr->wr[fr->nwr++].len = l;
            req->n_in++;
            req->in_len += l;
        } else {
            fr->rd[fr->nrd].p = b;
            fr->rd[fr->nrd++].len = l;
            req->n_out++;
            req->out_len += l;
        }
        off += l;
    }
}

static struct fuzz_req *build_req(struct reader *r, uint8_t queue, uint8_t split, uint8_t flags)
{
    uint32_t out_len = rd_u16(r), in_len = rd_u16(r);
    struct fuzz_req *fr = malloc(sizeof(*fr));
    memset(fr, 0, offsetof(struct fuzz_req, rd));
    memset(&fr->req, 0, offsetof(vn_req, iov));
    /* split: 1-4 pieces per part; flags' high nibble adds 16 pieces a step. */
    uint32_t many = 16u * (flags >> 4);
    if (out_len) add_part(fr, 0, r, out_len, 1 + (split & 3) + (split & 0x10 ? many : 0));
    if (in_len) add_part(fr, 1, r, in_len, 1 + (split >> 2 & 3) + (split & 0x20 ? many : 0));
    fr->first_out = fr->nrd ? fr->rd[0].p : NULL;
    fr->first_in = fr->nwr ? fr->wr[0].p : NULL;
    if (flags & 1) {
        /* A chain partly outside guest memory: only its last, writable
         * descriptor reaches the device. */
        vn_req *req = &fr->req;
        req->error = VN_REQ_EFAULT;
        for (uint32_t i = 0; i < fr->nrd; i++) free(fr->rd[i].p);
        for (uint32_t i = 0; i + 1 < fr->nwr; i++) free(fr->wr[i].p);
        fr->nrd = 0;
        if (fr->nwr) fr->wr[0] = fr->wr[fr->nwr - 1];
        fr->nwr = fr->nwr ? 1 : 0;
        req->n_out = 0;
        req->out_len = 0;
        req->n_in = fr->nwr;
        req->in_len = fr->nwr ? fr->wr[0].len : 0;
        if (fr->nwr) { req->iov[0].iov_base = fr->wr[0].p; req->iov[0].iov_len = fr->wr[0].len; }
        fr->first_out = NULL;
        fr->first_in = fr->nwr ? fr->wr[0].p : NULL;
    }
    for (uint32_t i = 0; i < fr->nrd; i++) fr->ro_digest = digest(fr->ro_digest, fr->rd[i].p, fr->rd[i].len);
    fr->req.complete = req_complete;
    fr->req.queue_index = queue % 4;
    return fr;
}

static void reap(void)
{
    uint32_t j = 0;
    for (uint32_t i = 0; i < nlive; i++) {
        if (live[i]->completed) free_req(live[i]);
        else live[j++] = live[i];
    }
    nlive = j;
}

/* ------------------------------------------------------------ control plane */

static struct scsi_dev *dev;
static const struct vn_device_ops *ops;

/* The core's part: a descriptor with its channel (vn_desc_open), and closing it
 * once nothing is in flight (vn_desc_close). */
static void desc_open(struct fake_bdev *b)
{
    memset(&b->desc, 0, sizeof(b->desc));
    b->desc.bdev = &b->bdev;
    b->desc.block_size = b->bdev.block_size;
    b->desc.clock = &fb.clock;
    b->desc.chan = bdev_chan_create(b);
}

static void desc_close(struct fake_bdev *b)
{
    if (!b->desc.bdev) return;
    FUZZ_CHECK(b->desc.in_flight == 0);
    bdev_chan_destroy(b, b->desc.chan);
    b->desc.chan = NULL;
    b->desc.bdev = NULL;
}

/* One reactor iteration's polling: the open channels, the device's own work, the
 * iostat clock.  Returns the work done. */
static int reactor_poll(void)
{
    int work = 0;
    for (int t = 0; t < NTARGETS; t++)
        if (fb.b[t].desc.bdev) work += bdev_chan_poll(&fb.b[t], fb.b[t].desc.chan);
    work += ops->poll(dev);
    vn_iostat_flush(&fb.clock);
    return work;
}

static int in_flight(void)
{
    uint64_t n = 0;
    for (int t = 0; t < NTARGETS; t++) n += fb.b[t].desc.in_flight;
    return n > 0;
}

static void add_target(int t, int readonly)
{
    struct scsi_target_desc desc;
    int opened = !fb.b[t].desc.bdev;    /* else the target is there: -EEXIST */
    memset(&desc, 0, sizeof(desc));
    if (opened) desc_open(&fb.b[t]);
    desc.dev = dev;
    desc.desc = &fb.b[t].desc;
    desc.target = (uint32_t)t;
    desc.readonly = (uint32_t)readonly;
    memcpy(desc.product, "Fuzz disk", 9);
    desc.serial_len = (uint32_t)snprintf(desc.serial, sizeof(desc.serial), "fuzz-serial-%d", t);
    desc.naa[0] = 0x60;
    desc.naa[7] = (uint8_t)t;
    desc.t10_id_len = (uint32_t)snprintf(desc.t10_id, sizeof(desc.t10_id), "VHOSTPY fuzz-%d", t);
    int rc = scsi_dev_add_target(&desc);
    FUZZ_CHECK(opened ? rc == 0 : rc == -EEXIST);
    if (rc == 0) fb.b[t].gone = 0;
}

/* Hot-detach as the plugin does it: retry until the target's commands drained
 * (polling between tries, as the reactor would), then close its descriptor.  A
 * long WRITE SAME or UNMAP goes on one share per reactor iteration, so draining
 * may take many iterations: the oracle is that every iteration makes progress
 * until it is done (a removal never stalls), not a fixed count. */
static void remove_target(int t)
{
    struct scsi_ctl c = { dev, (uint32_t)t, 0 };
    for (int idle = 0;;) {
        int left = scsi_dev_remove_target(&c);
        FUZZ_CHECK(left >= 0);
        if (left == 0) break;
        idle = reactor_poll() ? 0 : idle + 1;
        FUZZ_CHECK(idle < 4);
        reap();
    }
    fb.b[t].gone = 1;
    desc_close(&fb.b[t]);
    FUZZ_CHECK(fb.b[t].chan_open == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader r = { data, size, 0 };
    uint8_t cfg[8];
    rd_bytes(&r, cfg, sizeof(cfg));
    memset(&fb, 0, sizeof(fb));
    fb.mode = cfg[5];
    for (int t = 0; t < NTARGETS; t++) {
        struct fake_bdev *b = &fb.b[t];
        b->target = t;
        b->bdev.ops = &bdev_ops;
        b->bdev.ctx = b;
        /* 512 and 4096 by default; cfg[7] bit 7: any size the bdev layer allows. */
        b->bdev.block_size = cfg[7] & 0x80 ? 512u << ((cfg[7] + t) % 8)
                                           : 512u << (3 * ((t ^ (cfg[1] >> t)) & 1));
        /* Small disks, so that ranges reach the end; one huge one for 64-bit LBAs. */
        b->bdev.num_blocks = t == 7 ? (1ull << 40) : 64u + 64u * (uint64_t)((cfg[6] >> (t % 4 * 2)) & 3);
        b->bdev.io_types = cfg[2] | (1u << VN_IO_READ) | (1u << VN_IO_WRITE);
        b->gone = 1;
    }
    dev = scsi_dev_new();
    ops = scsi_device_ops();
    struct scsi_ctl feat = { dev, 0, cfg[4] & 3u };
    scsi_dev_set_features(&feat);
    for (int t = 0; t < NTARGETS; t++)
        if ((cfg[0] >> t) & 1) add_target(t, (cfg[3] >> t) & 1);
    nlive = submitted = completions = 0;

    while (!rd_done(&r)) {
        uint8_t kind = rd_u8(&r), a = rd_u8(&r), b = rd_u8(&r), c = rd_u8(&r);
        switch (kind % 8) {
        case 1: {
            if (nlive >= MAX_REQS) { reactor_poll(); reap(); }
            if (nlive >= MAX_REQS) break;
            struct fuzz_req *fr = build_req(&r, a, b, c);
            fr->req.dev_ctx = dev;
            live[nlive++] = fr;
            submitted++;
            ops->submit(dev, &fr->req);
            break;
        }
        case 2: reactor_poll(); break;
        case 3: add_target(a % NTARGETS, b & 1); break;
        case 4: remove_target(a % NTARGETS); break;
        case 5: {
            struct scsi_ctl ctl = { dev, a % NTARGETS, 0 };
            fb.b[a % NTARGETS].bdev.num_blocks = 32u + b;
            scsi_dev_capacity_changed(&ctl);
            break;
        }
        case 6: {
            struct scsi_ctl ctl = { dev, 0, b & 3u };
            scsi_dev_set_features(&ctl);
            break;
        }
        case 7: {
            struct scsi_ctl ctl = { dev, 0, b % 4u };
            scsi_dev_queue_stopping(&ctl);
            break;
        }
        default: break;
        }
        if (fb.mode & 8) reactor_poll();
        reap();
    }
    /* Drain as a stopping session does: the I/O, then the event buffers and
     * the task management functions that waited for it. */
    /* Bounded, not instant: a command with more inline work than VN_MAX_TRANSFER
     * (WRITE SAME, UNMAP on a bdev that completes inline) does 4 MiB per poll, and
     * waiting commands resume one per poll in turn; a few hundred polls is normal. */
    for (int i = 0;; i++) {
        FUZZ_CHECK(i < 4096);
        if (!reactor_poll() && !fb.nheld && !in_flight()) break;
    }
    struct scsi_ctl stop_events = { dev, 0, 1 };
    scsi_dev_queue_stopping(&stop_events);
    reap();
    FUZZ_CHECK(nlive == 0);
    FUZZ_CHECK(completions == submitted);
    for (int t = 0; t < NTARGETS; t++) remove_target(t);
    for (int t = 0; t < NTARGETS; t++) FUZZ_CHECK(fb.b[t].chan_open == 0);
    scsi_dev_free(dev);
    return 0;
}
