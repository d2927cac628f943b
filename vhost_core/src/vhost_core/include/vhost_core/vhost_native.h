/*
 * vhost_native.h - the public C contract of vhost-core's data path.
 *
 * Plugins with native parts (device types such as dev_blk, bdev backends such as
 * bdev_malloc) compile against this header, found through
 * `vhost_core.get_include()`.  Nothing here is linked: every call that crosses a
 * shared-object boundary goes through a function pointer carried in a struct, so a
 * plugin's extension module never needs the core's symbols.
 *
 * Threading: every callback below runs on the reactor thread that owns the device
 * (one pinned native thread per core of the daemon's cpumask), without the GIL.
 * Callbacks must not block.  The one exception is struct vn_xq, the queue that
 * brings completions from other threads (a backend's helper thread, a library's
 * callback thread) back to the reactor.
 *
 * The pieces, as SPDK splits them: a bdev (struct vn_bdev, its module's I/O
 * table) is opened by a device on its reactor and the device gets a descriptor
 * (struct vn_bdev_desc, owned by the core).  The device submits through the
 * descriptor; the core keeps the per-reactor channel, counts I/O in flight,
 * times it and keeps bdev_get_iostat's counters, and the reactor polls the
 * channel and waits on its fd.  A device's own table (struct vn_device_ops) is
 * only what is truly the device's: turning a descriptor chain into bdev I/O,
 * and its own deferred work.
 *
 * ABI: VN_ABI_VERSION changes whenever a struct in this file changes layout.  A
 * plugin records the version it was built with in its ops tables (`abi_version`)
 * and the core refuses tables of another version.
 */
#ifndef VHOST_CORE_VHOST_NATIVE_H
#define VHOST_CORE_VHOST_NATIVE_H

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define VN_ABI_VERSION 3

/* Most descriptors one request may carry (data segments + header + status). */
#define VN_MAX_IOV 260
/* Most data bytes one request may move (READ/WRITE payload, excluding the
 * device's headers).  The core fails a chain whose device-readable or
 * device-writable part exceeds VN_MAX_TRANSFER + VN_MAX_HEADER_BYTES (E2BIG)
 * before a device sees it; each device type advertises limits whose product
 * stays within it (virtio-blk seg_max * size_max, virtio-scsi max_sectors and
 * the Block Limits VPD page).  It bounds what one guest request can cost a
 * reactor: bounce buffers, memcpy on malloc, one kernel I/O. */
#define VN_MAX_TRANSFER (4u << 20)
/* Room for a device's request and response headers on top of the data
 * (virtio-scsi's 51-byte request with a 32-byte CDB, 108-byte response). */
#define VN_MAX_HEADER_BYTES 4096u
/* Bytes of per-request scratch space reserved for the device type. */
#define VN_DEV_PRIV_SIZE 4672

/* ------------------------------------------------------------------ */
/* bdev I/O: what a device type asks of a block backend               */
/* ------------------------------------------------------------------ */

enum vn_io_type {
    VN_IO_READ = 0,
    VN_IO_WRITE = 1,
    VN_IO_FLUSH = 2,
    VN_IO_UNMAP = 3,
    VN_IO_WRITE_ZEROES = 4,
    VN_IO_RESET = 5,
    VN_IO_TYPE_COUNT
};

typedef struct vn_bdev_io vn_bdev_io;
typedef struct vn_bdev_desc vn_bdev_desc;

/* Completion callback: status 0 on success, a negative errno on failure. */
typedef void (*vn_bdev_io_cb)(vn_bdev_io *io, int status);

/* vn_bdev_io.flags, set by the device. */
enum {
    /* Part of a larger request the device accounts itself (vn_desc_account): the
     * core counts it in flight but not in bdev_get_iostat. */
    VN_IO_F_NO_STAT = 1,
};

/*
 * One block I/O.  Owned by the submitter (a device type keeps it inside its
 * per-request scratch space), which fills the first block of members and hands it
 * to vn_desc_submit().  The bdev must call `cb` exactly once, either from inside
 * submit() or later from its channel poller, on the same reactor thread (or hand
 * it back there through a struct vn_xq).
 */
struct vn_bdev_io {
    uint32_t type;              /* enum vn_io_type */
    uint32_t iovcnt;            /* data segments (READ/WRITE only) */
    uint64_t offset_blocks;     /* first block */
    uint64_t num_blocks;        /* block count (0 for FLUSH means "all") */
    struct iovec *iov;          /* host-virtual data segments (READ/WRITE) */
    uint32_t flags;             /* VN_IO_F_* */
    uint32_t reserved;
    /* What the bdev calls on completion (the core's accounting, set by vn_desc_submit). */
    vn_bdev_io_cb cb;
    /* The device's completion and its argument (vn_desc_submit's `done`, `arg`). */
    vn_bdev_io_cb done;
    void *cb_arg;
    /* The core's (vn_desc_submit): the descriptor and the start of the I/O. */
    vn_bdev_desc *desc;
    uint64_t start_ticks;
    /* Scratch space for the bdev module (the core uses it while it holds the I/O
     * back for a QoS rate limit, before the bdev sees it). */
    uint8_t driver_ctx[128];
};

/*
 * The per-bdev I/O table.  `submit` is required; the channel members are
 * optional (NULL: the bdev needs no per-thread state and completes inline).
 * The core calls every member: channels are created, polled, waited on and
 * destroyed by the reactor of the descriptor that opened the bdev.
 */
struct vn_bdev_ops {
    uint32_t abi_version;       /* VN_ABI_VERSION at build time */
    /* Start `io` on `chan` (the value channel_create returned, or NULL). */
    void (*submit)(void *bdev_ctx, void *chan, vn_bdev_io *io);
    /* Make per-reactor state; called on the reactor thread.  NULL return = error. */
    void *(*channel_create)(void *bdev_ctx);
    /* Free it; called on the same reactor thread once no I/O is outstanding. */
    void (*channel_destroy)(void *bdev_ctx, void *chan);
    /* Reap completions; returns how many it completed.  Optional. */
    int (*channel_poll)(void *bdev_ctx, void *chan);
    /* An fd that becomes readable when channel_poll has work (interrupt mode).
     * Optional; -1 when the bdev completes inline. */
    int (*channel_fd)(void *bdev_ctx, void *chan);
};

/*
 * A block device as the data path sees it.  Created by the bdev module (in C or by
 * the core's adapter), owned by it, and outlives every descriptor that opened it.
 * num_blocks may change while devices run (a resize): the core stores it
 * atomically, readers load it once per request.
 */
typedef struct vn_bdev {
    const struct vn_bdev_ops *ops;
    void *ctx;
    uint32_t block_size;        /* bytes, a power of two >= 512 */
    uint32_t io_types;          /* bit (1 << enum vn_io_type) per supported type */
    uint64_t num_blocks;
} vn_bdev;

/* ------------------------------------------------------------------ */
/* I/O statistics (SPDK's bdev_get_iostat)                             */
/* ------------------------------------------------------------------ */

/*
 * The core counts the I/O a descriptor completes successfully, one struct per
 * descriptor, written only by its reactor thread (plain stores: no atomics on
 * the hot path; the control plane reads a slightly stale copy).  Latency is in
 * vn_ticks() units and measured as struct vn_iostat_clock below describes.
 */
/* In the order of enum vn_io_type, so that an I/O's type is its kind (RESET is not counted). */
enum vn_stat_kind { VN_STAT_READ = VN_IO_READ, VN_STAT_WRITE = VN_IO_WRITE, VN_STAT_FLUSH = VN_IO_FLUSH,
                    VN_STAT_UNMAP = VN_IO_UNMAP, VN_STAT_WRITE_ZEROES = VN_IO_WRITE_ZEROES, VN_STAT_KINDS };

struct vn_iostat {
    uint64_t ops[VN_STAT_KINDS];
    uint64_t bytes[VN_STAT_KINDS];
    uint64_t ticks[VN_STAT_KINDS];       /* sum of latencies */
    uint64_t max_ticks[VN_STAT_KINDS];
    uint64_t min_ticks[VN_STAT_KINDS];   /* 0 until the first I/O of that kind */
};

/* A monotonic clock: the TSC on x86-64 (the core reports its rate as
 * bdev_get_iostat's tick_rate), nanoseconds elsewhere. */
static inline uint64_t vn_ticks(void)
{
#if defined(__x86_64__)
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
#endif
}

/*
 * Two clock reads per reactor iteration instead of two per request (a TSC read
 * costs ~20 ns in a VM): each reactor has one clock.  A submission takes its start
 * time from vn_iostat_start(), a completion is deferred with vn_iostat_defer(),
 * and at the end of every iteration -- after its requests were submitted and its
 * channels polled, just before it publishes their completions to the guest -- the
 * reactor calls vn_iostat_flush(), which times every deferred completion with one
 * clock read and expires the start time.  Latency is thus what the guest sees: from
 * the iteration that took the request from the ring to the one that returned it.
 */
#define VN_IOSTAT_DEFER_MAX 256

struct vn_iostat_clock {
    uint64_t start;
    int start_valid;
    uint32_t n;
    struct { struct vn_iostat *stat; uint64_t start, bytes; uint32_t kind; } pend[VN_IOSTAT_DEFER_MAX];
};

static inline uint64_t vn_iostat_start(struct vn_iostat_clock *c)
{
    if (!c->start_valid) { c->start = vn_ticks(); c->start_valid = 1; }
    return c->start;
}

static inline void vn_iostat_flush(struct vn_iostat_clock *c)
{
    c->start_valid = 0;
    if (!c->n) return;
    uint64_t now = vn_ticks();
    for (uint32_t i = 0; i < c->n; i++) {
        struct vn_iostat *s = c->pend[i].stat;
        uint32_t k = c->pend[i].kind;
        uint64_t t = now - c->pend[i].start;
        s->ops[k]++;
        s->bytes[k] += c->pend[i].bytes;
        s->ticks[k] += t;
        if (t > s->max_ticks[k]) s->max_ticks[k] = t;
        if (t < s->min_ticks[k] || s->min_ticks[k] == 0) s->min_ticks[k] = t;
    }
    c->n = 0;
}

static inline void vn_iostat_defer(struct vn_iostat_clock *c, struct vn_iostat *s, enum vn_stat_kind kind,
                                   uint64_t bytes, uint64_t start)
{
    if (c->n == VN_IOSTAT_DEFER_MAX) {
        int valid = c->start_valid;
        vn_iostat_flush(c);
        c->start_valid = valid;
    }
    c->pend[c->n].stat = s;
    c->pend[c->n].start = start;
    c->pend[c->n].bytes = bytes;
    c->pend[c->n].kind = kind;
    c->n++;
}

/* ------------------------------------------------------------------ */
/* bdev descriptors: how a device uses a bdev (SPDK's spdk_bdev_desc)  */
/* ------------------------------------------------------------------ */

/*
 * An open bdev on one reactor.  The core makes it (vn_desc_open, from the control
 * plane, when the device's Python half calls DeviceContext.open_bdev) together
 * with the bdev's channel on that reactor, polls the channel and waits on its fd
 * in interrupt mode, and frees it; the device only reads `bdev` (geometry) and
 * calls the inline functions below, on the reactor thread.
 *
 * Closing is the control plane's: first `closing` is set (devices fail new I/O,
 * see vn_desc_usable), then, once nothing is in flight, the channel goes and
 * `bdev` becomes NULL.  A device that submits on a closed descriptor gets its I/O
 * failed with -ENODEV at once.
 */
struct vn_bdev_desc {
    vn_bdev *bdev;              /* NULL once closed */
    void *chan;                 /* the bdev's channel on this reactor (or NULL) */
    struct vn_iostat_clock *clock;   /* the reactor's */
    uint64_t in_flight;         /* submitted and not completed yet */
    int closing;                /* the bdev goes away or the device lets go of it */
    uint32_t block_size;        /* bdev->block_size, at hand for the accounting */
    struct vn_iostat iostat;    /* what completed successfully (bdev_get_iostat) */
    /* The core's QoS throttle (bdev_set_qos_limit): NULL while the bdev has no rate
     * limit (the submit path then costs one test); set, every I/O goes through it,
     * and I/O over the limit waits in the descriptor's FIFO for tokens (never failed). */
    void (*qos_submit)(vn_bdev_desc *d, vn_bdev_io *io);
};

/* Whether new I/O may be submitted (the bdev is open and not being closed). */
static inline int vn_desc_usable(const vn_bdev_desc *d)
{
    return d && d->bdev && !d->closing;
}

/* The iteration's start time, for a device that accounts a request itself. */
static inline uint64_t vn_desc_now(vn_bdev_desc *d)
{
    return vn_iostat_start(d->clock);
}

/* Count one successful request of `kind` moving `bytes` that started at `start`
 * (vn_desc_now): for devices that submit it as several I/Os with VN_IO_F_NO_STAT. */
static inline void vn_desc_account(vn_bdev_desc *d, enum vn_stat_kind kind, uint64_t bytes, uint64_t start)
{
    vn_iostat_defer(d->clock, &d->iostat, kind, bytes, start);
}

/* The completion the bdev calls (io->cb): the core's accounting, then the device's.
 * (A flush's bytes are counted but never reported.) */
static inline void vn__desc_io_done(vn_bdev_io *io, int status)
{
    vn_bdev_desc *d = io->desc;
    uint32_t type = io->type;
    d->in_flight--;
    if (__builtin_expect(((uint32_t)status | (io->flags & VN_IO_F_NO_STAT)) == 0 && type < VN_STAT_KINDS, 1))
        vn_iostat_defer(d->clock, &d->iostat, (enum vn_stat_kind)type, io->num_blocks * d->block_size,
                        io->start_ticks);
    io->done(io, status);
}

/*
 * Submit `io` (its type, blocks, iovecs and flags filled in) on the descriptor's
 * channel; `done(io, status)` runs once it completes (possibly inside this call),
 * with io->cb_arg == arg.  Runs on the descriptor's reactor thread.
 */
static inline void vn_desc_submit(vn_bdev_desc *d, vn_bdev_io *io, vn_bdev_io_cb done, void *arg)
{
    io->done = done;
    io->cb_arg = arg;
    if (__builtin_expect(d->bdev == NULL, 0)) {
        done(io, -ENODEV);
        return;
    }
    io->cb = vn__desc_io_done;
    io->desc = d;
    io->start_ticks = vn_iostat_start(d->clock);
    d->in_flight++;
    if (__builtin_expect(d->qos_submit != NULL, 0)) {
        d->qos_submit(d, io);
        return;
    }
    d->bdev->ops->submit(d->bdev->ctx, d->chan, io);
}

/* ------------------------------------------------------------------ */
/* cross-thread completions                                            */
/* ------------------------------------------------------------------ */

/*
 * A lock-free queue that brings work done on other threads (a backend's helper
 * thread, a client library's callback thread, the Python bdev adapter's worker)
 * back to one consumer, the reactor that owns a channel.  Any number of threads
 * push; only the consumer takes, in push order.  The queue's eventfd becomes
 * readable when it goes from empty to non-empty, so that an interrupt-mode reactor
 * sleeping on the channel's fd wakes; it is the channel's own fd (made by
 * vn_xq_init with fd < 0, and reset by vn_xq_take) or one the channel shares with
 * other sources (fd >= 0: the channel resets it itself).
 *
 * Items embed a struct vn_xq_node; get the item back with offsetof.
 */
struct vn_xq_node {
    struct vn_xq_node *next;
};

struct vn_xq {
    _Atomic(struct vn_xq_node *) head;      /* newest first */
    int fd;
    int own_fd;
};

/* 0, or -errno when the eventfd cannot be made. */
static inline int vn_xq_init(struct vn_xq *q, int fd)
{
    atomic_init(&q->head, (struct vn_xq_node *)0);
    q->own_fd = fd < 0;
    q->fd = fd < 0 ? eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC) : fd;
    return q->fd < 0 ? -errno : 0;
}

static inline void vn_xq_destroy(struct vn_xq *q)
{
    if (q->own_fd && q->fd >= 0) close(q->fd);
    q->fd = -1;
}

/* Any thread. */
static inline void vn_xq_push(struct vn_xq *q, struct vn_xq_node *n)
{
    struct vn_xq_node *old = atomic_load_explicit(&q->head, memory_order_relaxed);
    do {
        n->next = old;
    } while (!atomic_compare_exchange_weak_explicit(&q->head, &old, n, memory_order_release,
                                                    memory_order_relaxed));
    if (!old) {
        uint64_t one = 1;
        if (write(q->fd, &one, sizeof(one)) < 0) { /* saturated: already readable */ }
    }
}

/* Whether anything waits (a cheap check for the consumer's poller). */
static inline int vn_xq_pending(struct vn_xq *q)
{
    return atomic_load_explicit(&q->head, memory_order_relaxed) != 0;
}

/* The consumer: everything pushed so far, oldest first (NULL when empty). */
static inline struct vn_xq_node *vn_xq_take(struct vn_xq *q)
{
    if (!vn_xq_pending(q)) return 0;
    if (q->own_fd) {
        /* Reset the fd before taking: a push after this read finds the queue empty
         * again (once taken) and signals anew, so no wake-up is lost. */
        uint64_t v;
        if (read(q->fd, &v, sizeof(v)) < 0) { /* EAGAIN: nothing signalled */ }
    }
    struct vn_xq_node *n = atomic_exchange_explicit(&q->head, (struct vn_xq_node *)0, memory_order_acquire);
    struct vn_xq_node *fifo = 0;
    while (n) {
        struct vn_xq_node *next = n->next;
        n->next = fifo;
        fifo = n;
        n = next;
    }
    return fifo;
}

/* ------------------------------------------------------------------ */
/* virtqueue requests: what the core hands a device type             */
/* ------------------------------------------------------------------ */

/* Why a request could not be mapped; the device answers it with an error. */
enum vn_req_error {
    VN_REQ_OK = 0,
    VN_REQ_EFAULT = 1,          /* a descriptor lies outside guest memory */
    VN_REQ_E2BIG = 2,           /* more than VN_MAX_IOV segments */
};

typedef struct vn_req vn_req;

/*
 * One descriptor chain popped from a virtqueue, already translated to host
 * addresses and bounds-checked.  iov[0 .. n_out) are device-readable (driver ->
 * device), iov[n_out .. n_out + n_in) device-writable.  The device must call
 * `complete(req, written)` exactly once, on the reactor thread, with the number of
 * bytes it wrote into the writable part.  iov[] is the core's and stays as it
 * was handed over (the core logs the writable part as dirty during live
 * migration): a device slices it into its own arrays, never rewrites it.
 *
 * When `error` is set the chain could not be mapped whole: n_out is 0 and iov
 * holds only the chain's last descriptor (n_in > 0) if that one is
 * device-writable and inside guest memory, so that the device can still write an
 * error status there; otherwise n_in is 0 too and nothing may be written.
 */
struct vn_req {
    void (*complete)(vn_req *req, uint32_t written);
    void *dev_ctx;              /* the device's context pointer */
    uint16_t queue_index;       /* virtqueue this request came from */
    uint16_t head;              /* descriptor head id (opaque to devices) */
    uint32_t error;             /* enum vn_req_error; see above for iov when set */
    uint32_t n_out, n_in;
    uint64_t out_len, in_len;   /* total bytes of each part */
    struct iovec iov[VN_MAX_IOV];
    void *core_priv;            /* owned by the core */
    /* Scratch space for the device type (its request state, bdev_io, iovecs). */
    uint8_t dev_priv[VN_DEV_PRIV_SIZE] __attribute__((aligned(16)));
};

/*
 * A device type's table: what is truly the device's.  Bdev channels, their
 * polling and fds, I/O in flight and statistics are the core's (descriptors).
 */
struct vn_device_ops {
    uint32_t abi_version;
    /* Required: a request from one of the device's virtqueues. */
    void (*submit)(void *dev_ctx, vn_req *req);
    /* Optional: the device's own deferred work (SCSI task management functions
     * waiting for commands, commands resumed in a later iteration), run once per
     * reactor iteration after the bdev channels were polled.  Returns the work
     * done: non-zero keeps an interrupt-mode reactor from sleeping. */
    int (*poll)(void *dev_ctx);
};

/* Helpers for devices: copy between flat buffers and iovec ranges. */
static inline uint64_t vn_iov_copy_from(const struct iovec *iov, uint32_t cnt,
                                        uint64_t skip, void *dst, uint64_t len)
{
    uint64_t done = 0;
    for (uint32_t i = 0; i < cnt && done < len; i++) {
        uint64_t l = iov[i].iov_len;
        if (skip >= l) { skip -= l; continue; }
        uint64_t n = l - skip;
        if (n > len - done) n = len - done;
        __builtin_memcpy((uint8_t *)dst + done, (uint8_t *)iov[i].iov_base + skip, n);
        done += n;
        skip = 0;
    }
    return done;
}

static inline uint64_t vn_iov_copy_to(const struct iovec *iov, uint32_t cnt,
                                      uint64_t skip, const void *src, uint64_t len)
{
    uint64_t done = 0;
    for (uint32_t i = 0; i < cnt && done < len; i++) {
        uint64_t l = iov[i].iov_len;
        if (skip >= l) { skip -= l; continue; }
        uint64_t n = l - skip;
        if (n > len - done) n = len - done;
        __builtin_memcpy((uint8_t *)iov[i].iov_base + skip, (const uint8_t *)src + done, n);
        done += n;
        skip = 0;
    }
    return done;
}

/*
 * Describe bytes [skip, skip+len) of `src` as a new iovec array in `dst` (at most
 * `max` entries).  Returns the entry count, or -1 if it does not fit.
 */
static inline int vn_iov_slice(const struct iovec *src, uint32_t cnt, uint64_t skip,
                               uint64_t len, struct iovec *dst, int max)
{
    int n = 0;
    for (uint32_t i = 0; i < cnt && len > 0; i++) {
        uint64_t l = src[i].iov_len;
        if (skip >= l) { skip -= l; continue; }
        if (n >= max) return -1;
        uint64_t take = l - skip;
        if (take > len) take = len;
        dst[n].iov_base = (uint8_t *)src[i].iov_base + skip;
        dst[n].iov_len = take;
        n++;
        len -= take;
        skip = 0;
    }
    return len == 0 ? n : -1;
}

#endif
