/*
 * Ceph RBD images as bdevs, through librbd's asynchronous API.
 *
 * A request goes to librbd the moment the device hands it over (rbd_aio_readv /
 * writev straight on the guest's iovecs: no copy), with a completion whose argument
 * is the request.  librbd calls that completion on one of its own threads: it only
 * pushes the request onto the channel's struct vn_xq, whose eventfd wakes an
 * interrupt-mode reactor; the reactor's channel_poll takes them and completes the
 * guest requests on the reactor, as the core requires.  No thread of ours, none per
 * request, no lock on the data path.
 *
 * librbd's update watch (a resize or a snapshot by anyone, `rbd resize` included)
 * sets a flag on the bdev and writes the module's eventfd; the control plane
 * (plugin.py) reads the new size and tells the core, which tells the guests.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

#include "vhost_core/vhost_native.h"
#include "rbd_bdev.h"

struct rbdn_bdev {
    vn_bdev bdev;
    rados_ioctx_t ioctx;
    rbd_image_t image;
    uint64_t watch_handle;
    int watching;
    int notify_fd;
    int read_only;
    atomic_int updated;
    struct rbdn_stats stats;    /* updated with atomic adds from the reactors */
};

struct rbdn_chan {
    struct rbdn_bdev *b;
    struct vn_xq done;          /* librbd's callback threads -> this reactor */
};

/* In the request's driver_ctx. */
struct rbdn_io {
    struct vn_xq_node node;
    struct rbdn_chan *chan;
    rbd_completion_t comp;
    int64_t expect;             /* bytes a read must return */
};

_Static_assert(sizeof(struct rbdn_io) <= sizeof(((vn_bdev_io *)0)->driver_ctx), "driver_ctx too small");

static inline vn_bdev_io *io_of(struct rbdn_io *r)
{
    return (vn_bdev_io *)((uint8_t *)r - offsetof(vn_bdev_io, driver_ctx));
}

static inline void stat_add(uint64_t *p, uint64_t v)
{
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

static void record(struct rbdn_bdev *b, vn_bdev_io *io, int status)
{
    uint32_t t = io->type < 6 ? io->type : 5;
    if (status == 0) {
        stat_add(&b->stats.ops[t], 1);
        if (io->type == VN_IO_READ) stat_add(&b->stats.bytes_read, io->num_blocks * b->bdev.block_size);
        else if (io->type == VN_IO_WRITE) stat_add(&b->stats.bytes_written, io->num_blocks * b->bdev.block_size);
        return;
    }
    stat_add(&b->stats.errors[t], 1);
    /* Diagnostics only: a torn read of these by the control plane is harmless. */
    b->stats.last_type = io->type;
    b->stats.last_offset = io->offset_blocks;
    b->stats.last_blocks = io->num_blocks;
    __atomic_store_n(&b->stats.last_errno, status, __ATOMIC_RELEASE);
}

static void finish(struct rbdn_bdev *b, vn_bdev_io *io, int status)
{
    record(b, io, status);
    io->cb(io, status);
}

/* librbd's thread. */
static void on_complete(rbd_completion_t c, void *arg)
{
    struct rbdn_io *r = arg;
    (void)c;
    vn_xq_push(&r->chan->done, &r->node);
}

static void rbdn_submit(void *ctx, void *chan, vn_bdev_io *io)
{
    struct rbdn_bdev *b = ctx;
    struct rbdn_chan *c = chan;
    struct rbdn_io *r = (struct rbdn_io *)io->driver_ctx;
    uint64_t nb = __atomic_load_n(&b->bdev.num_blocks, __ATOMIC_RELAXED);
    uint64_t bs = b->bdev.block_size;
    int rc;

    if (!c) { io->cb(io, -ENODEV); return; }
    if (io->type >= VN_IO_TYPE_COUNT || !((b->bdev.io_types >> io->type) & 1)) {
        finish(b, io, -ENOTSUP);
        return;
    }
    if (io->type != VN_IO_FLUSH &&
        (io->offset_blocks > nb || io->num_blocks > nb - io->offset_blocks || io->num_blocks == 0)) {
        finish(b, io, -EINVAL);
        return;
    }
    uint64_t off = io->offset_blocks * bs, len = io->num_blocks * bs;
    r->chan = c;
    r->expect = 0;
    if (io->type == VN_IO_READ || io->type == VN_IO_WRITE) {
        uint64_t total = 0;
        for (uint32_t i = 0; i < io->iovcnt; i++) total += io->iov[i].iov_len;
        if (len > VN_MAX_TRANSFER || total != len || io->iovcnt > (uint32_t)VN_MAX_IOV) {
            finish(b, io, len > VN_MAX_TRANSFER ? -E2BIG : -EINVAL);
            return;
        }
        r->expect = io->type == VN_IO_READ ? (int64_t)len : 0;   /* a write returns 0 */
    }
    rc = rbd_aio_create_completion(r, on_complete, &r->comp);
    if (rc < 0) { finish(b, io, rc); return; }
    switch (io->type) {
    case VN_IO_READ:
        rc = rbd_aio_readv(b->image, io->iov, (int)io->iovcnt, off, r->comp);
        break;
    case VN_IO_WRITE:
        rc = rbd_aio_writev(b->image, io->iov, (int)io->iovcnt, off, r->comp);
        break;
    case VN_IO_FLUSH:
        rc = rbd_aio_flush(b->image, r->comp);
        break;
    case VN_IO_UNMAP:
        rc = rbd_aio_discard(b->image, off, len, r->comp);
        break;
    case VN_IO_WRITE_ZEROES:
        rc = rbd_aio_write_zeroes(b->image, off, len, r->comp, 0, 0);
        break;
    default:
        rc = -ENOTSUP;
    }
    if (rc < 0) {
        rbd_aio_release(r->comp);
        finish(b, io, rc);
    }
}

static void *rbdn_chan_create(void *ctx)
{
    struct rbdn_chan *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    c->b = ctx;
    if (vn_xq_init(&c->done, -1) < 0) { free(c); return NULL; }
    return c;
}

static void rbdn_chan_destroy(void *ctx, void *chan)
{
    struct rbdn_chan *c = chan;
    (void)ctx;
    if (!c) return;
    vn_xq_destroy(&c->done);
    free(c);
}

static int rbdn_chan_poll(void *ctx, void *chan)
{
    struct rbdn_chan *c = chan;
    struct rbdn_bdev *b = ctx;
    struct vn_xq_node *n = vn_xq_take(&c->done);
    int count = 0;
    while (n) {
        struct vn_xq_node *next = n->next;
        struct rbdn_io *r = (struct rbdn_io *)((uint8_t *)n - offsetof(struct rbdn_io, node));
        vn_bdev_io *io = io_of(r);
        ssize_t ret = rbd_aio_get_return_value(r->comp);
        rbd_aio_release(r->comp);
        int status;
        if (ret < 0) status = (int)ret;
        else if (r->expect && ret != r->expect) status = -EIO;     /* short read/write */
        else status = 0;
        finish(b, io, status);
        count++;
        n = next;
    }
    return count;
}

static int rbdn_chan_fd(void *ctx, void *chan)
{
    struct rbdn_chan *c = chan;
    (void)ctx;
    return c ? c->done.fd : -1;
}

static const struct vn_bdev_ops rbdn_ops = {
    .abi_version = VN_ABI_VERSION,
    .submit = rbdn_submit,
    .channel_create = rbdn_chan_create,
    .channel_destroy = rbdn_chan_destroy,
    .channel_poll = rbdn_chan_poll,
    .channel_fd = rbdn_chan_fd,
};

/* ------------------------------------------------------------------ */
/* control plane                                                       */
/* ------------------------------------------------------------------ */

int rbdn_cluster_connect(const char *user_id, const char *config_file, const char **keys,
                         const char **vals, int n, void **out, char *err, size_t errlen)
{
    rados_t cluster;
    int rc = rados_create(&cluster, user_id);
    if (rc < 0) { snprintf(err, errlen, "rados_create: %s", strerror(-rc)); return rc; }
    if (config_file) {
        rc = rados_conf_read_file(cluster, config_file);
        if (rc < 0) { snprintf(err, errlen, "reading %s: %s", config_file, strerror(-rc)); goto fail; }
    }
    for (int i = 0; i < n; i++) {
        rc = rados_conf_set(cluster, keys[i], vals[i]);
        if (rc < 0) { snprintf(err, errlen, "config '%s': %s", keys[i], strerror(-rc)); goto fail; }
    }
    rc = rados_connect(cluster);
    if (rc < 0) { snprintf(err, errlen, "connect: %s", strerror(-rc)); goto fail; }
    *out = cluster;
    return 0;
fail:
    rados_shutdown(cluster);
    return rc;
}

void rbdn_cluster_shutdown(void *cluster)
{
    if (cluster) rados_shutdown((rados_t)cluster);
}

static void on_update(void *arg)
{
    struct rbdn_bdev *b = arg;
    atomic_store(&b->updated, 1);
    stat_add(&b->stats.updates, 1);
    uint64_t one = 1;
    if (b->notify_fd >= 0 && write(b->notify_fd, &one, sizeof(one)) < 0) { /* saturated: readable */ }
}

int rbdn_bdev_open(void *cluster, const char *pool, const char *image, const char *snap, int read_only,
                   uint32_t block_size, int notify_fd, void **out)
{
    struct rbdn_bdev *b = calloc(1, sizeof(*b));
    uint64_t size;
    int rc;
    if (!b) return -ENOMEM;
    b->notify_fd = notify_fd;
    b->read_only = read_only || snap;
    rc = rados_ioctx_create((rados_t)cluster, pool, &b->ioctx);
    if (rc < 0) goto fail_free;
    rc = b->read_only ? rbd_open_read_only(b->ioctx, image, &b->image, snap)
                      : rbd_open(b->ioctx, image, &b->image, NULL);
    if (rc < 0) goto fail_ioctx;
    rc = rbd_get_size(b->image, &size);
    if (rc < 0) goto fail_image;
    if (!snap) {
        rc = rbd_update_watch(b->image, &b->watch_handle, on_update, b);
        if (rc < 0) goto fail_image;
        b->watching = 1;
    }
    b->bdev.ops = &rbdn_ops;
    b->bdev.ctx = b;
    b->bdev.block_size = block_size;
    b->bdev.num_blocks = size / block_size;
    b->bdev.io_types = 1u << VN_IO_READ | 1u << VN_IO_FLUSH;
    if (!b->read_only)
        b->bdev.io_types |= 1u << VN_IO_WRITE | 1u << VN_IO_UNMAP | 1u << VN_IO_WRITE_ZEROES;
    *out = b;
    return 0;
fail_image:
    rbd_close(b->image);
fail_ioctx:
    rados_ioctx_destroy(b->ioctx);
fail_free:
    free(b);
    return rc;
}

void rbdn_bdev_free(void *p)
{
    struct rbdn_bdev *b = p;
    if (!b) return;
    if (b->watching) rbd_update_unwatch(b->image, b->watch_handle);
    rbd_close(b->image);
    rados_ioctx_destroy(b->ioctx);
    free(b);
}

void *rbdn_bdev_native(void *p)
{
    return &((struct rbdn_bdev *)p)->bdev;
}

int rbdn_bdev_updated(void *p)
{
    return atomic_exchange(&((struct rbdn_bdev *)p)->updated, 0);
}

void rbdn_bdev_mark_updated(void *p)
{
    atomic_store(&((struct rbdn_bdev *)p)->updated, 1);
}

int64_t rbdn_bdev_image_size(void *p)
{
    struct rbdn_bdev *b = p;
    uint64_t size;
    int rc = rbd_get_size(b->image, &size);
    return rc < 0 ? rc : (int64_t)size;
}

int rbdn_bdev_resize(void *p, uint64_t bytes)
{
    struct rbdn_bdev *b = p;
    return rbd_resize(b->image, bytes);
}

void rbdn_bdev_get_stats(void *p, struct rbdn_stats *out)
{
    struct rbdn_bdev *b = p;
    for (int i = 0; i < 6; i++) {
        out->ops[i] = __atomic_load_n(&b->stats.ops[i], __ATOMIC_RELAXED);
        out->errors[i] = __atomic_load_n(&b->stats.errors[i], __ATOMIC_RELAXED);
    }
    out->bytes_read = __atomic_load_n(&b->stats.bytes_read, __ATOMIC_RELAXED);
    out->bytes_written = __atomic_load_n(&b->stats.bytes_written, __ATOMIC_RELAXED);
    out->last_errno = __atomic_load_n(&b->stats.last_errno, __ATOMIC_ACQUIRE);
    out->last_type = b->stats.last_type;
    out->last_offset = b->stats.last_offset;
    out->last_blocks = b->stats.last_blocks;
    out->updates = __atomic_load_n(&b->stats.updates, __ATOMIC_RELAXED);
}
