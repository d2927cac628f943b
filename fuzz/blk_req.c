/*
 * Fuzz target: the virtio-blk request parser, plugins/dev_blk's blk.c (linked
 * unchanged, driven through its vn_device_ops table as the core drives it, with
 * a bdev descriptor set up and polled here as the core's reactor would).
 *
 * Each request is a vn_req as the core would hand it over: a device-readable
 * part (the 16-byte header, then data) and a device-writable part (data, then
 * the status byte), each segment split into one or more iovecs, every iovec a
 * separate heap block so that ASan sees a byte written past any of them.  A
 * fake bdev checks every I/O it gets and completes it inline or from its
 * channel poll, successfully or with an error.
 *
 * Oracles: each request completes exactly once, with a used length within
 * its writable part and a valid status byte; its readable part is never
 * written; bdev I/O stays inside the disk and inside the request's own data
 * buffers (never the header or the status byte).
 *
 * Input: an 8-byte config, then requests until the input ends: 4 bytes
 * {segments, split, error, pad}, then per segment {u8 writable, u16 length}
 * and, for a readable segment, its bytes.
 */
#include <errno.h>
#include <stddef.h>

#include "vhost_core/vhost_native.h"
#include "blk.h"
#include "common.h"

#define MAX_SEGS 16
#define MAX_REQS 64

struct fuzz_req {
    vn_req req;
    int completed;
    uint64_t ro_digest;
    /* the request's buffers, as host ranges: data may only go to these */
    struct { uint8_t *p; uint64_t len; } rd[VN_MAX_IOV], wr[VN_MAX_IOV];
    uint32_t nrd, nwr;
    uint8_t *status;            /* last byte of the writable part, or NULL */
};

static struct fuzz_req *live[MAX_REQS];
static uint32_t nlive, submitted, completions;
/* Buffer bytes left for this input: enough for any request of 64 KiB blocks,
 * while a run stays fast (filling megabytes per input would dominate it). */
static uint64_t budget;
#define BUDGET (512u << 10)

/* ---------------------------------------------------------------- fake bdev */

static struct {
    vn_bdev bdev;
    vn_bdev_desc desc;          /* what the core's vn_desc_open makes */
    struct vn_iostat_clock clock;
    uint8_t mode;
    uint32_t chan_token;
    vn_bdev_io *deferred[MAX_REQS];
    uint32_t ndeferred;
    uint32_t nio;
    struct fuzz_req *cur;       /* the request being submitted (inline I/O) */
} fb;

FUZZ_NOCOV static struct fuzz_req *owner_of_io(vn_bdev_io *io)
{
    /* The device keeps its bdev_io in the request's dev_priv. */
    for (uint32_t i = 0; i < nlive; i++) {
        uint8_t *priv = live[i]->req.dev_priv;
        if ((uint8_t *)io >= priv && (uint8_t *)io < priv + VN_DEV_PRIV_SIZE) return live[i];
    }
    return NULL;
}

FUZZ_NOCOV static int inside(const struct fuzz_req *fr, int writable, const void *p, uint64_t len)
{
    uint32_t n = writable ? fr->nwr : fr->nrd;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *b = writable ? fr->wr[i].p : fr->rd[i].p;
        uint64_t l = writable ? fr->wr[i].len : fr->rd[i].len;
        if ((const uint8_t *)p >= b && (uint64_t)((const uint8_t *)p - b) <= l &&
            len <= l - (uint64_t)((const uint8_t *)p - b))
            return 1;
    }
    return 0;
}

static void bdev_complete(vn_bdev_io *io)
{
    int fail = (fb.mode & 4) && (fb.nio & 1);
    io->cb(io, fail ? -EIO : 0);
}

static void bdev_submit(void *ctx, void *chan, vn_bdev_io *io)
{
    FUZZ_CHECK(ctx == &fb);
    FUZZ_CHECK(chan == &fb.chan_token);
    FUZZ_CHECK(io->type < VN_IO_TYPE_COUNT);
    FUZZ_CHECK((fb.bdev.io_types >> io->type) & 1);
    FUZZ_CHECK(!fb.desc.closing);
    struct fuzz_req *fr = owner_of_io(io);
    FUZZ_CHECK(fr != NULL && !fr->completed);
    if (io->type != VN_IO_FLUSH) {
        FUZZ_CHECK(io->offset_blocks <= fb.bdev.num_blocks);
        FUZZ_CHECK(io->num_blocks <= fb.bdev.num_blocks - io->offset_blocks);
    }
    if (io->type == VN_IO_READ || io->type == VN_IO_WRITE) {
        int is_read = io->type == VN_IO_READ;
        FUZZ_CHECK(io->num_blocks > 0);
        FUZZ_CHECK(io->iovcnt <= VN_MAX_IOV);
        FUZZ_CHECK(iov_total(io->iov, io->iovcnt) == io->num_blocks * fb.bdev.block_size);
        for (uint32_t i = 0; i < io->iovcnt; i++) {
            FUZZ_CHECK(inside(fr, is_read, io->iov[i].iov_base, io->iov[i].iov_len));
            if (is_read) {
                /* Data never lands on the status byte. */
                uint8_t *b = io->iov[i].iov_base;
                FUZZ_CHECK(!fr->status || fr->status < b || fr->status >= b + io->iov[i].iov_len);
                memset(b, 0xd5, io->iov[i].iov_len);
            } else {
                /* ... nor is the header read as data. */
                FUZZ_CHECK(!(fr->rd[0].len >= 16 && (uint8_t *)io->iov[i].iov_base >= fr->rd[0].p &&
                             (uint8_t *)io->iov[i].iov_base < fr->rd[0].p + 16));
            }
        }
    }
    fb.nio++;
    if ((fb.mode & 3) == 1 || ((fb.mode & 3) == 2 && (fb.nio & 1))) {
        FUZZ_CHECK(fb.ndeferred < MAX_REQS);
        fb.deferred[fb.ndeferred++] = io;
        return;
    }
    bdev_complete(io);
}

static void *bdev_chan_create(void *ctx) { (void)ctx; return &fb.chan_token; }
static void bdev_chan_destroy(void *ctx, void *chan) { (void)ctx; FUZZ_CHECK(chan == &fb.chan_token); }

static int bdev_chan_poll(void *ctx, void *chan)
{
    (void)ctx; (void)chan;
    uint32_t n = fb.ndeferred;
    /* Completions arrive out of order: newest first. */
    while (fb.ndeferred) bdev_complete(fb.deferred[--fb.ndeferred]);
    return (int)n;
}

/* What the reactor does each iteration: poll the descriptor's channel, then time
 * what completed. */
static void reactor_poll(void)
{
    bdev_chan_poll(&fb, fb.desc.chan);
    vn_iostat_flush(&fb.clock);
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
    if (fr->status && written > 0) FUZZ_CHECK(*fr->status <= 2);
    uint64_t h = 0;
    for (uint32_t i = 0; i < fr->nrd; i++) h = digest(h, fr->rd[i].p, fr->rd[i].len);
    FUZZ_CHECK(h == fr->ro_digest);
}

static void free_req(struct fuzz_req *fr)
{
    for (uint32_t i = 0; i < fr->nrd; i++) free(fr->rd[i].p);
    for (uint32_t i = 0; i < fr->nwr; i++) free(fr->wr[i].p);
    free(fr);
}

/* Build one request from the input; NULL when the input ran out. */
static struct fuzz_req *build_req(struct reader *r)
{
    if (rd_done(r)) return NULL;
    uint8_t nseg = rd_u8(r) % (MAX_SEGS + 1), split = rd_u8(r), error = rd_u8(r);
    (void)rd_u8(r);
    /* Not calloc: zeroing the iovec arrays and the device's scratch space
     * (~17 KiB) was most of a run's time; what the core sets is set here, and
     * the device must not read scratch space it did not write (ASan would not
     * tell, but the core does not zero it either). */
    struct fuzz_req *fr = malloc(sizeof(*fr));
    fr->completed = 0;
    fr->ro_digest = 0;
    fr->nrd = fr->nwr = 0;
    fr->status = NULL;
    vn_req *req = &fr->req;
    memset(req, 0, offsetof(vn_req, iov));
    req->core_priv = NULL;
    uint32_t niov = 0;
    int seen_write = 0;
    for (uint8_t s = 0; s < nseg; s++) {
        int w = rd_u8(r) & 1;
        uint32_t len = rd_u16(r);
        if (len > budget) len = (uint32_t)budget;
        budget -= len;
        if (!w && seen_write) w = 1;    /* the core never hands over a readable after a writable */
        seen_write |= w;
        uint32_t pieces = 1 + (split >> (2 * (s % 4)) & 3);
        if (len == 0) continue;
        if (pieces > len) pieces = len;
        uint8_t *data = malloc(len);
        if (w) memset(data, 0xee, len);
        else rd_bytes(r, data, len);
        /* Split across separate heap blocks, as memory regions would be. */
        uint32_t off = 0;
        for (uint32_t k = 0; k < pieces && niov < VN_MAX_IOV; k++) {
            uint32_t l = k + 1 == pieces ? len - off : len / pieces;
            uint8_t *b = malloc(l);
            memcpy(b, data + off, l);
            req->iov[niov].iov_base = b;
            req->iov[niov].iov_len = l;
            niov++;
            if (w) { fr->wr[fr->nwr].p = b; fr->wr[fr->nwr++].len = l; req->n_in++; req->in_len += l; }
            else { fr->rd[fr->nrd].p = b; fr->rd[fr->nrd++].len = l; req->n_out++; req->out_len += l; }
            off += l;
        }
        free(data);
    }
    if (error) {
        /* A chain partly outside guest memory: only its last writable
         * descriptor, if any, reaches the device. */
        req->error = error & 1 ? VN_REQ_EFAULT : VN_REQ_E2BIG;
        for (uint32_t i = 0; i < fr->nrd; i++) free(fr->rd[i].p);
        fr->nrd = 0;
        req->n_out = 0;
        req->out_len = 0;
        uint32_t keep = fr->nwr ? 1 : 0;
        for (uint32_t i = 0; i + keep < fr->nwr; i++) free(fr->wr[i].p);
        if (keep) fr->wr[0] = fr->wr[fr->nwr - 1];
        fr->nwr = keep;
        req->n_in = keep;
        req->in_len = keep ? fr->wr[0].len : 0;
        if (keep) { req->iov[0].iov_base = fr->wr[0].p; req->iov[0].iov_len = fr->wr[0].len; }
    }
    if (fr->nwr) fr->status = fr->wr[fr->nwr - 1].p + fr->wr[fr->nwr - 1].len - 1;
    for (uint32_t i = 0; i < fr->nrd; i++) fr->ro_digest = digest(fr->ro_digest, fr->rd[i].p, fr->rd[i].len);
    if (!fr->nrd) fr->ro_digest = 0;
    req->complete = req_complete;
    req->queue_index = 0;
    return fr;
}

static void reap(int all)
{
    uint32_t j = 0;
    for (uint32_t i = 0; i < nlive; i++) {
        if (live[i]->completed || all) { FUZZ_CHECK(live[i]->completed); free_req(live[i]); }
        else live[j++] = live[i];
    }
    nlive = j;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader r = { data, size, 0 };
    uint8_t cfg[8];
    rd_bytes(&r, cfg, sizeof(cfg));
    memset(&fb, 0, sizeof(fb));
    fb.bdev.ops = &bdev_ops;
    fb.bdev.ctx = &fb;
    fb.bdev.block_size = 512u << (cfg[0] % 8);
    fb.bdev.num_blocks = cfg[1] | cfg[2] << 8;
    /* Every bdev reads and writes; the rest is optional. */
    fb.bdev.io_types = cfg[3] | (1u << VN_IO_READ) | (1u << VN_IO_WRITE);
    fb.mode = cfg[5];
    uint8_t remove_at = cfg[6];

    fb.desc.bdev = &fb.bdev;
    fb.desc.chan = bdev_chan_create(&fb);
    fb.desc.block_size = fb.bdev.block_size;
    fb.desc.clock = &fb.clock;

    const struct vn_device_ops *ops = blk_device_ops();
    FUZZ_CHECK(ops->poll == NULL);      /* blk has no deferred work of its own */
    struct blk_dev *d = blk_dev_new(&fb.desc, cfg[4] & 1, "fuzz-blk-id-20-bytes", 1u << 22);
    nlive = submitted = completions = 0;
    budget = BUDGET;

    struct fuzz_req *fr;
    while (nlive < MAX_REQS && (fr = build_req(&r)) != NULL) {
        fr->req.dev_ctx = d;
        live[nlive++] = fr;
        submitted++;
        /* Hot-remove: the core marks the descriptor closing; new I/O must fail. */
        if (remove_at && submitted == remove_at) fb.desc.closing = 1;
        ops->submit(d, &fr->req);
        if (fb.mode & 8) reactor_poll();
        reap(0);
    }
    for (int i = 0; nlive; i++) {
        FUZZ_CHECK(i < 4);
        reactor_poll();
        reap(0);
    }
    FUZZ_CHECK(completions == submitted);
    FUZZ_CHECK(fb.desc.in_flight == 0);
    /* The core closes the descriptor once idle: the channel goes, then the device. */
    bdev_chan_destroy(&fb, fb.desc.chan);
    fb.desc.bdev = NULL;
    fb.desc.chan = NULL;
    blk_dev_free(d);
    return 0;
}
