/*
 * virtio-blk request handling on the reactor (virtio 1.x, 5.2 Block Device).
 *
 * Every request is checked against the negotiated limits and the bdev's geometry
 * before a byte moves; anything malformed answers VIRTIO_BLK_S_IOERR (or UNSUPP
 * for unknown types) and touches only the request's own, already translated,
 * buffers.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vhost_core/vhost_native.h"
#include "blk.h"

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define VIRTIO_BLK_ID_BYTES 20
#define VIRTIO_BLK_WZ_F_UNMAP 1

struct blk_hdr { uint32_t type; uint32_t ioprio; uint64_t sector; };
struct blk_seg { uint64_t sector; uint32_t num_sectors; uint32_t flags; };

struct blk_dev {
    vn_bdev_desc *desc;     /* not usable once the bdev was hot-removed */
    int readonly;
    uint32_t max_discard_sectors;
    char id[VIRTIO_BLK_ID_BYTES];
    struct blk_dev_stats stats;
};

/* Lives in vn_req.dev_priv. */
struct blk_req {
    vn_bdev_io io;
    vn_req *req;
    uint8_t *status;
    uint32_t written;
    struct iovec data[VN_MAX_IOV];
};

_Static_assert(sizeof(struct blk_req) <= VN_DEV_PRIV_SIZE, "blk_req must fit in dev_priv");

static void finish(struct blk_dev *d, vn_req *req, struct blk_req *br, uint8_t status)
{
    if (status != VIRTIO_BLK_S_OK) d->stats.errors++;
    if (br->status) {
        *br->status = status;
        req->complete(req, br->written + 1);
    } else {
        /* No writable byte to carry a status: hand the buffer back empty. */
        req->complete(req, 0);
    }
}

static void io_done(vn_bdev_io *io, int status)
{
    struct blk_req *br = io->cb_arg;
    vn_req *req = br->req;
    struct blk_dev *d = req->dev_ctx;
    if (status == 0) {
        if (io->type == VN_IO_READ) { d->stats.reads++; d->stats.bytes_read += br->written; }
        else if (io->type == VN_IO_WRITE) { d->stats.writes++; d->stats.bytes_written += io->num_blocks * d->desc->bdev->block_size; }
        else if (io->type == VN_IO_FLUSH) d->stats.flushes++;
        else d->stats.unmaps++;
    } else {
        br->written = 0;
    }
    finish(d, req, br, status == 0 ? VIRTIO_BLK_S_OK : VIRTIO_BLK_S_IOERR);
}

static int supports(const vn_bdev *b, int type)
{
    return (b->io_types >> type) & 1;
}

/* Byte range -> block range, or -1 when misaligned or past the end. */
static int to_blocks(const vn_bdev *b, uint64_t sector, uint64_t len,
                     uint64_t *off_blocks, uint64_t *nblocks)
{
    uint32_t bs = b->block_size;
    if (sector > UINT64_MAX / 512) return -1;
    uint64_t off = sector * 512;
    if (off % bs || len % bs) return -1;
    *off_blocks = off / bs;
    *nblocks = len / bs;
    if (*off_blocks > b->num_blocks || *nblocks > b->num_blocks - *off_blocks) return -1;
    return 0;
}

static void submit_io(struct blk_dev *d, struct blk_req *br, uint32_t type,
                      uint64_t off_blocks, uint64_t nblocks, int iovcnt)
{
    vn_bdev_io *io = &br->io;
    io->type = type;
    io->offset_blocks = off_blocks;
    io->num_blocks = nblocks;
    io->iov = br->data;
    io->iovcnt = iovcnt > 0 ? (uint32_t)iovcnt : 0;
    /* io->flags stays 0 (request slots start zeroed): every I/O is counted. */
    vn_desc_submit(d->desc, io, io_done, br);
}

static void blk_submit(void *ctx, vn_req *req)
{
    struct blk_dev *d = ctx;
    struct blk_req *br = (struct blk_req *)req->dev_priv;
    struct blk_hdr hdr;
    const struct iovec *in_iov = &req->iov[req->n_out];

    br->req = req;
    br->status = NULL;
    br->written = 0;

    /* The status is the last byte of the device-writable part (the core keeps
     * that part mapped even when the rest of the chain is outside guest memory). */
    if (req->in_len >= 1) {
        const struct iovec *last = &in_iov[req->n_in - 1];
        br->status = (uint8_t *)last->iov_base + last->iov_len - 1;
    }
    if (req->error || !br->status || req->out_len < sizeof(hdr)) {
        d->stats.invalid++;
        finish(d, req, br, VIRTIO_BLK_S_IOERR);
        return;
    }
    vn_iov_copy_from(req->iov, req->n_out, 0, &hdr, sizeof(hdr));
    uint64_t data_in = req->in_len - 1;
    uint64_t data_out = req->out_len - sizeof(hdr);
    vn_bdev *b = vn_desc_usable(d->desc) ? d->desc->bdev : NULL;
    uint64_t off_blocks, nblocks;
    int n;

    switch (hdr.type) {
    case VIRTIO_BLK_T_IN:
        if (!b) goto removed;
        /* What seg_max * size_max promised (and the used length's 32-bit field). */
        if (data_in > VN_MAX_TRANSFER) goto invalid;
        if (data_in == 0 || to_blocks(b, hdr.sector, data_in, &off_blocks, &nblocks)) goto invalid;
        n = vn_iov_slice(in_iov, req->n_in, 0, data_in, br->data, VN_MAX_IOV);
        if (n < 0) goto invalid;
        br->written = (uint32_t)data_in;
        submit_io(d, br, VN_IO_READ, off_blocks, nblocks, n);
        return;
    case VIRTIO_BLK_T_OUT:
        if (d->readonly) goto invalid;
        if (!b) goto removed;
        if (data_out == 0 || data_out > VN_MAX_TRANSFER) goto invalid;
        if (to_blocks(b, hdr.sector, data_out, &off_blocks, &nblocks)) goto invalid;
        n = vn_iov_slice(req->iov, req->n_out, sizeof(hdr), data_out, br->data, VN_MAX_IOV);
        if (n < 0) goto invalid;
        submit_io(d, br, VN_IO_WRITE, off_blocks, nblocks, n);
        return;
    case VIRTIO_BLK_T_FLUSH:
        if (!b) goto removed;
        if (!supports(b, VN_IO_FLUSH)) { finish(d, req, br, VIRTIO_BLK_S_OK); return; }
        submit_io(d, br, VN_IO_FLUSH, 0, b->num_blocks, 0);
        return;
    case VIRTIO_BLK_T_GET_ID: {
        uint64_t len = data_in < VIRTIO_BLK_ID_BYTES ? data_in : VIRTIO_BLK_ID_BYTES;
        br->written = (uint32_t)vn_iov_copy_to(in_iov, req->n_in, 0, d->id, len);
        finish(d, req, br, VIRTIO_BLK_S_OK);
        return;
    }
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES: {
        int is_discard = hdr.type == VIRTIO_BLK_T_DISCARD;
        uint32_t type = is_discard ? VN_IO_UNMAP : VN_IO_WRITE_ZEROES;
        struct blk_seg seg;
        if (!b) goto removed;
        if (!supports(b, type)) { finish(d, req, br, VIRTIO_BLK_S_UNSUPP); return; }
        if (d->readonly) goto invalid;
        /* max_discard_seg = max_write_zeroes_seg = 1 */
        if (data_out != sizeof(seg)) goto invalid;
        vn_iov_copy_from(req->iov, req->n_out, sizeof(hdr), &seg, sizeof(seg));
        if (is_discard ? seg.flags != 0 : (seg.flags & ~VIRTIO_BLK_WZ_F_UNMAP)) {
            finish(d, req, br, VIRTIO_BLK_S_UNSUPP);
            return;
        }
        if (seg.num_sectors == 0 || seg.num_sectors > d->max_discard_sectors) goto invalid;
        if (to_blocks(b, seg.sector, (uint64_t)seg.num_sectors * 512, &off_blocks, &nblocks)) goto invalid;
        submit_io(d, br, type, off_blocks, nblocks, 0);
        return;
    }
    default:
        d->stats.unsupported++;
        finish(d, req, br, VIRTIO_BLK_S_UNSUPP);
        return;
    }
invalid:
    d->stats.invalid++;
    finish(d, req, br, VIRTIO_BLK_S_IOERR);
    return;
removed:
    d->stats.removed_io++;
    finish(d, req, br, VIRTIO_BLK_S_IOERR);
}

static const struct vn_device_ops blk_ops = {
    .abi_version = VN_ABI_VERSION,
    .submit = blk_submit,
};

const void *blk_device_ops(void) { return &blk_ops; }

struct blk_dev *blk_dev_new(void *desc, int readonly, const char *id, uint32_t max_discard_sectors)
{
    struct blk_dev *d = calloc(1, sizeof(*d));
    if (!d) return NULL;
    d->desc = desc;
    d->readonly = readonly;
    d->max_discard_sectors = max_discard_sectors;
    strncpy(d->id, id, VIRTIO_BLK_ID_BYTES);   /* not NUL-terminated at 20 bytes: per spec */
    return d;
}

void blk_dev_free(struct blk_dev *d) { free(d); }

void blk_dev_get_stats(struct blk_dev *d, struct blk_dev_stats *out) { *out = d->stats; }
