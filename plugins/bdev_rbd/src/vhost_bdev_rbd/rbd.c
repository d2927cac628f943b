/*
 * Ceph RBD images as bdevs, through librbd's asynchronous API.
 *
 * A request goes to librbd the moment the device hands it over (rbd_aio_readv /
 * writev straight on the guest's iovecs: no copy), with a completion whose argument
 * is the request.  librbd calls that completion on one of its own threads: it only
 * pushes the request onto the channel's struct vn_xq, whose eventfd wakes an
 * interrupt-mode reactor; the reactor's channel_poll takes them and completes the
 * guest requests on the reactor, as the core requires.  No thread of ours, none per
 * request, no lock on the data path (one, only while requests wait for budget, below).
 *
 * Submission from the reactor.  By default librbd hands every aio call to its own
 * dispatch thread (rbd_non_blocking_aio=true), one more thread wake-up per request;
 * the plugin turns that off, so librbd builds and sends the object requests on the
 * reactor itself (one thread wake-up less; measured: 3-7% less CPU per I/O).  What
 * could then block the reactor is the cluster connection's Objecter throttle
 * (objecter_inflight_ops / objecter_inflight_op_bytes: a caller over them sleeps until
 * the OSDs answer, as long as an OSD stall lasts).  So every request first takes a
 * share of a per-cluster budget, half of each throttle: a request that does not fit
 * is held on its channel, in order, and goes once completions (on any reactor) give
 * budget back; discards and write-zeroes larger than a quarter of it go as a sequence
 * of chunks.  librbd's writeback cache (rbd_cache_policy writeback / writethrough) sends
 * flushes of its own through the same throttle and can wait in the caller, and its
 * writearound cache acknowledges writes whose object requests then stay in the
 * Objecter outside the budget: with the one, or the other over a throttled Objecter,
 * the cluster keeps librbd's dispatch thread (cluster_connect decides).  The plugin's
 * defaults turn the Objecter's throttle off (the reactors then never wait in it, the
 * guests' queues bound what is in flight), so with Ceph's default writearound cache
 * the reactors submit, and the budget applies where a throttle is configured.
 *
 * librbd's update watch (a resize or a snapshot by anyone, `rbd resize` included)
 * sets a flag on the bdev and writes the module's eventfd; the control plane
 * (plugin.py) reads the new size and tells the core, which tells the guests.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
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

/* A data-path connection, shared by the images of one cluster (one Objecter, one budget). */
struct rbdn_cluster {
    rados_t rados;
    int reactor_submit;         /* rbd_non_blocking_aio is off: librbd runs on the caller */
    int budgeted;               /* ... and an Objecter throttle is set: requests take budget */
    int64_t ops_cap, bytes_cap; /* half of objecter_inflight_ops / _op_bytes */
    _Atomic uint64_t budget;    /* taken by requests in librbd: ops << 40 | bytes */
    atomic_int nwaiters;        /* channels holding requests back for budget */
    pthread_mutex_t lock;       /* the waiters list */
    struct rbdn_chan *waiters;
};

struct rbdn_bdev {
    vn_bdev bdev;
    struct rbdn_cluster *cl;
    uint64_t span_unit;         /* bytes of the image in one object before the next one starts */
    uint64_t discard_chunk, zeroes_chunk;       /* bytes sent at once (within a budget share) */
    rados_ioctx_t ioctx;
    rbd_image_t image;
    uint64_t watch_handle;
    int watching;
    int notify_fd;
    int read_only;
    atomic_int updated;
    struct rbdn_stats stats;    /* updated with atomic adds from the reactors */
};

struct rbdn_io;

struct rbdn_chan {
    struct rbdn_bdev *b;
    struct vn_xq done;          /* librbd's callback threads -> this reactor */
    struct rbdn_io *held, *held_tail;   /* waiting for budget, oldest first (reactor only) */
    int waiting;                /* on the cluster's waiters list (under its lock) */
    atomic_int kicked;          /* woken for budget (set after the fd is written) */
    struct rbdn_chan *next_waiter;
};

/* In the request's driver_ctx. */
struct rbdn_io {
    struct vn_xq_node node;
    struct rbdn_chan *chan;
    rbd_completion_t comp;
    int64_t expect;             /* bytes a read must return */
    uint64_t pos, end;          /* bytes: what is left to send (chunked discard / write-zeroes) */
    uint64_t len;               /* bytes of the part in librbd now */
    int64_t cost_ops, cost_bytes;       /* budget that part holds */
    struct rbdn_io *held_next;
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

/* ---- budget: what the reactor may have in librbd at once (see the top of the file) ---- */

/* Both counts in one word, so that taking a share is one compare-and-swap: a take fails
 * only when requests really hold the budget, and their completions wake the waiters. */
#define BUDGET_OPS_SHIFT 40
#define BUDGET_MAX_OPS (1ll << 22)
#define BUDGET_MAX_BYTES (1ll << 39)

static inline uint64_t budget_word(int64_t ops, int64_t bytes)
{
    return (uint64_t)ops << BUDGET_OPS_SHIFT | (uint64_t)bytes;
}

static int take_budget(struct rbdn_cluster *cl, int64_t ops, int64_t bytes)
{
    uint64_t cur = atomic_load(&cl->budget);
    for (;;) {
        int64_t o = (int64_t)(cur >> BUDGET_OPS_SHIFT) + ops;
        int64_t y = (int64_t)(cur & ((1ull << BUDGET_OPS_SHIFT) - 1)) + bytes;
        /* Over a share, a request goes alone (nothing else of this cluster in librbd):
         * the Objecter lets one oversized request through when it has nothing else. */
        if (cur != 0 && (o > cl->ops_cap || y > cl->bytes_cap)) return 0;
        if (atomic_compare_exchange_weak(&cl->budget, &cur, cur + budget_word(ops, bytes))) return 1;
    }
}

static void wake_waiters(struct rbdn_cluster *cl)
{
    pthread_mutex_lock(&cl->lock);
    struct rbdn_chan *w = cl->waiters;
    cl->waiters = NULL;
    atomic_store(&cl->nwaiters, 0);
    while (w) {
        struct rbdn_chan *next = w->next_waiter;
        uint64_t one = 1;
        w->waiting = 0;
        /* fd first: a poller that sees `kicked` finds the fd written (and resets it). */
        if (write(w->done.fd, &one, sizeof(one)) < 0) { /* saturated: readable */ }
        atomic_store(&w->kicked, 1);
        w = next;
    }
    pthread_mutex_unlock(&cl->lock);
}

static void give_budget(struct rbdn_cluster *cl, int64_t ops, int64_t bytes)
{
    if (!ops && !bytes) return;
    atomic_fetch_sub(&cl->budget, budget_word(ops, bytes));
    /* seq_cst, as add_waiter's increment: a waiter either is seen here or sees this. */
    if (atomic_load(&cl->nwaiters)) wake_waiters(cl);
}

static void add_waiter(struct rbdn_cluster *cl, struct rbdn_chan *c)
{
    pthread_mutex_lock(&cl->lock);
    if (!c->waiting) {
        c->waiting = 1;
        c->next_waiter = cl->waiters;
        cl->waiters = c;
        atomic_fetch_add(&cl->nwaiters, 1);
    }
    pthread_mutex_unlock(&cl->lock);
}

static void drop_waiter(struct rbdn_cluster *cl, struct rbdn_chan *c)
{
    pthread_mutex_lock(&cl->lock);
    if (c->waiting) {
        for (struct rbdn_chan **p = &cl->waiters; *p; p = &(*p)->next_waiter)
            if (*p == c) { *p = c->next_waiter; break; }
        c->waiting = 0;
        atomic_fetch_sub(&cl->nwaiters, 1);
    }
    pthread_mutex_unlock(&cl->lock);
}

/* ---- the data path ---- */

/* librbd's thread. */
static void on_complete(rbd_completion_t c, void *arg)
{
    struct rbdn_io *r = arg;
    (void)c;
    vn_xq_push(&r->chan->done, &r->node);
}

static int64_t objects_spanned(const struct rbdn_bdev *b, uint64_t off, uint64_t len)
{
    if (!len) return 1;
    return (int64_t)((off + len - 1) / b->span_unit - off / b->span_unit + 1);
}

/* The next part of r to send (all of it but for a large discard or write-zeroes) and the
 * budget it takes: the Objecter's count of the object requests and data bytes it makes. */
static void plan_part(const struct rbdn_bdev *b, struct rbdn_io *r, uint32_t type)
{
    uint64_t left = r->end - r->pos;
    if (type == VN_IO_UNMAP && left > b->discard_chunk) left = b->discard_chunk;
    if (type == VN_IO_WRITE_ZEROES && left > b->zeroes_chunk) left = b->zeroes_chunk;
    r->len = left;
    r->cost_ops = r->cost_bytes = 0;
    if (!b->cl->budgeted) return;       /* no throttle to stay under: no shared word to touch */
    switch (type) {
    case VN_IO_READ:            /* + one: a sequential reader's readahead */
        r->cost_ops = objects_spanned(b, r->pos, left) + 1;
        r->cost_bytes = (int64_t)left;
        break;
    case VN_IO_WRITE:
    case VN_IO_WRITE_ZEROES:    /* zeroes may go as data (writesame) */
        r->cost_ops = objects_spanned(b, r->pos, left);
        r->cost_bytes = (int64_t)left;
        break;
    case VN_IO_UNMAP:
        r->cost_ops = objects_spanned(b, r->pos, left);
        break;
    default:                    /* flush */
        r->cost_ops = 1;
    }
}

/* 0, or a negative errno (then nothing is in librbd). */
static int send_part(struct rbdn_bdev *b, struct rbdn_io *r, vn_bdev_io *io)
{
    int rc = rbd_aio_create_completion(r, on_complete, &r->comp);
    if (rc < 0) return rc;
    switch (io->type) {
    case VN_IO_READ:
        rc = rbd_aio_readv(b->image, io->iov, (int)io->iovcnt, r->pos, r->comp);
        break;
    case VN_IO_WRITE:
        rc = rbd_aio_writev(b->image, io->iov, (int)io->iovcnt, r->pos, r->comp);
        break;
    case VN_IO_FLUSH:
        rc = rbd_aio_flush(b->image, r->comp);
        break;
    case VN_IO_UNMAP:
        rc = rbd_aio_discard(b->image, r->pos, r->len, r->comp);
        break;
    case VN_IO_WRITE_ZEROES:
        rc = rbd_aio_write_zeroes(b->image, r->pos, r->len, r->comp, 0, 0);
        break;
    default:
        rc = -ENOTSUP;
    }
    if (rc < 0) rbd_aio_release(r->comp);
    return rc;
}

/* Sends r's next part when its budget is there: 1 (sent, or finished with an error), or
 * 0 (no budget: nothing happened). */
static int try_send(struct rbdn_chan *c, struct rbdn_io *r)
{
    struct rbdn_bdev *b = c->b;
    vn_bdev_io *io = io_of(r);
    plan_part(b, r, io->type);
    if ((r->cost_ops || r->cost_bytes) && !take_budget(b->cl, r->cost_ops, r->cost_bytes)) return 0;
    int rc = send_part(b, r, io);
    if (rc < 0) {
        give_budget(b->cl, r->cost_ops, r->cost_bytes);
        finish(b, io, rc);
    }
    return 1;
}

static void hold(struct rbdn_chan *c, struct rbdn_io *r)
{
    r->held_next = NULL;
    if (c->held_tail) c->held_tail->held_next = r;
    else c->held = r;
    c->held_tail = r;
}

/* Sends what the channel holds, in order, while the budget lasts.  What is still held
 * then is left with the channel on the cluster's waiters list: the next completion of
 * the cluster, on any reactor, writes this channel's fd. */
static int send_held(struct rbdn_chan *c)
{
    int sent = 0, registered = 0;
    while (c->held) {
        struct rbdn_io *r = c->held;
        c->held = r->held_next;
        if (!c->held) c->held_tail = NULL;
        if (try_send(c, r)) {
            sent++;
            continue;
        }
        r->held_next = c->held;         /* back to the head */
        c->held = r;
        if (!c->held_tail) c->held_tail = r;
        if (registered) break;
        /* Registered first, then one more try: budget given back between the failed take
         * and the registration woke nobody. */
        add_waiter(c->b->cl, c);
        registered = 1;
    }
    return sent;
}

static void start(struct rbdn_chan *c, struct rbdn_io *r)
{
    if (c->held) { hold(c, r); return; }        /* behind what waits already */
    if (!try_send(c, r)) {
        hold(c, r);
        send_held(c);
    }
}

static void rbdn_submit(void *ctx, void *chan, vn_bdev_io *io)
{
    struct rbdn_bdev *b = ctx;
    struct rbdn_chan *c = chan;
    struct rbdn_io *r = (struct rbdn_io *)io->driver_ctx;
    uint64_t nb = __atomic_load_n(&b->bdev.num_blocks, __ATOMIC_RELAXED);
    uint64_t bs = b->bdev.block_size;

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
    uint64_t off = io->offset_blocks * bs, len = io->type == VN_IO_FLUSH ? 0 : io->num_blocks * bs;
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
    r->pos = off;
    r->end = off + len;
    start(c, r);
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
    drop_waiter(c->b->cl, c);
    vn_xq_destroy(&c->done);
    free(c);
}

static int rbdn_chan_poll(void *ctx, void *chan)
{
    struct rbdn_chan *c = chan;
    struct rbdn_bdev *b = ctx;
    int count = 0;
    if (__builtin_expect(atomic_load_explicit(&c->kicked, memory_order_relaxed), 0)) {
        /* Woken for budget, not by a completion: reset the fd (before vn_xq_take, which
         * resets it only when something was pushed). */
        uint64_t v;
        atomic_store(&c->kicked, 0);
        if (read(c->done.fd, &v, sizeof(v)) < 0) { /* EAGAIN */ }
    }
    struct vn_xq_node *n = vn_xq_take(&c->done);
    while (n) {
        struct vn_xq_node *next = n->next;
        struct rbdn_io *r = (struct rbdn_io *)((uint8_t *)n - offsetof(struct rbdn_io, node));
        vn_bdev_io *io = io_of(r);
        ssize_t ret = rbd_aio_get_return_value(r->comp);
        rbd_aio_release(r->comp);
        give_budget(b->cl, r->cost_ops, r->cost_bytes);
        int status;
        if (ret < 0) status = (int)ret;
        else if (r->expect && ret != r->expect) status = -EIO;     /* short read/write */
        else status = 0;
        r->pos += r->len;
        if (status == 0 && r->pos < r->end) start(c, r);            /* the next chunk */
        else finish(b, io, status);
        count++;
        n = next;
    }
    if (c->held) count += send_held(c);
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

static int conf_is_true(rados_t r, const char *key, int dflt)
{
    char v[32];
    if (rados_conf_get(r, key, v, sizeof(v)) < 0) return dflt;
    return !strcmp(v, "true") || !strcmp(v, "1");
}

static int64_t conf_int(rados_t r, const char *key, int64_t dflt)
{
    char v[32], *end;
    if (rados_conf_get(r, key, v, sizeof(v)) < 0) return dflt;
    long long x = strtoll(v, &end, 10);
    return end == v ? dflt : (int64_t)x;
}

/* Half of the Objecter's throttle (0: none, and then the largest share the word holds). */
static int64_t share(int64_t throttle, int64_t max)
{
    if (throttle <= 0 || throttle / 2 > max) return max;
    return throttle / 2 > 0 ? throttle / 2 : 1;
}

int rbdn_cluster_connect(const char *user_id, const char *config_file, const char **keys,
                         const char **vals, int n, void **out, char *err, size_t errlen)
{
    struct rbdn_cluster *cl = calloc(1, sizeof(*cl));
    rados_t cluster;
    if (!cl) { snprintf(err, errlen, "out of memory"); return -ENOMEM; }
    int rc = rados_create(&cluster, user_id);
    if (rc < 0) { snprintf(err, errlen, "rados_create: %s", strerror(-rc)); free(cl); return rc; }
    if (config_file) {
        rc = rados_conf_read_file(cluster, config_file);
        if (rc < 0) { snprintf(err, errlen, "reading %s: %s", config_file, strerror(-rc)); goto fail; }
    }
    for (int i = 0; i < n; i++) {
        rc = rados_conf_set(cluster, keys[i], vals[i]);
        if (rc < 0) { snprintf(err, errlen, "config '%s': %s", keys[i], strerror(-rc)); goto fail; }
    }
    /* Reactor submission only where librbd cannot wait in the caller (see the top of the
     * file): not with its writeback cache, and not with its writearound cache over a
     * throttled Objecter, as the writes that cache acknowledged at once stay in the
     * Objecter outside the budget.  The plugin's defaults turn the throttle off. */
    char policy[32] = "";
    if (rados_conf_get(cluster, "rbd_cache_policy", policy, sizeof(policy)) < 0) policy[0] = 0;
    int64_t ops_throttle = conf_int(cluster, "objecter_inflight_ops", 1024);
    int64_t bytes_throttle = conf_int(cluster, "objecter_inflight_op_bytes", 100 << 20);
    int cache = conf_is_true(cluster, "rbd_cache", 1);
    int writeback = cache && strcmp(policy, "writearound") != 0;
    int acked_in_flight = cache && (ops_throttle > 0 || bytes_throttle > 0);
    if (writeback || acked_in_flight) rados_conf_set(cluster, "rbd_non_blocking_aio", "true");
    cl->reactor_submit = !conf_is_true(cluster, "rbd_non_blocking_aio", 1);
    cl->budgeted = cl->reactor_submit && (ops_throttle > 0 || bytes_throttle > 0);
    cl->ops_cap = share(ops_throttle, BUDGET_MAX_OPS);
    cl->bytes_cap = share(bytes_throttle, BUDGET_MAX_BYTES);
    rc = rados_connect(cluster);
    if (rc < 0) { snprintf(err, errlen, "connect: %s", strerror(-rc)); goto fail; }
    cl->rados = cluster;
    pthread_mutex_init(&cl->lock, NULL);
    *out = cl;
    return 0;
fail:
    rados_shutdown(cluster);
    free(cl);
    return rc;
}

void rbdn_cluster_shutdown(void *p)
{
    struct rbdn_cluster *cl = p;
    if (!cl) return;
    rados_shutdown(cl->rados);
    pthread_mutex_destroy(&cl->lock);
    free(cl);
}

int rbdn_cluster_reactor_submit(void *p, int64_t *ops_cap, int64_t *bytes_cap)
{
    struct rbdn_cluster *cl = p;
    *ops_cap = cl->ops_cap;
    *bytes_cap = cl->bytes_cap;
    return cl->reactor_submit;
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
    struct rbdn_cluster *cl = cluster;
    rbd_image_info_t info;
    uint64_t size;
    int rc;
    if (!b) return -ENOMEM;
    b->cl = cl;
    b->notify_fd = notify_fd;
    b->read_only = read_only || snap;
    rc = rados_ioctx_create(cl->rados, pool, &b->ioctx);
    if (rc < 0) goto fail_free;
    rc = b->read_only ? rbd_open_read_only(b->ioctx, image, &b->image, snap)
                      : rbd_open(b->ioctx, image, &b->image, NULL);
    if (rc < 0) goto fail_ioctx;
    rc = rbd_get_size(b->image, &size);
    if (rc < 0) goto fail_image;
    rc = rbd_stat(b->image, &info, sizeof(info));
    if (rc < 0) goto fail_image;
    /* With fancy striping every stripe unit may be another object. */
    uint64_t unit = 0, count = 0;
    b->span_unit = info.obj_size ? info.obj_size : 4u << 20;
    if (rbd_get_stripe_unit(b->image, &unit) == 0 && rbd_get_stripe_count(b->image, &count) == 0 &&
        count > 1 && unit > 0 && unit < b->span_unit)
        b->span_unit = unit;
    b->discard_chunk = b->zeroes_chunk = UINT64_MAX;
    if (cl->budgeted) {
        /* A quarter share at a time, whole blocks, at least one. */
        uint64_t objs = (uint64_t)(cl->ops_cap / 4 > 1 ? cl->ops_cap / 4 : 1);
        uint64_t d = b->span_unit * objs, z = (uint64_t)cl->bytes_cap / 4;
        if (z > d) z = d;
        d -= d % block_size;
        z -= z % block_size;
        b->discard_chunk = d ? d : block_size;
        b->zeroes_chunk = z ? z : block_size;
    }
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
