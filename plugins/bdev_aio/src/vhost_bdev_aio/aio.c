/*
 * Files and block devices as bdevs, asynchronously, from the reactor.
 *
 * Each channel (one per device per reactor) owns a kernel submission context:
 * a Linux AIO context (io_submit; completions read straight from the AIO ring
 * in user space, as fio and SPDK do) or an io_uring.  Both signal one eventfd
 * per channel (IOCB_FLAG_RESFD / IORING_REGISTER_EVENTFD), which channel_fd
 * hands to the reactor for interrupt mode.
 *
 * Each request goes to the kernel the moment the device hands it over, one
 * io_submit (or io_uring_enter) per request, as fio, SPDK's bdev_aio and
 * qemu-storage-daemon do.  Holding a burst back to submit it in one call saves
 * system calls but costs the disk: the kernel plugs a multi-iocb io_submit and
 * the device sees the burst only when its last request is built.  Measured on
 * a virtio disk at 4 KiB randread QD32 (bench/bench_aio.py): bursts of up to 64
 * gave 92k IOPS, bursts of 4 99k, one at a time 108k (qsd: 99k); io_uring 92k
 * against 101k.  Only requests that do not fit the kernel queue (depth reached,
 * EAGAIN) wait in the channel's FIFO; they go out, in order, from channel_poll.
 *
 * What AIO cannot do asynchronously (fallocate, BLKDISCARD, and fdatasync on
 * kernels without IOCB_CMD_FDSYNC) runs on a helper thread the channel starts
 * on first use; it completes through the same eventfd.  No request is ever
 * acknowledged before the kernel finished it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "vhost_core/vhost_native.h"
#include "aio_bdev.h"

#define CHAN_DEPTH 256
#define SUBMIT_BATCH 64
#define ZERO_BUF_SIZE (1u << 20)
#define ZERO_IOVS 64
#define BOUNCE_CLASSES 9                /* 4 KiB .. 1 MiB, cached per channel */
#define BOUNCE_CACHE_MAX 16
#define BOUNCE_CACHE_BYTES (8u << 20)
#define AIO_RING_MAGIC 0xa10a10a1u

enum aio_op { OP_READ, OP_WRITE, OP_FSYNC, OP_PUNCH, OP_ZERO_RANGE, OP_DISCARD, OP_WZ_WRITE };

/* The kernel's AIO completion ring, mapped at the context's address. */
struct aio_ring {
    unsigned id, nr, head, tail, magic, compat_features, incompat_features, header_length;
    struct io_event io_events[];
};

struct aio_bdev {
    vn_bdev bdev;               /* first: &aio_bdev == &aio_bdev.bdev */
    int fd;
    uint32_t align;
    int engine;
    uint32_t flags;
    atomic_int wz_writes;       /* fallocate(ZERO_RANGE) is unsupported here: write zeros */
    atomic_int fsync_on_helper; /* IOCB_CMD_FDSYNC is unsupported here */
    void *zero_buf;
    struct iovec zero_iov[ZERO_IOVS];
    struct aio_bdev_stats stats;   /* counters: relaxed atomics; error records: err_lock */
    atomic_flag err_lock;
};

/* Per-request state, inside vn_bdev_io.driver_ctx. */
struct aio_io {
    struct iocb iocb;
    struct aio_io *next;
    struct vn_xq_node node;     /* helper thread -> reactor */
    void *bounce;
    uint64_t bounce_off;        /* byte of the request that bounce[0] holds */
    uint64_t cur;               /* READ/WRITE: request bytes; WRITE_ZEROES: bytes of this chunk */
    uint64_t done;              /* bytes transferred so far (a short transfer is resumed) */
    uint8_t op;
    uint8_t bounce_class;
    int32_t status;             /* helper thread result */
};

_Static_assert(sizeof(struct aio_io) <= sizeof(((vn_bdev_io *)0)->driver_ctx),
               "struct aio_io must fit in vn_bdev_io.driver_ctx");
/* READ and WRITE are refused above VN_MAX_TRANSFER (aio_submit), which keeps a
 * bounce buffer that small and a request's length within an io_uring SQE's 32
 * bits and the kernel's per-call cap (MAX_RW_COUNT, 2 GiB - 4 KiB). */
_Static_assert(VN_MAX_TRANSFER <= (1u << 30), "VN_MAX_TRANSFER must stay far below MAX_RW_COUNT");

struct uring {
    int fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, sq_entries, sq_local_tail;
    unsigned *cq_head, *cq_tail, *cq_mask;
    unsigned unsubmitted;       /* SQEs the kernel has not taken yet (enter was interrupted) */
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len, sqes_len;
};

struct aio_chan {
    struct aio_bdev *b;
    int engine;
    int efd;
    aio_context_t actx;
    struct uring ring;
    unsigned depth;
    unsigned inflight;          /* in the AIO context or the ring */
    unsigned since_drain;       /* completions reaped since the eventfd was last read */
    int fd_wanted;              /* channel_fd was asked for: the reactor may sleep on efd */
    struct aio_io *q_head, *q_tail;
    unsigned queued;
    /* helper thread */
    pthread_t helper;
    int helper_running;
    unsigned helper_inflight;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct aio_io *work_head, *work_tail;
    int helper_stop;
    struct vn_xq helper_done;   /* signals efd, which the channel resets itself */
    /* bounce buffers */
    void *cache[BOUNCE_CLASSES][BOUNCE_CACHE_MAX];
    int ncache[BOUNCE_CLASSES];
    size_t cached_bytes;
};

static inline vn_bdev_io *io_of(struct aio_io *a)
{
    return (vn_bdev_io *)((char *)a - offsetof(vn_bdev_io, driver_ctx));
}

static inline void stat_add(uint64_t *p, uint64_t v)
{
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

/* ------------------------------------------------------------------ */
/* raw system calls                                                    */
/* ------------------------------------------------------------------ */

static int sys_io_setup(unsigned nr, aio_context_t *ctx)
{
    return syscall(__NR_io_setup, nr, ctx) < 0 ? -errno : 0;
}

static void sys_io_destroy(aio_context_t ctx)
{
    syscall(__NR_io_destroy, ctx);
}

static long sys_io_submit(aio_context_t ctx, long n, struct iocb **list)
{
    long rc = syscall(__NR_io_submit, ctx, n, list);
    return rc < 0 ? -errno : rc;
}

static int sys_io_getevents(aio_context_t ctx, long min, long max, struct io_event *ev)
{
    struct timespec zero = { 0, 0 };
    int rc = (int)syscall(__NR_io_getevents, ctx, min, max, ev, &zero);
    return rc < 0 ? 0 : rc;
}

static int sys_uring_setup(unsigned entries, struct io_uring_params *p)
{
    int fd = (int)syscall(__NR_io_uring_setup, entries, p);
    return fd < 0 ? -errno : fd;
}

static int sys_uring_enter(int fd, unsigned to_submit)
{
    int rc = (int)syscall(__NR_io_uring_enter, fd, to_submit, 0, 0, NULL, 0);
    return rc < 0 ? -errno : rc;
}

static int sys_uring_register(int fd, unsigned op, void *arg, unsigned n)
{
    int rc = (int)syscall(__NR_io_uring_register, fd, op, arg, n);
    return rc < 0 ? -errno : rc;
}

/* ------------------------------------------------------------------ */
/* io_uring, the minimum we need                                       */
/* ------------------------------------------------------------------ */

static void uring_teardown(struct uring *r)
{
    if (r->sqes) munmap(r->sqes, r->sqes_len);
    if (r->cq_map && r->cq_map != r->sq_map) munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map) munmap(r->sq_map, r->sq_map_len);
    if (r->fd >= 0) close(r->fd);
    memset(r, 0, sizeof(*r));
    r->fd = -1;
}

static int uring_setup(struct uring *r, unsigned entries, int efd)
{
    struct io_uring_params p;
    memset(r, 0, sizeof(*r));
    memset(&p, 0, sizeof(p));
    r->fd = sys_uring_setup(entries, &p);
    if (r->fd < 0) return r->fd;
    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_map_len > r->sq_map_len) r->sq_map_len = r->cq_map_len;
        r->cq_map_len = r->sq_map_len;
    }
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     r->fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED) { r->sq_map = NULL; goto fail; }
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->cq_map = r->sq_map;
    } else {
        r->cq_map = mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                         r->fd, IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED) { r->cq_map = NULL; goto fail; }
    }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   r->fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) { r->sqes = NULL; goto fail; }
    uint8_t *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->sq_entries = p.sq_entries;
    r->sq_local_tail = *r->sq_tail;
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    int rc = sys_uring_register(r->fd, IORING_REGISTER_EVENTFD, &efd, 1);
    if (rc < 0) { uring_teardown(r); return rc; }
    return 0;
fail:
    rc = -errno;
    uring_teardown(r);
    return rc;
}

/* ------------------------------------------------------------------ */
/* completion, bounce buffers, queues                                  */
/* ------------------------------------------------------------------ */

static void record_error(struct aio_bdev *b, vn_bdev_io *io, int status)
{
    struct aio_bdev_stats *s = &b->stats;
    stat_add(&s->errors[io->type < 6 ? io->type : 0], 1);
    /* Informational only: under contention from another reactor, skip it. */
    if (atomic_flag_test_and_set_explicit(&b->err_lock, memory_order_acquire)) return;
    if (!s->first_errno) {
        s->first_errno = status;
        s->first_type = io->type;
        s->first_offset = io->offset_blocks;
        s->first_blocks = io->num_blocks;
    }
    s->last_errno = status;
    s->last_type = io->type;
    s->last_offset = io->offset_blocks;
    s->last_blocks = io->num_blocks;
    atomic_flag_clear_explicit(&b->err_lock, memory_order_release);
}

static int bounce_get(struct aio_chan *c, struct aio_io *a, uint64_t off, uint64_t len)
{
    a->bounce_off = off;
    int k = 0;
    uint64_t sz = 4096;
    while (sz < len && k < BOUNCE_CLASSES) { sz <<= 1; k++; }
    a->bounce_class = (uint8_t)k;
    if (k < BOUNCE_CLASSES && c->ncache[k]) {
        a->bounce = c->cache[k][--c->ncache[k]];
        c->cached_bytes -= sz;
        return 0;
    }
    if (k == BOUNCE_CLASSES) sz = (len + 4095) & ~(uint64_t)4095;
    if (posix_memalign(&a->bounce, 4096, sz)) { a->bounce = NULL; return -ENOMEM; }
    return 0;
}

static void bounce_put(struct aio_chan *c, struct aio_io *a)
{
    int k = a->bounce_class;
    size_t sz = (size_t)4096 << k;
    if (k < BOUNCE_CLASSES && c->ncache[k] < BOUNCE_CACHE_MAX && c->cached_bytes + sz <= BOUNCE_CACHE_BYTES) {
        c->cache[k][c->ncache[k]++] = a->bounce;
        c->cached_bytes += sz;
    } else {
        free(a->bounce);
    }
    a->bounce = NULL;
}

static void finish(struct aio_chan *c, struct aio_io *a, int status)
{
    vn_bdev_io *io = io_of(a);
    struct aio_bdev *b = c->b;
    if (a->bounce) bounce_put(c, a);
    if (status == 0) {
        stat_add(&b->stats.ops[io->type < 6 ? io->type : 0], 1);
        if (io->type == VN_IO_READ) stat_add(&b->stats.bytes_read, io->num_blocks * b->bdev.block_size);
        else if (io->type == VN_IO_WRITE) stat_add(&b->stats.bytes_written, io->num_blocks * b->bdev.block_size);
    } else {
        record_error(b, io, status);
    }
    io->cb(io, status);
}

static void enqueue(struct aio_chan *c, struct aio_io *a)
{
    a->next = NULL;
    if (c->q_tail) c->q_tail->next = a;
    else c->q_head = a;
    c->q_tail = a;
    c->queued++;
}

static void enqueue_front(struct aio_chan *c, struct aio_io *a)
{
    a->next = c->q_head;
    c->q_head = a;
    if (!c->q_tail) c->q_tail = a;
    c->queued++;
}

static struct aio_io *dequeue(struct aio_chan *c)
{
    struct aio_io *a = c->q_head;
    if (!a) return NULL;
    c->q_head = a->next;
    if (!c->q_head) c->q_tail = NULL;
    c->queued--;
    return a;
}

/* ------------------------------------------------------------------ */
/* the helper thread                                                   */
/* ------------------------------------------------------------------ */

static int helper_run(struct aio_bdev *b, struct aio_io *a)
{
    vn_bdev_io *io = io_of(a);
    off_t off = (off_t)(io->offset_blocks * b->bdev.block_size);
    off_t len = (off_t)(io->num_blocks * b->bdev.block_size);
    int rc;
    do {
        switch (a->op) {
        case OP_FSYNC:
            rc = fdatasync(b->fd);
            break;
        case OP_PUNCH:
            rc = fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
            break;
        case OP_ZERO_RANGE:
            rc = fallocate(b->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, len);
            break;
        case OP_DISCARD: {
            uint64_t range[2] = { (uint64_t)off, (uint64_t)len };
            rc = ioctl(b->fd, BLKDISCARD, range);
            break;
        }
        default:
            errno = EINVAL;
            rc = -1;
        }
    } while (rc < 0 && errno == EINTR);
    return rc < 0 ? -errno : 0;
}

static void *helper_main(void *p)
{
    struct aio_chan *c = p;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    pthread_mutex_lock(&c->lock);
    for (;;) {
        while (!c->work_head && !c->helper_stop) pthread_cond_wait(&c->cond, &c->lock);
        struct aio_io *a = c->work_head;
        if (!a) break;
        c->work_head = a->next;
        if (!c->work_head) c->work_tail = NULL;
        pthread_mutex_unlock(&c->lock);
        a->status = helper_run(c->b, a);
        vn_xq_push(&c->helper_done, &a->node);
        pthread_mutex_lock(&c->lock);
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

static int helper_start(struct aio_chan *c)
{
    pthread_attr_t attr;
    cpu_set_t cpus;
    pthread_attr_init(&attr);
    /* Not pinned to the reactor's core, which may be busy polling: the process's
     * own affinity (the main thread's) instead. */
    if (sched_getaffinity(getpid(), sizeof(cpus), &cpus) == 0)
        pthread_attr_setaffinity_np(&attr, sizeof(cpus), &cpus);
    int rc = pthread_create(&c->helper, &attr, helper_main, c);
    pthread_attr_destroy(&attr);
    if (rc) return -rc;
    pthread_setname_np(c->helper, "aio_helper");
    c->helper_running = 1;
    return 0;
}

static void helper_push(struct aio_chan *c, struct aio_io *a)
{
    if (!c->helper_running) {
        int rc = helper_start(c);
        if (rc) { finish(c, a, rc); return; }
    }
    stat_add(&c->b->stats.helper_ops, 1);
    c->helper_inflight++;
    a->next = NULL;
    pthread_mutex_lock(&c->lock);
    if (c->work_tail) c->work_tail->next = a;
    else c->work_head = a;
    c->work_tail = a;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

static void helper_stop(struct aio_chan *c)
{
    if (!c->helper_running) return;
    pthread_mutex_lock(&c->lock);
    c->helper_stop = 1;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
    pthread_join(c->helper, NULL);
    c->helper_running = 0;
}

/* ------------------------------------------------------------------ */
/* operations                                                          */
/* ------------------------------------------------------------------ */

static int needs_helper(struct aio_chan *c, const struct aio_io *a)
{
    switch (a->op) {
    case OP_DISCARD:
        return 1;
    case OP_PUNCH:
    case OP_ZERO_RANGE:
        return c->engine == AIO_ENGINE_AIO;
    case OP_FSYNC:
        return c->engine == AIO_ENGINE_AIO && atomic_load_explicit(&c->b->fsync_on_helper, memory_order_relaxed);
    default:
        return 0;
    }
}

static void flush_queue(struct aio_chan *c);

static void dispatch(struct aio_chan *c, struct aio_io *a)
{
    if (needs_helper(c, a)) {
        helper_push(c, a);
        return;
    }
    if (c->inflight + c->queued >= c->depth) stat_add(&c->b->stats.queued_full, 1);
    enqueue(c, a);
    /* Now, not at the end of the burst: see the head of this file. */
    flush_queue(c);
}

/* Byte range of the next zero-writing chunk: up to ZERO_IOVS MiB from the shared zero buffer. */
static void wz_chunk(struct aio_bdev *b, struct aio_io *a, uint64_t *off, int *iovcnt)
{
    vn_bdev_io *io = io_of(a);
    uint64_t len = io->num_blocks * b->bdev.block_size;
    uint64_t left = len - a->done;
    *off = io->offset_blocks * b->bdev.block_size + a->done;
    if (left >= ZERO_BUF_SIZE) {
        uint64_t k = left / ZERO_BUF_SIZE;
        if (k > ZERO_IOVS) k = ZERO_IOVS;
        a->cur = k * ZERO_BUF_SIZE;
        *iovcnt = (int)k;
    } else {
        a->cur = left;
        *iovcnt = 0;            /* plain write from zero_buf */
    }
}

/* A kernel operation (or a helper one) finished with `res`. */
static void op_done(struct aio_chan *c, struct aio_io *a, int64_t res)
{
    struct aio_bdev *b = c->b;
    vn_bdev_io *io = io_of(a);
    switch (a->op) {
    case OP_READ:
    case OP_WRITE:
        /* Nothing moved: past the end of a file that shrank, or a device gone bad. */
        if (res <= 0) { finish(c, a, res < 0 ? (int)res : -EIO); return; }
        a->done += (uint64_t)res;
        if (a->done < a->cur) {
            /* A short transfer: resume with the rest, so that a real error (ENOSPC,
             * EIO, end of file) is reported as such.  The rest goes through a bounce
             * buffer: the guest's iovec is not ours to trim. */
            if (!a->bounce) {
                if (bounce_get(c, a, a->done, a->cur - a->done)) { finish(c, a, -ENOMEM); return; }
                if (a->op == OP_WRITE)
                    vn_iov_copy_from(io->iov, io->iovcnt, a->done, a->bounce, a->cur - a->done);
            }
            enqueue_front(c, a);
            return;
        }
        if (a->bounce && a->op == OP_READ)
            vn_iov_copy_to(io->iov, io->iovcnt, a->bounce_off, a->bounce, a->cur - a->bounce_off);
        finish(c, a, 0);
        return;
    case OP_WZ_WRITE:
        if (res <= 0) { finish(c, a, res < 0 ? (int)res : -EIO); return; }
        a->done += (uint64_t)res;
        if (a->done < io->num_blocks * b->bdev.block_size) { enqueue_front(c, a); return; }
        finish(c, a, 0);
        return;
    case OP_ZERO_RANGE:
        if (res == -EOPNOTSUPP) {
            atomic_store(&b->wz_writes, 1);
            a->op = OP_WZ_WRITE;
            a->done = 0;
            enqueue_front(c, a);
            return;
        }
        finish(c, a, res < 0 ? (int)res : 0);
        return;
    default:
        finish(c, a, res < 0 ? (int)res : 0);
        return;
    }
}

/* ---- Linux AIO ---- */

static void kaio_prep(struct aio_chan *c, struct aio_io *a)
{
    struct aio_bdev *b = c->b;
    vn_bdev_io *io = io_of(a);
    struct iocb *cb = &a->iocb;
    memset(cb, 0, sizeof(*cb));
    cb->aio_data = (uint64_t)(uintptr_t)a;
    cb->aio_fildes = (uint32_t)b->fd;
    if (c->fd_wanted) {
        /* A polling reactor never sleeps on the eventfd: spare it the signal. */
        cb->aio_flags = IOCB_FLAG_RESFD;
        cb->aio_resfd = (uint32_t)c->efd;
    }
    switch (a->op) {
    case OP_READ:
    case OP_WRITE:
        cb->aio_offset = (int64_t)(io->offset_blocks * b->bdev.block_size + a->done);
        if (a->bounce) {
            cb->aio_lio_opcode = a->op == OP_READ ? IOCB_CMD_PREAD : IOCB_CMD_PWRITE;
            cb->aio_buf = (uint64_t)(uintptr_t)((uint8_t *)a->bounce + (a->done - a->bounce_off));
            cb->aio_nbytes = a->cur - a->done;
        } else {
            cb->aio_lio_opcode = a->op == OP_READ ? IOCB_CMD_PREADV : IOCB_CMD_PWRITEV;
            cb->aio_buf = (uint64_t)(uintptr_t)io->iov;
            cb->aio_nbytes = io->iovcnt;
        }
        break;
    case OP_FSYNC:
        cb->aio_lio_opcode = IOCB_CMD_FDSYNC;
        break;
    case OP_WZ_WRITE: {
        uint64_t off;
        int n;
        wz_chunk(b, a, &off, &n);
        cb->aio_offset = (int64_t)off;
        if (n) {
            cb->aio_lio_opcode = IOCB_CMD_PWRITEV;
            cb->aio_buf = (uint64_t)(uintptr_t)b->zero_iov;
            cb->aio_nbytes = (uint64_t)n;
        } else {
            cb->aio_lio_opcode = IOCB_CMD_PWRITE;
            cb->aio_buf = (uint64_t)(uintptr_t)b->zero_buf;
            cb->aio_nbytes = a->cur;
        }
        break;
    }
    default:
        break;
    }
}

/* Submit what fits; returns how many requests left the queue. */
static int kaio_flush(struct aio_chan *c)
{
    struct iocb *list[SUBMIT_BATCH];
    int n = 0;
    for (struct aio_io *a = c->q_head; a && n < SUBMIT_BATCH && c->inflight + n < c->depth; a = a->next) {
        kaio_prep(c, a);
        list[n++] = &a->iocb;
    }
    if (!n) return 0;
    long rc = sys_io_submit(c->actx, n, list);
    if (rc > 0) {
        for (long i = 0; i < rc; i++) dequeue(c);
        c->inflight += (unsigned)rc;
        if (rc < n) stat_add(&c->b->stats.queued_full, 1);
        return rc < n ? 0 : (int)rc;
    }
    if (rc == 0 || rc == -EAGAIN) {
        stat_add(&c->b->stats.queued_full, 1);
        return 0;
    }
    /* The first iocb was refused outright. */
    struct aio_io *a = dequeue(c);
    if (a->op == OP_FSYNC && rc == -EINVAL) {
        atomic_store(&c->b->fsync_on_helper, 1);
        helper_push(c, a);
    } else {
        op_done(c, a, rc);
    }
    return 1;
}

static int kaio_reap(struct aio_chan *c)
{
    struct io_event ev[SUBMIT_BATCH];
    int n = 0;
    struct aio_ring *ring = (struct aio_ring *)(uintptr_t)c->actx;
    if (ring->magic == AIO_RING_MAGIC && ring->incompat_features == 0) {
        unsigned head = ring->head, nr = ring->nr;
        unsigned tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
        while (head != tail && n < SUBMIT_BATCH) {
            ev[n++] = ring->io_events[head];
            head = head + 1 == nr ? 0 : head + 1;
        }
        if (n) __atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
    } else {
        n = sys_io_getevents(c->actx, 0, SUBMIT_BATCH, ev);
    }
    for (int i = 0; i < n; i++) {
        c->inflight--;
        op_done(c, (struct aio_io *)(uintptr_t)ev[i].data, (int64_t)ev[i].res);
    }
    return n;
}

/* ---- io_uring ---- */

static void uring_prep(struct aio_chan *c, struct aio_io *a, struct io_uring_sqe *sqe)
{
    struct aio_bdev *b = c->b;
    vn_bdev_io *io = io_of(a);
    uint64_t off = io->offset_blocks * b->bdev.block_size;
    memset(sqe, 0, sizeof(*sqe));
    sqe->fd = b->fd;
    sqe->user_data = (uint64_t)(uintptr_t)a;
    switch (a->op) {
    case OP_READ:
    case OP_WRITE:
        sqe->off = off + a->done;
        if (a->bounce) {
            sqe->opcode = a->op == OP_READ ? IORING_OP_READ : IORING_OP_WRITE;
            sqe->addr = (uint64_t)(uintptr_t)((uint8_t *)a->bounce + (a->done - a->bounce_off));
            sqe->len = (uint32_t)(a->cur - a->done);
        } else {
            sqe->opcode = a->op == OP_READ ? IORING_OP_READV : IORING_OP_WRITEV;
            sqe->addr = (uint64_t)(uintptr_t)io->iov;
            sqe->len = io->iovcnt;
        }
        break;
    case OP_FSYNC:
        sqe->opcode = IORING_OP_FSYNC;
        sqe->fsync_flags = IORING_FSYNC_DATASYNC;
        break;
    case OP_PUNCH:
    case OP_ZERO_RANGE:
        sqe->opcode = IORING_OP_FALLOCATE;
        sqe->off = off;
        sqe->addr = io->num_blocks * b->bdev.block_size;
        sqe->len = a->op == OP_PUNCH ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                                     : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
        break;
    case OP_WZ_WRITE: {
        int n;
        wz_chunk(b, a, &off, &n);
        sqe->off = off;
        if (n) {
            sqe->opcode = IORING_OP_WRITEV;
            sqe->addr = (uint64_t)(uintptr_t)b->zero_iov;
            sqe->len = (uint32_t)n;
        } else {
            sqe->opcode = IORING_OP_WRITE;
            sqe->addr = (uint64_t)(uintptr_t)b->zero_buf;
            sqe->len = (uint32_t)a->cur;
        }
        break;
    }
    default:
        sqe->opcode = IORING_OP_NOP;
        break;
    }
}

static void uring_flush(struct aio_chan *c)
{
    struct uring *r = &c->ring;
    while (c->q_head && c->inflight < c->depth) {
        unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
        if (r->sq_local_tail - head >= r->sq_entries) break;
        struct aio_io *a = dequeue(c);
        unsigned idx = r->sq_local_tail & *r->sq_mask;
        uring_prep(c, a, &r->sqes[idx]);
        r->sq_array[idx] = idx;
        r->sq_local_tail++;
        c->inflight++;
    }
    __atomic_store_n(r->sq_tail, r->sq_local_tail, __ATOMIC_RELEASE);
    unsigned pending = r->sq_local_tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    r->unsubmitted = 0;
    if (pending) {
        int rc = sys_uring_enter(r->fd, pending);
        if (rc < 0 || (unsigned)rc < pending) {
            /* EAGAIN/EBUSY/EINTR: the rest stays in the ring for the next poll. */
            r->unsubmitted = pending - (rc > 0 ? (unsigned)rc : 0);
            stat_add(&c->b->stats.queued_full, 1);
        }
    }
}

static int uring_reap(struct aio_chan *c)
{
    struct uring *r = &c->ring;
    unsigned head = *r->cq_head;
    unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    int n = 0;
    struct { struct aio_io *a; int32_t res; } done[SUBMIT_BATCH];
    while (head != tail && n < SUBMIT_BATCH) {
        struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
        done[n].a = (struct aio_io *)(uintptr_t)cqe->user_data;
        done[n].res = cqe->res;
        n++;
        head++;
    }
    if (n) __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    for (int i = 0; i < n; i++) {
        c->inflight--;
        op_done(c, done[i].a, done[i].res);
    }
    return n;
}

/* ---- both ---- */

static void flush_queue(struct aio_chan *c)
{
    if (c->engine == AIO_ENGINE_URING) {
        uring_flush(c);
        return;
    }
    while (c->q_head && c->inflight < c->depth)
        if (kaio_flush(c) <= 0) break;
}

static int reap_helper(struct aio_chan *c)
{
    struct vn_xq_node *node = vn_xq_take(&c->helper_done);
    int n = 0;
    while (node) {
        struct aio_io *a = (struct aio_io *)((char *)node - offsetof(struct aio_io, node));
        node = node->next;
        c->helper_inflight--;
        n++;
        op_done(c, a, a->status);
    }
    return n;
}

static int reap(struct aio_chan *c)
{
    int n = 0;
    if (c->inflight) n += c->engine == AIO_ENGINE_URING ? uring_reap(c) : kaio_reap(c);
    if (c->helper_inflight) n += reap_helper(c);
    return n;
}

/* ------------------------------------------------------------------ */
/* the vn_bdev_ops table                                               */
/* ------------------------------------------------------------------ */

/* The segments' addresses and lengths ORed together (for the alignment check);
 * their total length in *len. */
static uintptr_t iov_scan(const struct iovec *iov, uint32_t cnt, uint64_t *len)
{
    uintptr_t acc = 0;
    uint64_t n = 0;
    for (uint32_t i = 0; i < cnt; i++) {
        acc |= (uintptr_t)iov[i].iov_base | iov[i].iov_len;
        n += iov[i].iov_len;
    }
    *len = n;
    return acc;
}

static void aio_submit(void *ctx, void *chan, vn_bdev_io *io)
{
    struct aio_bdev *b = ctx;
    struct aio_chan *c = chan;
    struct aio_io *a = (struct aio_io *)io->driver_ctx;
    uint64_t nb = __atomic_load_n(&b->bdev.num_blocks, __ATOMIC_RELAXED);
    uint64_t bs = b->bdev.block_size;

    a->bounce = NULL;
    a->bounce_off = 0;
    a->done = 0;
    a->status = 0;
    a->next = NULL;
    a->op = OP_READ;
    if (!c) { io->cb(io, -ENODEV); return; }
    if (io->type >= VN_IO_TYPE_COUNT || !((b->bdev.io_types >> io->type) & 1)) {
        finish(c, a, -ENOTSUP);
        return;
    }
    if (io->type != VN_IO_FLUSH &&
        (io->offset_blocks > nb || io->num_blocks > nb - io->offset_blocks || io->num_blocks == 0)) {
        finish(c, a, -EINVAL);
        return;
    }
    switch (io->type) {
    case VN_IO_READ:
    case VN_IO_WRITE: {
        a->op = io->type == VN_IO_READ ? OP_READ : OP_WRITE;
        a->cur = io->num_blocks * bs;
        /* Above the limit no device advertises, a bounce buffer (the whole request
         * when misaligned, the rest after a short transfer) would be as large as
         * the guest liked.  Segments that do not add up to the blocks would have
         * the kernel move more (past the range checked above) or fewer bytes. */
        uint64_t len;
        uintptr_t acc = iov_scan(io->iov, io->iovcnt, &len);
        if (a->cur > VN_MAX_TRANSFER || len != a->cur) {
            finish(c, a, a->cur > VN_MAX_TRANSFER ? -E2BIG : -EINVAL);
            return;
        }
        if ((b->flags & AIO_F_DIRECT) && (acc & (b->align - 1))) {
            if (bounce_get(c, a, 0, a->cur)) { finish(c, a, -ENOMEM); return; }
            if (a->op == OP_WRITE) vn_iov_copy_from(io->iov, io->iovcnt, 0, a->bounce, a->cur);
            stat_add(&b->stats.bounced, 1);
        }
        break;
    }
    case VN_IO_FLUSH:
        a->op = OP_FSYNC;
        break;
    case VN_IO_UNMAP:
        a->op = (b->flags & AIO_F_UNMAP_DISCARD) ? OP_DISCARD : OP_PUNCH;
        break;
    case VN_IO_WRITE_ZEROES:
        a->op = (b->flags & AIO_F_ZERO_RANGE) && !atomic_load_explicit(&b->wz_writes, memory_order_relaxed)
                ? OP_ZERO_RANGE : OP_WZ_WRITE;
        break;
    default:
        finish(c, a, -ENOTSUP);
        return;
    }
    dispatch(c, a);
}

static void *aio_chan_create(void *ctx)
{
    struct aio_bdev *b = ctx;
    struct aio_chan *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    c->b = b;
    c->ring.fd = -1;
    c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->efd < 0) { free(c); return NULL; }
    vn_xq_init(&c->helper_done, c->efd);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    c->engine = AIO_ENGINE_AIO;
    c->depth = CHAN_DEPTH;
    if (b->engine == AIO_ENGINE_URING) {
        if (uring_setup(&c->ring, CHAN_DEPTH, c->efd) == 0) {
            c->engine = AIO_ENGINE_URING;
            if (c->ring.sq_entries < c->depth) c->depth = c->ring.sq_entries;
        } else {
            stat_add(&b->stats.uring_fallbacks, 1);
        }
    }
    if (c->engine == AIO_ENGINE_AIO) {
        /* aio-max-nr is system-wide: settle for a shallower context if need be. */
        int rc = -EAGAIN;
        for (unsigned d = CHAN_DEPTH; d >= 16 && rc; d /= 2) {
            c->actx = 0;
            rc = sys_io_setup(d, &c->actx);
            if (!rc) c->depth = d;
        }
        if (rc) {
            close(c->efd);
            pthread_mutex_destroy(&c->lock);
            pthread_cond_destroy(&c->cond);
            free(c);
            return NULL;
        }
    }
    return c;
}

static void aio_chan_destroy(void *ctx, void *chan)
{
    struct aio_chan *c = chan;
    (void)ctx;
    if (!c) return;
    helper_stop(c);
    vn_xq_destroy(&c->helper_done);
    if (c->engine == AIO_ENGINE_URING) uring_teardown(&c->ring);
    else sys_io_destroy(c->actx);
    close(c->efd);
    for (int k = 0; k < BOUNCE_CLASSES; k++)
        for (int i = 0; i < c->ncache[k]; i++) free(c->cache[k][i]);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c);
}

static int aio_chan_poll(void *ctx, void *chan)
{
    struct aio_chan *c = chan;
    (void)ctx;
    if (c->q_head || c->ring.unsubmitted) flush_queue(c);
    if (!c->inflight && !c->helper_inflight && !c->since_drain) return 0;
    int n = reap(c);
    if (n == 0 && c->since_drain && c->fd_wanted) {
        /* Everything signalled so far was reaped: reset the eventfd, then look
         * again for what completed in between (it is signalled after it is
         * visible, so nothing is lost). */
        uint64_t v;
        if (read(c->efd, &v, sizeof(v)) < 0) { /* EAGAIN: already zero */ }
        c->since_drain = 0;
        n = reap(c);
    }
    if (c->fd_wanted) c->since_drain += (unsigned)n;
    if (n && (c->q_head || c->ring.unsubmitted)) flush_queue(c);
    return n;
}

static int aio_chan_fd(void *ctx, void *chan)
{
    struct aio_chan *c = chan;
    (void)ctx;
    if (!c) return -1;
    /* Asked for by an interrupt-mode reactor before it first sleeps; with I/O in flight
     * it sleeps at most 1 ms anyway, so I/O submitted before this call is not lost. */
    c->fd_wanted = 1;
    return c->efd;
}

static const struct vn_bdev_ops aio_ops = {
    .abi_version = VN_ABI_VERSION,
    .submit = aio_submit,
    .channel_create = aio_chan_create,
    .channel_destroy = aio_chan_destroy,
    .channel_poll = aio_chan_poll,
    .channel_fd = aio_chan_fd,
};

/* ------------------------------------------------------------------ */
/* control plane                                                       */
/* ------------------------------------------------------------------ */

void *aio_bdev_new(int fd, uint32_t block_size, uint64_t num_blocks, uint32_t align,
                   int engine, uint32_t flags)
{
    struct aio_bdev *b = calloc(1, sizeof(*b));
    if (!b) return NULL;
    if (!(flags & AIO_F_READONLY)) {
        if (posix_memalign(&b->zero_buf, 4096, ZERO_BUF_SIZE)) { free(b); return NULL; }
        memset(b->zero_buf, 0, ZERO_BUF_SIZE);
        for (int i = 0; i < ZERO_IOVS; i++) {
            b->zero_iov[i].iov_base = b->zero_buf;
            b->zero_iov[i].iov_len = ZERO_BUF_SIZE;
        }
    }
    b->fd = fd;
    b->align = align < 1 ? 1 : align;
    b->engine = engine;
    b->flags = flags;
    atomic_init(&b->fsync_on_helper, (flags & AIO_F_FSYNC_ON_HELPER) ? 1 : 0);
    atomic_flag_clear(&b->err_lock);
    b->bdev.ops = &aio_ops;
    b->bdev.ctx = b;
    b->bdev.block_size = block_size;
    b->bdev.num_blocks = num_blocks;
    b->bdev.io_types = (1u << VN_IO_READ) | (1u << VN_IO_FLUSH);
    if (!(flags & AIO_F_READONLY)) {
        b->bdev.io_types |= 1u << VN_IO_WRITE;
        if (flags & (AIO_F_UNMAP_PUNCH | AIO_F_UNMAP_DISCARD)) b->bdev.io_types |= 1u << VN_IO_UNMAP;
        if (flags & AIO_F_WRITE_ZEROES) b->bdev.io_types |= 1u << VN_IO_WRITE_ZEROES;
    }
    return b;
}

void aio_bdev_free(void *p)
{
    struct aio_bdev *b = p;
    if (!b) return;
    if (b->fd >= 0) close(b->fd);
    free(b->zero_buf);
    free(b);
}

void aio_bdev_get_stats(void *p, struct aio_bdev_stats *out)
{
    struct aio_bdev *b = p;
    const uint64_t *src = (const uint64_t *)&b->stats;
    uint64_t *dst = (uint64_t *)out;
    size_t ncounters = offsetof(struct aio_bdev_stats, first_errno) / sizeof(uint64_t);
    for (size_t i = 0; i < ncounters; i++) dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    while (atomic_flag_test_and_set_explicit(&b->err_lock, memory_order_acquire)) sched_yield();
    out->first_errno = b->stats.first_errno;
    out->first_type = b->stats.first_type;
    out->first_offset = b->stats.first_offset;
    out->first_blocks = b->stats.first_blocks;
    out->last_errno = b->stats.last_errno;
    out->last_type = b->stats.last_type;
    out->last_offset = b->stats.last_offset;
    out->last_blocks = b->stats.last_blocks;
    atomic_flag_clear_explicit(&b->err_lock, memory_order_release);
}

int aio_probe_kaio(void)
{
    aio_context_t ctx = 0;
    int rc = sys_io_setup(1, &ctx);
    if (rc == 0) sys_io_destroy(ctx);
    return rc;
}

int aio_probe_uring(void)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    int fd = sys_uring_setup(4, &p);
    if (fd < 0) return fd;
    size_t sz = sizeof(struct io_uring_probe) + 256 * sizeof(struct io_uring_probe_op);
    struct io_uring_probe *pr = calloc(1, sz);
    int rc = pr ? sys_uring_register(fd, IORING_REGISTER_PROBE, pr, 256) : -ENOMEM;
    if (rc >= 0) {
        static const uint8_t need[] = { IORING_OP_READV, IORING_OP_WRITEV, IORING_OP_READ, IORING_OP_WRITE,
                                        IORING_OP_FSYNC, IORING_OP_FALLOCATE };
        rc = 0;
        for (size_t i = 0; i < sizeof(need); i++)
            if (need[i] > pr->last_op || !(pr->ops[need[i]].flags & IO_URING_OP_SUPPORTED)) rc = -EOPNOTSUPP;
    }
    free(pr);
    close(fd);
    return rc;
}

int aio_probe_punch(int fd, uint64_t offset, uint64_t len)
{
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len) < 0 ? -errno : 0;
}

int aio_dio_align(int fd, uint32_t *mem_align, uint32_t *offset_align)
{
#ifdef STATX_DIOALIGN
    struct statx stx;
    memset(&stx, 0, sizeof(stx));
    if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0) return -errno;
    if (!(stx.stx_mask & STATX_DIOALIGN)) return -EOPNOTSUPP;
    *mem_align = stx.stx_dio_mem_align;
    *offset_align = stx.stx_dio_offset_align;
    return 0;
#else
    (void)fd; (void)mem_align; (void)offset_align;
    return -EOPNOTSUPP;
#endif
}
