/*
 * The data path: guest memory translation, split and packed virtqueues, reactors.
 *
 * Everything a guest or frontend controls (ring indices, descriptor addresses,
 * lengths, flags, `next` links) is read once into a local and checked before use:
 * the guest can change shared memory under us at any time.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <poll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vhost_core/vhost_native.h"
#include "core.h"

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1
/* Packed virtqueues (virtio 1.1, 2.8): descriptor flags and event suppression. */
#define VRING_PACKED_DESC_F_AVAIL (1u << 7)
#define VRING_PACKED_DESC_F_USED (1u << 15)
#define VRING_PACKED_EVENT_F_ENABLE 0
#define VRING_PACKED_EVENT_F_DISABLE 1
#define VRING_PACKED_EVENT_F_DESC 2

/* Requests in flight per queue are capped: a 32768-entry ring must not cost
 * 32768 request slots of ~9 KiB each. */
#define VQ_MAX_SLOTS 256
/* Longest descriptor chain walked (direct + indirect).  A driver sends at most
 * seg_max + 2 descriptors per request (seg_max <= VN_MAX_IOV - 2); anything far
 * longer is a hostile ring, and without a cap one 32768-entry chain plus a
 * 65536-entry indirect table costs ~1 ms per request. */
#define VQ_MAX_CHAIN (4 * VN_MAX_IOV)
/* Descriptors one queue may walk per reactor iteration before the reactor moves
 * on to the other queues (fairness between co-located devices).  A well-formed
 * 3-descriptor request costs 3: every slot fits in one pass. */
#define VQ_PASS_BUDGET 4096
/* Bytes either part (device-readable, device-writable) of one request may span. */
#define VQ_MAX_PART_BYTES ((uint64_t)VN_MAX_TRANSFER + VN_MAX_HEADER_BYTES)
#define REACTOR_MAX_DEVS 256
#define REACTOR_MAX_QUEUES 1024
#define REACTOR_MAX_DESCS 1024
/* Interrupt coalescing measures each queue's request rate over this period (SPDK's
 * SPDK_VHOST_STATS_CHECK_INTERVAL_MS). */
#define COALESCING_INTERVAL_MS 10

struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct vring_avail { uint16_t flags; uint16_t idx; uint16_t ring[]; };
struct vring_used_elem { uint32_t id; uint32_t len; };
struct vring_used { uint16_t flags; uint16_t idx; struct vring_used_elem ring[]; };
/* Packed ring: one ring of descriptors both sides write, and two event
 * suppression structures (the driver area and the device area). */
struct vring_packed_desc { uint64_t addr; uint32_t len; uint16_t id; uint16_t flags; };
struct vring_packed_event { uint16_t off_wrap; uint16_t flags; };

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* ------------------------------------------------------------------ */
/* front-end fds: operations that cannot stall a thread for long      */
/* ------------------------------------------------------------------ */

/*
 * Kick, call and error eventfds belong to the front-end, which shares their file
 * description and can clear O_NONBLOCK (or fill an eventfd's counter to the brim)
 * whenever it likes: setting O_NONBLOCK once proves nothing.  So every read or
 * write on such an fd is *guarded*: the calling thread announces it in a
 * thread-local record, and a watchdog thread that finds the same guarded call
 * still in progress one period later interrupts it with a signal whose handler
 * does nothing and is installed without SA_RESTART: the syscall fails with EINTR
 * and the caller treats the fd as hostile.  A stall therefore costs co-located
 * devices at most two watchdog periods, once.  The hot-path cost is two relaxed
 * stores and an increment per signal.
 */
#define FDGUARD_PERIOD_MS 50

struct fdguard {
    _Atomic(uint64_t) seq;      /* bumped at each guarded call */
    atomic_int busy;
    atomic_int in_use;          /* owned by a live thread (else free for the next one) */
    pthread_t thread;
    struct fdguard *next;
};

static _Atomic(struct fdguard *) fdguard_list;
static pthread_once_t fdguard_once = PTHREAD_ONCE_INIT;
static __thread struct fdguard *fdguard_self;
static pthread_key_t fdguard_key;       /* its destructor frees the record for reuse */
static int fdguard_signo;
static atomic_uint_fast64_t fdguard_interrupts;

static void fdguard_noop(int sig) { (void)sig; }

static void *fdguard_watchdog(void *arg)
{
    (void)arg;
    pthread_setname_np(pthread_self(), "vhost-fdguard");
    /* Records are only ever added, at the head, and reused: the list is as long as
     * the most threads that ever did guarded calls at once. */
    enum { MAX_SEEN = 4096 };
    static struct { struct fdguard *g; uint64_t seq; } seen[MAX_SEEN];
    int nseen = 0;
    for (;;) {
        struct timespec ts = { 0, FDGUARD_PERIOD_MS * 1000000L };
        nanosleep(&ts, NULL);
        int n = 0;
        for (struct fdguard *g = atomic_load(&fdguard_list); g && n < MAX_SEEN; g = g->next, n++) {
            uint64_t seq = atomic_load_explicit(&g->seq, memory_order_relaxed);
            int busy = atomic_load_explicit(&g->busy, memory_order_relaxed) && atomic_load(&g->in_use);
            int stuck = 0;
            for (int i = 0; i < nseen; i++)
                if (seen[i].g == g) { stuck = busy && seen[i].seq == seq; break; }
            /* Re-check right before the signal: a call that just returned must not
             * have some later, innocent syscall interrupted. */
            if (stuck && atomic_load(&g->busy) && atomic_load(&g->seq) == seq) {
                atomic_fetch_add(&fdguard_interrupts, 1);
                pthread_kill(g->thread, fdguard_signo);
            }
            seen[n].g = g;
            seen[n].seq = busy ? seq : seq - 1;   /* idle: never "unchanged" next time */
        }
        nseen = n;
    }
    return NULL;
}

static void fdguard_release(void *p)
{
    struct fdguard *g = p;
    atomic_store(&g->busy, 0);
    atomic_store(&g->in_use, 0);
}

static void fdguard_init(void)
{
    pthread_key_create(&fdguard_key, fdguard_release);
    fdguard_signo = SIGRTMIN + 4;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = fdguard_noop;     /* no SA_RESTART: the blocked syscall returns EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(fdguard_signo, &sa, NULL);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* The watchdog must not take the signal itself. */
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, fdguard_signo);
    pthread_sigmask(SIG_BLOCK, &block, &old);
    pthread_create(&t, &attr, fdguard_watchdog, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
}

/* A thread's record: a free one (its thread exited) if any, else a new one.
 * Connection threads come and go with every front-end: without reuse the list
 * would grow by one per connection. */
static struct fdguard *fdguard_get(void)
{
    struct fdguard *g = fdguard_self;
    if (__builtin_expect(g != NULL, 1)) return g;
    pthread_once(&fdguard_once, fdguard_init);
    for (g = atomic_load(&fdguard_list); g; g = g->next) {
        int free_ = 0;
        if (atomic_compare_exchange_strong(&g->in_use, &free_, 1)) break;
    }
    if (!g) {
        g = calloc(1, sizeof(*g));
        if (!g) return NULL;
        atomic_store(&g->in_use, 1);
        struct fdguard *head = atomic_load(&fdguard_list);
        do g->next = head; while (!atomic_compare_exchange_weak(&fdguard_list, &head, g));
    }
    g->thread = pthread_self();
    fdguard_self = g;
    pthread_setspecific(fdguard_key, g);
    return g;
}

static inline void fdguard_enter(struct fdguard *g)
{
    if (!g) return;
    atomic_fetch_add_explicit(&g->seq, 1, memory_order_relaxed);
    atomic_store_explicit(&g->busy, 1, memory_order_relaxed);
}

static inline void fdguard_leave(struct fdguard *g)
{
    if (g) atomic_store_explicit(&g->busy, 0, memory_order_relaxed);
}

/* Add 1 to an eventfd.  0 on success, and also when the counter is saturated
 * and the write would block (the reader has a wake-up pending anyway: nothing is
 * lost); -EINTR when the write blocked and the watchdog cut it short (the
 * front-end made its fd blocking and saturated it: hostile); else -errno. */
int vn_fd_signal(int fd)
{
    if (fd < 0) return -EBADF;
    struct fdguard *g = fdguard_get();
    uint64_t one = 1;
    fdguard_enter(g);
    ssize_t n = write(fd, &one, sizeof(one));
    int err = errno;
    fdguard_leave(g);
    if (n == sizeof(one)) return 0;
    if (n < 0 && err == EAGAIN) return 0;
    return n < 0 ? -err : -EIO;
}

/* Reset an eventfd's counter.  0 (also when there was nothing to read), -EINTR
 * when the read blocked and was cut short, else -errno. */
int vn_fd_drain(int fd)
{
    if (fd < 0) return -EBADF;
    struct fdguard *g = fdguard_get();
    uint64_t v;
    fdguard_enter(g);
    ssize_t n = read(fd, &v, sizeof(v));
    int err = errno;
    fdguard_leave(g);
    if (n == sizeof(v) || (n < 0 && err == EAGAIN)) return 0;
    return n < 0 ? -err : -EIO;
}

uint64_t vn_fd_guard_interrupts(void) { return atomic_load(&fdguard_interrupts); }

/* ------------------------------------------------------------------ */
/* guest memory                                                        */
/* ------------------------------------------------------------------ */

/*
 * SIGBUS guard.  Guest RAM is a file the front-end owns: if it shrinks the file
 * under our MAP_SHARED mapping (ftruncate of a memfd or hugetlbfs file), the next
 * access from a reactor would SIGBUS and kill the whole daemon.  Every guest
 * mapping is registered here; the handler replaces a faulting mapping with
 * private zero pages (the access is retried and succeeds) and flags its memory
 * table, and the control plane then drops that front-end.  Faults anywhere else
 * get the previous disposition (a crash, as before).
 */
#define GUARD_SLOTS 4096

struct guard_slot {
    _Atomic(uintptr_t) base;    /* 0: free */
    size_t len;
    struct vn_mem *owner;
};

static struct guard_slot guard_slots[GUARD_SLOTS];
static struct sigaction guard_old_action;
static pthread_once_t guard_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t guard_lock = PTHREAD_MUTEX_INITIALIZER;   /* (un)registration */

static void guard_sigbus(int sig, siginfo_t *si, void *uctx)
{
    (void)uctx;
    uintptr_t a = (uintptr_t)si->si_addr;
    if (si->si_code > 0) {      /* a real fault, not kill(2) */
        for (int i = 0; i < GUARD_SLOTS; i++) {
            uintptr_t base = atomic_load_explicit(&guard_slots[i].base, memory_order_acquire);
            if (!base || a - base >= guard_slots[i].len) continue;
            void *p = mmap((void *)base, guard_slots[i].len, PROT_READ | PROT_WRITE,
                           MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED) break;
            __atomic_store_n(&guard_slots[i].owner->faulted, 1, __ATOMIC_RELEASE);
            return;
        }
    }
    /* Not guest memory: the previous disposition handles the repeated fault. */
    sigaction(sig, &guard_old_action, NULL);
    if (si->si_code <= 0) raise(sig);
}

static void guard_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = guard_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &guard_old_action);
}

static int guard_register(struct vn_mem *m, void *base, size_t len)
{
    pthread_once(&guard_once, guard_install);
    pthread_mutex_lock(&guard_lock);
    for (int i = 0; i < GUARD_SLOTS; i++) {
        if (atomic_load(&guard_slots[i].base)) continue;
        guard_slots[i].len = len;
        guard_slots[i].owner = m;
        atomic_store_explicit(&guard_slots[i].base, (uintptr_t)base, memory_order_release);
        pthread_mutex_unlock(&guard_lock);
        return 0;
    }
    pthread_mutex_unlock(&guard_lock);
    return -ENOSPC;
}

static void guard_unregister(struct vn_mem *m)
{
    pthread_mutex_lock(&guard_lock);
    for (int i = 0; i < GUARD_SLOTS; i++)
        if (atomic_load(&guard_slots[i].base) && guard_slots[i].owner == m)
            atomic_store(&guard_slots[i].base, 0);
    pthread_mutex_unlock(&guard_lock);
}

int vn_mem_faulted(struct vn_mem *m)
{
    return m ? (int)__atomic_load_n(&m->faulted, __ATOMIC_ACQUIRE) : 0;
}

struct vn_mem *vn_mem_new(void)
{
    return calloc(1, sizeof(struct vn_mem));
}

#define TMPFS_MAGIC_ 0x01021994u
#define HUGETLBFS_MAGIC_ 0x958458f6u
#define EXT4_MAGIC_ 0xEF53u
#define XFS_MAGIC_ 0x58465342u
#define BTRFS_MAGIC_ 0x9123683Eu

/* What QEMU backs guest RAM with: memfd and /dev/shm (tmpfs), hugetlbfs, and
 * files on a local disk filesystem (memory-backend-file, e.g. on DAX).  Anything
 * else is refused: a FUSE or network file would stall the reactor on every page
 * fault, a device or pipe has no size to check. */
int vn_mem_fd_kind(int fd, uint64_t *page_size)
{
    struct stat st;
    struct statfs fs;
    if (fstat(fd, &st) < 0 || fstatfs(fd, &fs) < 0) return -errno;
    if (!S_ISREG(st.st_mode)) return -EBADFD;
    switch ((uint32_t)fs.f_type) {
    case HUGETLBFS_MAGIC_:
        /* Mappings, offsets and munmap lengths are in huge pages there. */
        *page_size = (uint64_t)fs.f_bsize;
        return 0;
    case TMPFS_MAGIC_: case EXT4_MAGIC_: case XFS_MAGIC_: case BTRFS_MAGIC_:
        *page_size = (uint64_t)sysconf(_SC_PAGESIZE);
        return 0;
    default:
        return -EMEDIUMTYPE;
    }
}

int vn_mem_add_region(struct vn_mem *m, int fd, uint64_t gpa, uint64_t size,
                      uint64_t uva, uint64_t mmap_offset)
{
    struct stat st;
    uint64_t page;
    if (m->nregions >= VN_MAX_REGIONS) return -E2BIG;
    if (size == 0) return -EINVAL;
    if (gpa + size < gpa || uva + size < uva || mmap_offset + size < mmap_offset)
        return -EOVERFLOW;
    int kind = vn_mem_fd_kind(fd, &page);
    if (kind < 0) return kind;
    if (fstat(fd, &st) < 0) return -errno;
    /* A mapping past the end would SIGBUS on first touch, which a hostile
     * front-end could aim at. */
    if ((uint64_t)st.st_size < mmap_offset + size) return -ERANGE;
    if (page < 4096 || (page & (page - 1))) return -EINVAL;
    /* mmap needs a page-aligned offset: map from the page boundary below, and a
     * whole number of pages, so that munmap (hugetlbfs refuses partial huge
     * pages) and the SIGBUS guard cover exactly what the kernel mapped. */
    uint64_t align = mmap_offset & (page - 1);
    uint64_t len = size + align;
    if (len < size || len + (page - 1) < len) return -EOVERFLOW;
    len = (len + page - 1) & ~(page - 1);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)(mmap_offset - align));
    if (p == MAP_FAILED) return -errno;
    if (guard_register(m, p, len) < 0) {
        munmap(p, len);
        return -ENOSPC;
    }
    struct vn_region *r = &m->regions[m->nregions++];
    r->gpa = gpa;
    r->size = size;
    r->uva = uva;
    r->mmap_offset = mmap_offset;
    r->map_base = p;
    r->map_len = len;
    r->host = (uint8_t *)p + align;
    return 0;
}

/* Move the guard slots of `from`'s mappings to `to` (all of them, or only the one
 * mapped at `base` when base is not NULL). */
static void guard_transfer(struct vn_mem *from, struct vn_mem *to, const void *base)
{
    pthread_mutex_lock(&guard_lock);
    for (int i = 0; i < GUARD_SLOTS; i++) {
        uintptr_t b = atomic_load(&guard_slots[i].base);
        if (b && guard_slots[i].owner == from && (!base || b == (uintptr_t)base))
            guard_slots[i].owner = to;
    }
    pthread_mutex_unlock(&guard_lock);
}

static int regions_overlap(const struct vn_region *r, uint64_t gpa, uint64_t size, uint64_t uva)
{
    return (gpa < r->gpa + r->size && r->gpa < gpa + size) || (uva < r->uva + r->size && r->uva < uva + size);
}

struct vn_mem *vn_mem_with_region(struct vn_mem *old, int fd, uint64_t gpa, uint64_t size,
                                  uint64_t uva, uint64_t mmap_offset, int *err)
{
    int rc = 0;
    struct vn_mem *m = NULL;
    if (old->nregions >= VN_MAX_REGIONS) { rc = -E2BIG; goto out; }
    if (gpa + size < gpa || uva + size < uva) { rc = -EOVERFLOW; goto out; }
    for (uint32_t i = 0; i < old->nregions; i++)
        if (regions_overlap(&old->regions[i], gpa, size, uva)) { rc = -EEXIST; goto out; }
    if (!(m = vn_mem_new())) { rc = -ENOMEM; goto out; }
    rc = vn_mem_add_region(m, fd, gpa, size, uva, mmap_offset);
    if (rc < 0) { vn_mem_free(m); m = NULL; goto out; }
    /* The new region is m's; put old's before it and take them over. */
    struct vn_region added = m->regions[0];
    memcpy(m->regions, old->regions, old->nregions * sizeof(old->regions[0]));
    m->regions[old->nregions] = added;
    m->nregions = old->nregions + 1;
    guard_transfer(old, m, NULL);
    m->faulted = __atomic_load_n(&old->faulted, __ATOMIC_ACQUIRE);
    old->nregions = 0;
out:
    if (err) *err = rc;
    return m;
}

struct vn_mem *vn_mem_without_region(struct vn_mem *old, uint64_t gpa, uint64_t size, uint64_t uva,
                                     struct vn_mem **removed, int *err)
{
    int rc = 0;
    struct vn_mem *m = NULL, *gone = NULL;
    uint32_t hit = old->nregions;
    for (uint32_t i = 0; i < old->nregions; i++) {
        const struct vn_region *r = &old->regions[i];
        if (r->gpa == gpa && r->size == size && r->uva == uva) { hit = i; break; }
    }
    if (hit == old->nregions) { rc = -ENOENT; goto out; }
    m = vn_mem_new();
    gone = vn_mem_new();
    if (!m || !gone) { free(m); free(gone); m = gone = NULL; rc = -ENOMEM; goto out; }
    for (uint32_t i = 0; i < old->nregions; i++) {
        if (i == hit) gone->regions[gone->nregions++] = old->regions[i];
        else m->regions[m->nregions++] = old->regions[i];
    }
    guard_transfer(old, gone, old->regions[hit].map_base);
    guard_transfer(old, m, NULL);
    m->faulted = gone->faulted = __atomic_load_n(&old->faulted, __ATOMIC_ACQUIRE);
    old->nregions = 0;
out:
    if (removed) *removed = gone;
    if (err) *err = rc;
    return m;
}

void vn_mem_free(struct vn_mem *m)
{
    if (!m) return;
    guard_unregister(m);
    for (uint32_t i = 0; i < m->nregions; i++)
        munmap(m->regions[i].map_base, m->regions[i].map_len);
    free(m);
}

static inline void *mem_translate(const struct vn_mem *m, uint64_t addr, uint64_t len, int by_uva)
{
    if (!m) return NULL;
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct vn_region *r = &m->regions[i];
        uint64_t start = by_uva ? r->uva : r->gpa;
        if (addr >= start && addr - start < r->size && len <= r->size - (addr - start))
            return r->host + (addr - start);
    }
    return NULL;
}

void *vn_mem_gpa_to_host(struct vn_mem *m, uint64_t gpa, uint64_t len)
{
    return mem_translate(m, gpa, len, 0);
}

void *vn_mem_uva_to_host(struct vn_mem *m, uint64_t uva, uint64_t len)
{
    return mem_translate(m, uva, len, 1);
}

/*
 * Translate [gpa, gpa+len) into up to `max` iovecs, splitting where it crosses
 * from one region into an adjacent one.  Returns the count, -1 when some byte
 * lies outside guest memory, -2 when more than `max` segments are needed.
 */
static inline __attribute__((always_inline)) int mem_to_iov(const struct vn_mem *m, uint64_t gpa, uint64_t len,
                      struct iovec *iov, int max)
{
    int n = 0;
    if (gpa + len < gpa) return -1;   /* wraps past 2^64 */
    while (len > 0) {
        const struct vn_region *hit = NULL;
        for (uint32_t i = 0; i < m->nregions; i++) {
            const struct vn_region *r = &m->regions[i];
            if (gpa >= r->gpa && gpa - r->gpa < r->size) { hit = r; break; }
        }
        if (!hit) return -1;
        if (n >= max) return -2;
        uint64_t off = gpa - hit->gpa;
        uint64_t take = hit->size - off;
        if (take > len) take = len;
        iov[n].iov_base = hit->host + off;
        iov[n].iov_len = take;
        n++;
        gpa += take;
        len -= take;
    }
    return n;
}

/* ------------------------------------------------------------------ */
/* dirty log (live migration)                                          */
/* ------------------------------------------------------------------ */

/*
 * While QEMU migrates a VM it must re-send every guest page that changed after it
 * was copied, and the pages we write (read data, status bytes, used rings) change
 * behind its back.  So it hands us a bitmap, one bit per 4 KiB of guest-physical
 * memory (bit p%8 of byte p/8, the layout QEMU reads as 64-bit chunks), and we set
 * a page's bit after writing to it: set before the write, QEMU could copy the page
 * and clear the bit between the two, and the write would be lost on the
 * destination.  Bits are set with atomic ORs (QEMU clears them concurrently).
 * Nothing here runs unless logging is on: the hot path tests one pointer.
 */
struct vn_log {
    uint8_t *bitmap;
    uint64_t size;          /* bytes of bitmap */
    void *map_base;
    uint64_t map_len;
    struct vn_mem *guard;   /* owns the SIGBUS guard slot of the mapping */
    uint64_t missed;        /* pages past the end of the bitmap (written, not logged) */
};

struct vn_log *vn_log_new(int fd, uint64_t size, uint64_t offset, int *err)
{
    uint64_t page;
    struct stat st;
    int rc = 0;
    struct vn_log *l = NULL;
    if (size == 0 || size > VN_LOG_MAX_BYTES || offset > VN_LOG_MAX_BYTES) { rc = -EINVAL; goto out; }
    rc = vn_mem_fd_kind(fd, &page);
    if (rc < 0) goto out;
    if (fstat(fd, &st) < 0) { rc = -errno; goto out; }
    if ((uint64_t)st.st_size < offset + size) { rc = -ERANGE; goto out; }
    uint64_t align = offset & (page - 1);
    uint64_t len = (size + align + page - 1) & ~(page - 1);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)(offset - align));
    if (p == MAP_FAILED) { rc = -errno; goto out; }
    l = calloc(1, sizeof(*l));
    struct vn_mem *g = l ? vn_mem_new() : NULL;
    if (!g || guard_register(g, p, len) < 0) {
        rc = g ? -ENOSPC : -ENOMEM;
        free(g);
        free(l);
        l = NULL;
        munmap(p, len);
        goto out;
    }
    l->guard = g;
    l->map_base = p;
    l->map_len = len;
    l->bitmap = (uint8_t *)p + align;
    l->size = size;
out:
    if (err) *err = rc;
    return l;
}

int vn_log_faulted(struct vn_log *l) { return l ? vn_mem_faulted(l->guard) : 0; }

uint64_t vn_log_missed(struct vn_log *l) { return l ? __atomic_load_n(&l->missed, __ATOMIC_RELAXED) : 0; }

void vn_log_free(struct vn_log *l)
{
    if (!l) return;
    guard_unregister(l->guard);
    munmap(l->map_base, l->map_len);
    free(l->guard);
    free(l);
}

static void log_mark(struct vn_log *l, uint64_t gpa, uint64_t len)
{
    if (len == 0 || gpa + len < gpa) return;
    uint64_t first = gpa / VN_LOG_PAGE, last = (gpa + len - 1) / VN_LOG_PAGE;
    for (uint64_t p = first; p <= last; p++) {
        if (p / 8 >= l->size) {
            /* QEMU sizes the log for all of guest memory: only a front-end that
             * lies about it gets here.  Counted, and the page is not logged. */
            __atomic_fetch_add(&l->missed, last - p + 1, __ATOMIC_RELAXED);
            return;
        }
        __atomic_fetch_or(&l->bitmap[p / 8], (uint8_t)(1u << (p % 8)), __ATOMIC_RELEASE);
    }
}

/* Log host range [host, host+len) of guest memory m by its guest-physical address. */
static void log_mark_host(struct vn_log *l, const struct vn_mem *m, const uint8_t *host, uint64_t len)
{
    while (len > 0) {
        const struct vn_region *hit = NULL;
        for (uint32_t i = 0; i < m->nregions; i++) {
            const struct vn_region *r = &m->regions[i];
            if (host >= r->host && (uint64_t)(host - r->host) < r->size) { hit = r; break; }
        }
        if (!hit) return;
        uint64_t off = (uint64_t)(host - hit->host), take = hit->size - off;
        if (take > len) take = len;
        log_mark(l, hit->gpa + off, take);
        host += take;
        len -= take;
    }
}

/* ------------------------------------------------------------------ */
/* reactor, devices, queues: structures                                */
/* ------------------------------------------------------------------ */

struct slot {
    vn_req req;
    struct slot *next_free;
};

/* The shared inflight buffer's per-queue layout (vhost-user spec, "Inflight I/O
 * tracking", split virtqueue).  The front-end can write it at any time: every
 * value read from it is checked before use. */
struct ifl_desc {
    uint8_t inflight;
    uint8_t padding[5];
    uint16_t next;
    uint64_t counter;
};

struct ifl_queue {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;
    struct ifl_desc desc[];
};

_Static_assert(sizeof(struct ifl_desc) == VN_INFLIGHT_DESC, "DescStateSplit is 16 bytes");
_Static_assert(sizeof(struct ifl_queue) == VN_INFLIGHT_HEADER, "QueueRegionSplit header is 16 bytes");

/* The packed-ring layout of the same buffer (DescStatePacked, QueueRegionPacked):
 * every ring descriptor taken is copied into an entry of a free list; a buffer's head
 * entry holds its fetch counter, its length in entries and its last entry.  The
 * old_* fields are the state before the batch being published, so that a process
 * dying in the middle leaves something the next one can roll back or forward. */
struct pifl_desc {
    uint8_t inflight;
    uint8_t padding;
    uint16_t next;
    uint16_t last;
    uint16_t num;
    uint64_t counter;
    uint16_t id;
    uint16_t flags;
    uint32_t len;
    uint64_t addr;
};

struct pifl_queue {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t free_head;
    uint16_t old_free_head;
    uint16_t used_idx;
    uint16_t old_used_idx;
    uint8_t used_wrap_counter;
    uint8_t old_used_wrap_counter;
    uint8_t padding[7];
    struct pifl_desc desc[];
};

_Static_assert(sizeof(struct pifl_desc) == VN_INFLIGHT_PACKED_DESC, "DescStatePacked is 32 bytes");
_Static_assert(sizeof(struct pifl_queue) == VN_INFLIGHT_PACKED_HEADER, "QueueRegionPacked header is 32 bytes");

struct vn_vq {
    struct vn_dev *dev;
    uint16_t index;
    uint32_t size;
    struct vring_desc *desc;
    struct vring_avail *avail;
    struct vring_used *used;
    struct vn_mem *mem;
    int kick_fd, call_fd;
    int event_idx, indirect;
    int enabled;
    uint32_t pass_walked;   /* descriptors walked in this reactor iteration */
    int running;            /* on the reactor's list */
    int stopping;           /* no new requests are fetched */
    const char *broken;
    uint16_t last_avail;
    uint16_t used_idx;      /* shadow of used->idx */
    uint16_t signalled_used;
    int used_dirty;         /* entries written but used->idx not yet published */
    int need_signal;
    uint32_t inflight;
    struct slot *slots;
    uint32_t nslots;
    struct slot *free_list;
    uint64_t stat_requests, stat_signals, stat_errors;
    /* live migration: the dirty log (NULL: logging off) */
    struct vn_log *log;
    int log_used;
    uint64_t log_used_gpa;
    /* interrupt coalescing (vn_dev_set_coalescing): the rate period's end and the
     * requests seen when it began, the current delay, and the earliest time of the
     * next signal */
    uint64_t co_next_check, co_reqs_at_check, co_delay, co_next_event;
    /* packed ring (VIRTIO_F_RING_PACKED): desc is the descriptor ring, avail the
     * driver's event suppression area, used the device's; last_avail and used_idx
     * are ring positions (0..size-1) with their wrap counters. */
    int packed;
    uint16_t avail_wrap, used_wrap;
    uint16_t used_flags;        /* AVAIL | USED when used_wrap is 1, else 0 */
    uint32_t chain_limit;       /* min(size, VQ_MAX_CHAIN) */
    uint16_t *id_slots;         /* per buffer id: ring slots of that buffer in flight, 0: free */
    uint16_t *id_entry;         /* per buffer id: its head entry in the inflight buffer */
    uint32_t inflight_slots;    /* ring slots taken and not yet written back */
    /* in-flight tracking */
    volatile struct ifl_queue *ifl;
    uint32_t ifl_capacity;
    uint64_t ifl_counter;
    uint16_t *ifl_batch;        /* heads completed since used->idx was last published */
    uint32_t ifl_nbatch;
    uint16_t *resubmit;         /* recovered heads, oldest first */
    uint32_t nresubmit, resubmit_pos;
    uint32_t recovered, recovery_reset;
};

struct vn_dev {
    struct vn_reactor *reactor;
    const struct vn_device_ops *ops;
    void *ctx;
    /* Interrupt coalescing: the delay base in ticks (0: off) and the threshold in
     * requests per COALESCING_INTERVAL_MS. */
    uint64_t co_delay_base;
    uint32_t co_threshold;
};

/* A bdev's QoS rate limits: one token bucket per limit (enum vn_qos_limit), shared by
 * every descriptor of the bdev on every reactor.  Tokens are added from the reactors'
 * per-iteration clock by whichever reactor finds time has passed (a CAS on `last`
 * makes one of them add each interval), and taken with atomic adds; an I/O passes
 * while a bucket holds any token, so a large one may take it below zero and the next
 * ones wait for the debt (SPDK's behaviour). */
struct qos_bucket {
    _Atomic int64_t tokens;
    _Atomic uint64_t last;      /* time up to which tokens were added */
    _Atomic uint64_t rate;      /* per second; 0: no limit */
    _Atomic int64_t burst;      /* most tokens held (QOS_BURST_MS of the rate) */
};

struct vn_qos {
    struct qos_bucket b[VN_QOS_LIMITS];
    uint64_t tick_rate;
};

/* Tokens a bucket holds at most (the rate over this many ms): a reactor that was not
 * scheduled for a while (a busy host) catches up instead of losing the time, and a
 * guest that was idle gets at most this much at full speed before the limit bites. */
#define QOS_BURST_MS 100

/* A descriptor as the core keeps it: the public part first. */
struct core_desc {
    vn_bdev_desc d;
    struct vn_reactor *r;
    int (*poll)(void *bdev_ctx, void *chan);   /* the channel's poller, or NULL */
    int listed;                 /* on the reactor's lists */
    int has_fd;                 /* its channel wakes the reactor (set with the epoll set) */
    /* QoS: the bdev's limits (NULL: none) and the I/O held back, oldest first, linked
     * through their driver_ctx; `waiting`: on the reactor's list of such descriptors. */
    struct vn_qos *qos;
    vn_bdev_io *qhead, *qtail;
    uint64_t held;              /* how many (read racily by the control plane) */
    int waiting;
};

struct exec_msg {
    vn_exec_fn fn;
    void *arg;
    int result;
    int done;
};

struct vn_reactor {
    int core;
    int interrupt_mode;
    pthread_t thread;
    int started;
    atomic_int stop;
    atomic_int tid;
    int epfd;
    int msg_fd;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct exec_msg *pending;     /* one at a time; callers serialise on exec_lock */
    pthread_mutex_t exec_lock;
    atomic_int msg_flag;
    struct vn_vq *queues[REACTOR_MAX_QUEUES];
    int nqueues;
    struct vn_dev *devs[REACTOR_MAX_DEVS];
    int ndevs;
    /* Devices with a poll member (a subset of devs). */
    struct vn_dev *polled_devs[REACTOR_MAX_DEVS];
    int npolled_devs;
    /* Open bdev descriptors, and those whose channel has a poller. */
    struct core_desc *descs[REACTOR_MAX_DESCS];
    int ndescs;
    struct core_desc *polled_descs[REACTOR_MAX_DESCS];
    int npolled_descs;
    /* Descriptors holding I/O back for QoS. */
    struct core_desc *qos_waiting[REACTOR_MAX_DESCS];
    int nqos_waiting;
    struct vn_iostat_clock clock;
    /* Devices with interrupt coalescing on: the iteration reads the clock for them. */
    int ncoalescing;
    uint64_t co_interval;       /* COALESCING_INTERVAL_MS in ticks */
    int epoll_dirty;
    uint64_t loops, busy_loops, idle_ns, busy_ns;
};

/* ------------------------------------------------------------------ */
/* reactor messages                                                    */
/* ------------------------------------------------------------------ */

int vn_reactor_exec(struct vn_reactor *r, vn_exec_fn fn, void *arg)
{
    if (!r || !r->started || pthread_equal(pthread_self(), r->thread))
        return fn(arg);
    struct exec_msg msg = { fn, arg, 0, 0 };
    pthread_mutex_lock(&r->exec_lock);
    pthread_mutex_lock(&r->lock);
    r->pending = &msg;
    atomic_store(&r->msg_flag, 1);
    pthread_mutex_unlock(&r->lock);
    uint64_t one = 1;
    if (write(r->msg_fd, &one, sizeof(one)) < 0) { /* counter saturated: still flagged */ }
    pthread_mutex_lock(&r->lock);
    while (!msg.done) pthread_cond_wait(&r->cond, &r->lock);
    pthread_mutex_unlock(&r->lock);
    pthread_mutex_unlock(&r->exec_lock);
    return msg.result;
}

static void reactor_handle_msgs(struct vn_reactor *r)
{
    if (!atomic_load_explicit(&r->msg_flag, memory_order_acquire)) return;
    pthread_mutex_lock(&r->lock);
    struct exec_msg *m = r->pending;
    r->pending = NULL;
    atomic_store(&r->msg_flag, 0);
    pthread_mutex_unlock(&r->lock);
    if (!m) return;
    int res = m->fn(m->arg);
    /* A control message may have changed what to wait on (a hot-attached
     * target's bdev fd, a new kick fd): cheap to rebuild, as messages are rare. */
    r->epoll_dirty = 1;
    pthread_mutex_lock(&r->lock);
    m->result = res;
    m->done = 1;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->lock);
}

/* ------------------------------------------------------------------ */
/* virtqueue: popping, completing, notifying                          */
/* ------------------------------------------------------------------ */

/* The EVENT_IDX fields trail the rings. */
static inline volatile uint16_t *vq_avail_event(struct vn_vq *q)
{
    return (volatile uint16_t *)((uint8_t *)q->used + 4 + 8 * (size_t)q->size);
}

static inline volatile uint16_t *vq_used_event(struct vn_vq *q)
{
    return (volatile uint16_t *)((uint8_t *)q->avail + 4 + 2 * (size_t)q->size);
}

static void vq_mark_broken(struct vn_vq *q, const char *why)
{
    if (!q->broken) q->broken = why;
    q->stat_errors++;
}

/* The used ring changed (entries, idx, flags or avail_event): log all of it, a
 * page or three. */
static __attribute__((noinline, cold)) void vq_log_used(struct vn_vq *q)
{
    /* A packed ring's "used" address is its device event suppression area. */
    if (q->log_used) log_mark(q->log, q->log_used_gpa, q->packed ? 4 : 4 + 8 * (uint64_t)q->size + 2);
}

/* The device wrote into the request's device-writable buffers. */
static __attribute__((noinline, cold)) void vq_log_request(struct vn_vq *q, const vn_req *req)
{
    for (uint32_t i = req->n_out; i < req->n_out + req->n_in; i++)
        log_mark_host(q->log, q->mem, req->iov[i].iov_base, req->iov[i].iov_len);
}

static void vq_publish_used(struct vn_vq *q)
{
    if (!q->used_dirty) return;
    if (__builtin_expect(q->packed, 0)) {
        /* Each used descriptor was published by its flags as it completed. */
        q->used_dirty = 0;
        q->need_signal = 1;
        return;
    }
    atomic_thread_fence(memory_order_release);
    *(volatile uint16_t *)&q->used->idx = q->used_idx;
    if (__builtin_expect(q->log != NULL, 0)) vq_log_used(q);
    if (__builtin_expect(q->ifl != NULL, 0)) {
        /* The spec's order, so that a process dying between any two stores leaves
         * a buffer the next one can repair: used->idx, then the batch's inflight
         * flags, then used_idx.  Only the compiler could reorder them: a crash
         * loses no store the CPU already made to the shared page. */
        atomic_signal_fence(memory_order_seq_cst);
        for (uint32_t i = 0; i < q->ifl_nbatch; i++) q->ifl->desc[q->ifl_batch[i]].inflight = 0;
        atomic_signal_fence(memory_order_seq_cst);
        q->ifl->used_idx = q->used_idx;
        q->ifl_nbatch = 0;
    }
    q->used_dirty = 0;
    q->need_signal = 1;
}

/*
 * Interrupt coalescing, SPDK's semantics (lib/vhost): every COALESCING_INTERVAL_MS the
 * queue's request count since the delay was last set is compared with the threshold;
 * above it, the guest's interrupts are spaced delay_base * (count - threshold) /
 * threshold apart from then on (at most delay_base), so that one interrupt reports a
 * batch of completions.  At or under it, the delay stays and the count carries on into
 * the next period (a front-end that stalls for a moment does not turn coalescing off).
 * Returns whether the signal must wait (the completions stay published in the used ring).
 */
static int vq_coalesce(struct vn_vq *q, uint64_t now)
{
    struct vn_dev *d = q->dev;
    if (now >= q->co_next_check) {
        q->co_next_check = now + d->reactor->co_interval;
        uint64_t n = q->stat_requests - q->co_reqs_at_check;
        if (n > d->co_threshold) {
            uint64_t delay = d->co_delay_base * (n - d->co_threshold) / d->co_threshold;
            if (delay > d->co_delay_base) delay = d->co_delay_base;
            q->co_reqs_at_check = q->stat_requests;
            /* A shorter delay than the one the last signal started applies at once. */
            if (delay < q->co_delay && q->co_next_event > now + delay) q->co_next_event = now + delay;
            q->co_delay = delay;
        }
    }
    return now < q->co_next_event;
}

/* Packed ring: whether the driver's event suppression area asks for an interrupt
 * for the used descriptors written since the last one (virtio 1.1, 2.8.10; the
 * offset test is vring_need_event's on positions extended by the wrap counters). */
static int vq_packed_need_signal(struct vn_vq *q)
{
    const volatile struct vring_packed_event *ev = (const volatile struct vring_packed_event *)q->avail;
    uint16_t flags = ev->flags;
    if (flags != VRING_PACKED_EVENT_F_DESC || !q->event_idx) return flags != VRING_PACKED_EVENT_F_DISABLE;
    uint16_t off_wrap = ev->off_wrap;
    int32_t size = (int32_t)q->size;
    int32_t new_ = q->used_idx, old = q->signalled_used, off = off_wrap & 0x7fff;
    if (new_ <= old) old -= size;
    if ((off_wrap >> 15) != q->used_wrap) off -= size;
    return (uint16_t)(new_ - off - 1) < (uint16_t)(new_ - old);
}

/* Signal the guest if it wants to hear of new used entries.  `now`: the iteration's
 * clock when the device coalesces interrupts (0 otherwise, or to signal at once).
 * Returns 1 when a signal is held back by coalescing (the reactor must come back). */
static int vq_signal(struct vn_vq *q, uint64_t now)
{
    if (!q->need_signal) return 0;
    if (__builtin_expect(now != 0, 0) && q->dev->co_delay_base && vq_coalesce(q, now)) return 1;
    q->need_signal = 0;
    atomic_thread_fence(memory_order_seq_cst);
    int do_signal;
    if (__builtin_expect(q->packed, 0)) {
        do_signal = vq_packed_need_signal(q);
    } else if (q->event_idx) {
        uint16_t used_event = *vq_used_event(q);
        uint16_t new_idx = q->used_idx, old = q->signalled_used;
        do_signal = (uint16_t)(new_idx - used_event - 1) < (uint16_t)(new_idx - old);
    } else {
        do_signal = !(*(volatile uint16_t *)&q->avail->flags & VRING_AVAIL_F_NO_INTERRUPT);
    }
    q->signalled_used = q->used_idx;
    if (do_signal && q->call_fd >= 0) {
        int rc = vn_fd_signal(q->call_fd);
        if (__builtin_expect(rc == 0, 1)) {
            q->stat_signals++;
            if (__builtin_expect(now != 0, 0)) q->co_next_event = now + q->co_delay;
        } else {
            /* Never again on this fd: each attempt could stall the reactor. */
            q->call_fd = -1;
            vq_mark_broken(q, rc == -EINTR ? "the call eventfd blocked the reactor (the front-end made it "
                                             "blocking and filled its counter)"
                                           : "the call fd cannot be written (not an eventfd)");
        }
    }
    return 0;
}

static void vq_complete(vn_req *req, uint32_t written)
{
    struct vn_vq *q = req->core_priv;
    struct slot *s = (struct slot *)req;
    /* A batch of completions is published before it outgrows the ring: one more
     * would overwrite a used element the driver has not been shown, and the
     * in-flight buffer keeps one batch of at most a ring's worth.  Only a driver
     * that makes heads available again before their completion was published
     * (or a recovery's resubmissions plus such reuse) gets here. */
    if (__builtin_expect(q->ifl != NULL, 0) && q->ifl_nbatch >= q->size) vq_publish_used(q);
    uint16_t slot_idx = q->used_idx & (uint16_t)(q->size - 1);
    struct vring_used_elem *e = &q->used->ring[slot_idx];
    if (__builtin_expect(q->log != NULL, 0) && req->n_in) vq_log_request(q, req);
    e->id = req->head;
    e->len = written;
    if (__builtin_expect(q->ifl != NULL, 0)) {
        q->ifl->desc[req->head].next = q->ifl->last_batch_head;
        q->ifl->last_batch_head = req->head;
        q->ifl_batch[q->ifl_nbatch++] = req->head;
    }
    q->used_idx++;
    q->used_dirty = 1;
    q->inflight--;
    s->next_free = q->free_list;
    q->free_list = s;
}

/* A chain walked (either ring layout): its parts' sums checked once, not per
 * descriptor (they cannot wrap: VN_MAX_IOV descriptors of at most 4 GiB each, and
 * nothing was touched yet).  When part of the chain lies outside guest memory, the
 * device gets only the chain's last descriptor (flags, addr, len), when it is
 * device-writable and translates, so that it can still answer an error status there
 * (virtio-blk's status byte) instead of leaving the driver without one. */
static inline __attribute__((always_inline)) void req_check_walked(struct vn_vq *q, vn_req *req, uint16_t flags,
                                                                   uint64_t addr, uint32_t len)
{
    if (__builtin_expect(req->out_len > VQ_MAX_PART_BYTES || req->in_len > VQ_MAX_PART_BYTES, 0)
        && req->error == VN_REQ_OK)
        req->error = VN_REQ_E2BIG;
    if (__builtin_expect(req->error != VN_REQ_OK, 0)) {
        req->n_out = req->n_in = 0;
        req->out_len = req->in_len = 0;
        if ((flags & VRING_DESC_F_WRITE) && len > 0 && len <= VQ_MAX_PART_BYTES) {
            int n = mem_to_iov(q->mem, addr, len, req->iov, VN_MAX_IOV);
            if (n > 0) { req->n_in = (uint32_t)n; req->in_len = len; }
        }
    }
}

/* Walk one chain into req.  Returns 0, or -1 if the ring itself is malformed
 * (the queue is then broken); a bad address only sets req->error. */
static inline __attribute__((always_inline)) int vq_map_chain(struct vn_vq *q, uint16_t head, vn_req *req)
{
    const struct vring_desc *table = q->desc;
    uint32_t max = q->size, idx = head, count = 0;
    /* One bound covers loops and over-long chains: the table size, or less. */
    uint32_t limit = max < VQ_MAX_CHAIN ? max : VQ_MAX_CHAIN;
    int in_indirect = 0, seen_write = 0;
    uint32_t niov = 0;
    struct vring_desc last = { 0, 0, 0, 0 };

    req->n_out = req->n_in = 0;
    req->out_len = req->in_len = 0;
    req->error = VN_REQ_OK;
    for (;;) {
        struct vring_desc d;
        if (idx >= max) { vq_mark_broken(q, "descriptor next index out of range"); return -1; }
        if (++count > limit) {
            vq_mark_broken(q, count > max ? "descriptor chain loops or is longer than the table"
                                          : "descriptor chain longer than 1040 descriptors");
            return -1;
        }
        d.addr = ((volatile struct vring_desc *)table)[idx].addr;
        d.len = ((volatile struct vring_desc *)table)[idx].len;
        d.flags = ((volatile struct vring_desc *)table)[idx].flags;
        d.next = ((volatile struct vring_desc *)table)[idx].next;
        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (!q->indirect) { vq_mark_broken(q, "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC"); return -1; }
            if (in_indirect) { vq_mark_broken(q, "nested indirect descriptor table"); return -1; }
            if (d.flags & VRING_DESC_F_NEXT) { vq_mark_broken(q, "indirect descriptor with NEXT flag"); return -1; }
            if (d.len == 0 || d.len % sizeof(struct vring_desc) || d.len / sizeof(struct vring_desc) > 65536) {
                vq_mark_broken(q, "indirect table length is not a non-zero multiple of 16");
                return -1;
            }
            table = vn_mem_gpa_to_host(q->mem, d.addr, d.len);
            if (!table) { vq_mark_broken(q, "indirect table outside guest memory"); return -1; }
            max = d.len / sizeof(struct vring_desc);
            limit = max < VQ_MAX_CHAIN ? max : VQ_MAX_CHAIN;
            q->pass_walked += count;
            idx = 0;
            count = 0;
            in_indirect = 1;
            continue;
        }
        if (d.flags & VRING_DESC_F_WRITE) {
            seen_write = 1;
        } else if (seen_write) {
            vq_mark_broken(q, "device-readable descriptor after a device-writable one");
            return -1;
        }
        if (d.len > 0 && req->error == VN_REQ_OK) {
            int n = mem_to_iov(q->mem, d.addr, d.len, &req->iov[niov], VN_MAX_IOV - niov);
            if (n < 0) {
                req->error = n == -2 ? VN_REQ_E2BIG : VN_REQ_EFAULT;
            } else {
                niov += n;
                if (d.flags & VRING_DESC_F_WRITE) { req->n_in += n; req->in_len += d.len; }
                else { req->n_out += n; req->out_len += d.len; }
            }
        }
        last = d;
        if (!(d.flags & VRING_DESC_F_NEXT)) break;
        idx = d.next;
    }
    q->pass_walked += count;
    req_check_walked(q, req, last.flags, last.addr, last.len);
    return 0;
}

/* The chain walk is inlined into the hot loop (it is most of the per-request
 * work); the resubmission path, run once after a crash, calls this copy. */
static __attribute__((noinline, cold)) int vq_map_chain_cold(struct vn_vq *q, uint16_t head, vn_req *req)
{
    return vq_map_chain(q, head, req);
}

/* Hand the chain at `head` to the device in a free slot.  Returns 0, or -1 when
 * the ring is malformed (nothing was taken). */
static inline __attribute__((always_inline)) int vq_start_request(struct vn_vq *q, uint16_t head, int cold)
{
    struct slot *s = q->free_list;
    vn_req *req = &s->req;
    if ((cold ? vq_map_chain_cold(q, head, req) : vq_map_chain(q, head, req)) < 0) return -1;
    q->free_list = s->next_free;
    q->inflight++;
    q->stat_requests++;
    if (req->error) q->stat_errors++;
    req->head = head;
    req->queue_index = q->index;
    req->dev_ctx = q->dev->ctx;
    req->complete = vq_complete;
    req->core_priv = q;
    if (__builtin_expect(q->ifl != NULL, 0)) {
        /* Before submit: the device may complete it inside the call. */
        q->ifl->desc[head].counter = ++q->ifl_counter;
        atomic_signal_fence(memory_order_seq_cst);
        q->ifl->desc[head].inflight = 1;
    }
    q->dev->ops->submit(q->dev->ctx, req);
    return 0;
}

/* Requests a previous target process left in flight (vq_recover_inflight), before
 * anything new: out of line, the hot path only tests for them. */
static __attribute__((noinline, cold)) int vq_resubmit(struct vn_vq *q)
{
    int done = 0;
    while (q->resubmit_pos < q->nresubmit && q->free_list) {
        if (vq_start_request(q, q->resubmit[q->resubmit_pos], 1) < 0) break;
        q->resubmit_pos++;
        done++;
    }
    return done;
}

/* Pop and submit what the guest made available, after whatever a previous
 * target process left in flight.  Returns requests started. */
static int vq_process_packed(struct vn_vq *q);

static int vq_process(struct vn_vq *q)
{
    if (q->broken || q->stopping || !q->enabled) return 0;
    /* The ring layout is the queue's, chosen once: one test per queue and pass. */
    if (__builtin_expect(q->packed, 0)) return vq_process_packed(q);
    int done = 0;
    if (__builtin_expect(q->resubmit_pos < q->nresubmit, 0)) {
        done = vq_resubmit(q);
        if (q->resubmit_pos < q->nresubmit) return done;
    }
    uint16_t avail_idx = *(volatile uint16_t *)&q->avail->idx;
    uint16_t pending = avail_idx - q->last_avail;
    if (pending == 0) return done;
    if (pending > q->size) {
        vq_mark_broken(q, "avail index moved by more than the queue size");
        return done;
    }
    /* Against what we have not returned yet, not only what we have not taken: a
     * driver never has more than the queue size outstanding, and one that claims
     * to would make us overrun its used ring. */
    if ((uint16_t)(avail_idx - q->used_idx) > q->size) {
        vq_mark_broken(q, "more requests outstanding than the queue size");
        return done;
    }
    atomic_thread_fence(memory_order_acquire);
    q->pass_walked = 0;
    while (q->last_avail != avail_idx && q->free_list && q->pass_walked < VQ_PASS_BUDGET) {
        uint16_t head = *(volatile uint16_t *)&q->avail->ring[q->last_avail & (q->size - 1)];
        if (head >= q->size) { vq_mark_broken(q, "avail ring head index out of range"); break; }
        if (vq_start_request(q, head, 0) < 0) break;
        q->last_avail++;
        done++;
    }
    if (q->event_idx) {
        /* Polling: keep the guest from kicking by asking for a kick far away. */
        *vq_avail_event(q) = q->last_avail - 1;
    }
    return done;
}


/* ------------------------------------------------------------------ */
/* packed virtqueues (VIRTIO_F_RING_PACKED)                            */
/* ------------------------------------------------------------------ */

/*
 * One ring of descriptors: the driver makes a buffer available by writing its
 * descriptors at consecutive positions (the head's flags last, with AVAIL equal
 * to its wrap counter and USED not); the device takes buffers in ring order and
 * writes one used descriptor per buffer (the buffer id, the length written,
 * flags with AVAIL = USED = its own wrap counter) at its used position, which
 * then advances by the number of ring descriptors the buffer took.  Buffers may
 * complete in any order: the id says which one.  Everything read from the ring is
 * read once and checked, as for split rings; a malformed ring breaks the queue.
 */


/* ---- packed rings: in-flight tracking (vhost-user "Inflight I/O tracking") ---- */

struct ifl_entry { uint64_t counter; uint16_t head; };

static int ifl_entry_cmp(const void *a, const void *b)
{
    const struct ifl_entry *x = a, *y = b;
    return x->counter < y->counter ? -1 : x->counter > y->counter;
}

static inline volatile struct pifl_queue *vq_pifl(struct vn_vq *q)
{
    return (volatile struct pifl_queue *)q->ifl;
}

/* A buffer of `slots` ring descriptors was taken at ring position `pos`: copy them
 * into the free list's entries (the spec's order), before the device sees it. */
static __attribute__((noinline, cold)) void vq_pifl_fetched(struct vn_vq *q, uint32_t pos, uint32_t slots, uint16_t id)
{
    volatile struct pifl_queue *f = vq_pifl(q);
    const volatile struct vring_packed_desc *ring = (const volatile struct vring_packed_desc *)q->desc;
    uint16_t head = f->old_free_head;
    q->id_entry[id] = 0xffff;       /* untracked, unless all goes well */
    if (head >= q->size) return;    /* checked at start; the front-end may scribble since */
    f->desc[head].num = 0;
    f->desc[head].counter = ++q->ifl_counter;
    atomic_signal_fence(memory_order_seq_cst);
    f->desc[head].inflight = 1;
    for (uint32_t i = 0; i < slots; i++) {
        uint16_t e = f->free_head;
        if (e >= q->size) return;
        if (i + 1 == slots) f->desc[head].last = e;
        f->desc[head].num++;
        f->desc[e].addr = ring[pos].addr;
        f->desc[e].len = ring[pos].len;
        f->desc[e].flags = ring[pos].flags;
        f->desc[e].id = ring[pos].id;
        atomic_signal_fence(memory_order_seq_cst);
        f->free_head = f->desc[e].next;
        if (++pos == q->size) pos = 0;
    }
    atomic_signal_fence(memory_order_seq_cst);
    f->old_free_head = f->free_head;
    q->id_entry[id] = head;
}

/* Before the used descriptor of `id` is written: its entries back on the free list,
 * the used position after it. */
static __attribute__((noinline, cold)) void vq_pifl_used_begin(struct vn_vq *q, uint16_t id, uint16_t used_idx,
                                                               uint16_t used_wrap)
{
    volatile struct pifl_queue *f = vq_pifl(q);
    uint16_t e = q->id_entry[id];
    if (e >= q->size) return;
    uint16_t last = f->desc[e].last;
    if (last >= q->size) return;
    f->desc[last].next = f->free_head;
    f->free_head = e;
    atomic_signal_fence(memory_order_seq_cst);
    f->used_idx = used_idx;
    f->used_wrap_counter = (uint8_t)used_wrap;
}

/* After the used descriptor's flags: the buffer is the driver's; commit the batch. */
static __attribute__((noinline, cold)) void vq_pifl_used_end(struct vn_vq *q, uint16_t id)
{
    volatile struct pifl_queue *f = vq_pifl(q);
    uint16_t e = q->id_entry[id];
    if (e < q->size) f->desc[e].inflight = 0;
    atomic_signal_fence(memory_order_seq_cst);
    f->old_free_head = f->free_head;
    f->old_used_idx = f->used_idx;
    f->old_used_wrap_counter = f->used_wrap_counter;
}

static void pifl_reset(struct vn_vq *q)
{
    volatile struct pifl_queue *f = vq_pifl(q);
    f->version = 0;
    for (uint32_t i = 0; i < q->size; i++) {
        f->desc[i].inflight = 0;
        f->desc[i].next = (uint16_t)(i + 1);
        f->desc[i].last = f->desc[i].num = 0;
        f->desc[i].counter = 0;
    }
    f->features = 0;
    f->desc_num = (uint16_t)q->size;
    f->free_head = f->old_free_head = 0;
    f->used_idx = f->old_used_idx = q->used_idx;
    f->used_wrap_counter = f->old_used_wrap_counter = (uint8_t)q->used_wrap;
    f->version = 1;
    q->ifl_counter = 0;
}


/* Runs before a packed queue starts (the spec's "When reconnecting"): finish or roll
 * back the batch the previous process was publishing, free what is on the free list,
 * queue every head still in flight, oldest first, and resume the ring after them: the
 * used position plus the descriptors they took (the front-end cannot know it: a
 * packed ring has no index in shared memory for it to read back). */
static int vq_recover_inflight_packed(struct vn_vq *q)
{
    volatile struct pifl_queue *f = vq_pifl(q);
    const volatile struct vring_packed_desc *ring = (const volatile struct vring_packed_desc *)q->desc;
    uint32_t size = q->size;
    q->nresubmit = q->resubmit_pos = 0;
    q->recovered = q->recovery_reset = 0;
    if (size > q->ifl_capacity) {
        q->recovery_reset = 3;
        q->ifl = NULL;
        return 0;
    }
    uint16_t version = f->version, desc_num = f->desc_num;
    if (version != 1 || desc_num != size) {
        if (version != 0) q->recovery_reset = 1;
        pifl_reset(q);
        return 0;
    }
    uint16_t free_head = f->free_head, old_free_head = f->old_free_head;
    uint16_t used = f->used_idx, old_used = f->old_used_idx;
    uint8_t wrap = f->used_wrap_counter, old_wrap = f->old_used_wrap_counter;
    if (free_head > size || old_free_head > size || used >= size || old_used >= size || wrap > 1 || old_wrap > 1)
        goto inconsistent;
    if (used != old_used || wrap != old_wrap) {
        /* Was the used descriptor at old_used written?  Then the batch reached the
         * driver: commit it; else roll it back. */
        uint16_t flags = ring[old_used].flags;
        if (!!(flags & VRING_PACKED_DESC_F_AVAIL) == old_wrap && !!(flags & VRING_PACKED_DESC_F_USED) == old_wrap) {
            old_free_head = free_head;
            old_used = used;
            old_wrap = wrap;
        }
    }
    f->free_head = f->old_free_head = old_free_head;
    f->used_idx = f->old_used_idx = old_used;
    f->used_wrap_counter = f->old_used_wrap_counter = old_wrap;
    uint32_t h = old_free_head;
    for (uint32_t i = 0; i < size && h < size; i++) {
        f->desc[h].inflight = 0;
        h = f->desc[h].next;
    }
    struct ifl_entry *list = malloc(size * sizeof(*list));
    if (!list) return -ENOMEM;
    uint32_t n = 0, slots = 0;
    uint64_t max_counter = 0;
    for (uint32_t i = 0; i < size; i++) {
        if (f->desc[i].inflight != 1) continue;
        uint16_t num = f->desc[i].num;
        if (num == 0 || num > size || (slots += num) > size) { free(list); goto inconsistent; }
        list[n].counter = f->desc[i].counter;
        list[n].head = (uint16_t)i;
        if (list[n].counter > max_counter) max_counter = list[n].counter;
        n++;
    }
    qsort(list, n, sizeof(*list), ifl_entry_cmp);
    for (uint32_t i = 0; i < n; i++) q->resubmit[i] = list[i].head;
    free(list);
    q->nresubmit = n;
    q->recovered = n;
    q->ifl_counter = max_counter;
    q->used_idx = old_used;
    q->used_wrap = old_wrap;
    q->signalled_used = old_used;
    uint32_t pos = old_used + slots;
    q->avail_wrap = old_wrap;
    if (pos >= size) {
        pos -= size;
        q->avail_wrap ^= 1;
    }
    q->last_avail = (uint16_t)pos;
    return 0;
inconsistent:
    q->recovery_reset = 2;
    pifl_reset(q);
    return 0;
}

static inline int vq_packed_desc_avail(uint16_t flags, uint16_t wrap)
{
    return !!(flags & VRING_PACKED_DESC_F_AVAIL) == wrap && !!(flags & VRING_PACKED_DESC_F_USED) != wrap;
}

/* Translate one buffer into req's iovecs (a bad address only sets req->error). */
static inline __attribute__((always_inline)) int vq_packed_add(struct vn_vq *q, vn_req *req, uint32_t *niov,
                                                               int *seen_write, uint64_t addr, uint32_t len,
                                                               uint16_t flags)
{
    /* Device-readable buffers come first (virtio 2.7.4): a readable one after a
     * writable one breaks the queue, whichever descriptor (ring or indirect) holds it. */
    int write = (flags & VRING_DESC_F_WRITE) != 0;
    if (write) {
        *seen_write = 1;
    } else if (*seen_write) {
        vq_mark_broken(q, "device-readable descriptor after a device-writable one");
        return -1;
    }
    if (len == 0 || req->error != VN_REQ_OK) return 0;
    int n = mem_to_iov(q->mem, addr, len, &req->iov[*niov], VN_MAX_IOV - *niov);
    if (n < 0) {
        req->error = n == -2 ? VN_REQ_E2BIG : VN_REQ_EFAULT;
        return 0;
    }
    *niov += n;
    if (write) { req->n_in += n; req->in_len += len; }
    else { req->n_out += n; req->out_len += len; }
    return 0;
}

/* Walk the buffer at the queue's avail position into req.  Returns 0 with its
 * id and the ring descriptors it takes, or -1 if the ring is malformed (the
 * queue is then broken and nothing was taken). */
static inline __attribute__((always_inline)) int vq_map_chain_packed(struct vn_vq *q,
                                                                     const volatile struct vring_packed_desc *ring,
                                                                     uint32_t size, uint32_t pos, uint32_t limit,
                                                                     vn_req *req, uint16_t *id_out, uint32_t *slots_out)
{
    /* ring/size/pos: the queue's ring at its avail position, or (resubmission) a
     * copy of one buffer's descriptors from the inflight buffer; limit: at most
     * min(size, VQ_MAX_CHAIN) descriptors. */
    uint32_t slots = 0, niov = 0;
    int seen_write = 0;
    /* After the walk, d is the buffer's last descriptor (an indirect table's last
     * entry, with the ring descriptor's id). */
    struct vring_packed_desc d;
    const volatile struct vring_packed_desc *p = ring + pos, *end = ring + size;

    req->n_out = req->n_in = 0;
    req->out_len = req->in_len = 0;
    req->error = VN_REQ_OK;
    for (;;) {
        if (++slots > limit) {
            vq_mark_broken(q, slots > size ? "descriptor chain longer than the ring"
                                           : "descriptor chain longer than 1040 descriptors");
            return -1;
        }
        d.addr = p->addr;
        d.len = p->len;
        d.id = p->id;
        d.flags = p->flags;
        if (++p == end) p = ring;
        if (d.flags & VRING_DESC_F_INDIRECT) {
            if (!q->indirect) { vq_mark_broken(q, "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC"); return -1; }
            if (d.flags & VRING_DESC_F_NEXT) { vq_mark_broken(q, "indirect descriptor with NEXT flag"); return -1; }
            if (slots != 1) { vq_mark_broken(q, "indirect descriptor inside a chain"); return -1; }
            if (d.len == 0 || d.len % sizeof(struct vring_packed_desc)) {
                vq_mark_broken(q, "indirect table length is not a non-zero multiple of 16");
                return -1;
            }
            uint32_t n = d.len / sizeof(struct vring_packed_desc);
            if (n > VQ_MAX_CHAIN) { vq_mark_broken(q, "descriptor chain longer than 1040 descriptors"); return -1; }
            const volatile struct vring_packed_desc *table = vn_mem_gpa_to_host(q->mem, d.addr, d.len);
            if (!table) { vq_mark_broken(q, "indirect table outside guest memory"); return -1; }
            /* The table's entries are read in order; NEXT means nothing there. */
            for (uint32_t i = 0; i < n; i++) {
                struct vring_packed_desc t;
                t.addr = table[i].addr;
                t.len = table[i].len;
                t.flags = table[i].flags;
                if (t.flags & VRING_DESC_F_INDIRECT) { vq_mark_broken(q, "nested indirect descriptor table"); return -1; }
                if (vq_packed_add(q, req, &niov, &seen_write, t.addr, t.len, t.flags) < 0) return -1;
                d.addr = t.addr;
                d.len = t.len;
                d.flags = t.flags;
            }
            q->pass_walked += n;
            break;
        }
        if (vq_packed_add(q, req, &niov, &seen_write, d.addr, d.len, d.flags) < 0) return -1;
        if (!(d.flags & VRING_DESC_F_NEXT)) break;
    }
    q->pass_walked += slots;
    /* The buffer id is the last ring descriptor's. */
    if (__builtin_expect(d.id >= q->size || q->id_slots[d.id] || q->inflight_slots + slots > q->size, 0)) {
        vq_mark_broken(q, d.id >= q->size ? "buffer id out of range"
                          : q->id_slots[d.id] ? "buffer id already in flight"
                                              : "more descriptors outstanding than the queue size");
        return -1;
    }
    req_check_walked(q, req, d.flags, d.addr, d.len);
    *id_out = d.id;
    *slots_out = slots;
    return 0;
}

/* Log the used descriptor the device wrote at ring position pos. */
static __attribute__((noinline, cold)) void vq_log_packed_desc(struct vn_vq *q, uint32_t pos)
{
    log_mark_host(q->log, q->mem, (const uint8_t *)q->desc + 16 * (size_t)pos, 16);
}

/* Write the used descriptor of `id` at position pos: id and len before the flags
 * that hand it to the driver. */
static inline __attribute__((always_inline)) void vq_packed_write_used(struct vn_vq *q, uint32_t pos, uint16_t id,
                                                                       uint32_t written, uint16_t flags)
{
    volatile struct vring_packed_desc *d = (volatile struct vring_packed_desc *)q->desc + pos;
    d->id = id;
    d->len = written;
    atomic_thread_fence(memory_order_release);
    d->flags = flags | (written ? VRING_DESC_F_WRITE : 0);
}

/* Return `req` (its used descriptor written) to the driver; `tracked`: with the dirty
 * log or the inflight buffer (a constant: the fast path has neither). */
static inline __attribute__((always_inline)) void vq_complete_packed_body(vn_req *req, uint32_t written, int tracked)
{
    struct vn_vq *q = req->core_priv;
    struct slot *s = (struct slot *)req;
    uint16_t id = req->head;
    uint32_t pos = q->used_idx, n = q->id_slots[id], next = pos + n;
    uint16_t wrap = q->used_wrap, flags = q->used_flags;
    if (next >= q->size) {
        next -= q->size;
        wrap ^= 1;
        q->used_flags = flags ^ (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED);
    }
    if (tracked) {
        if (q->log && req->n_in) vq_log_request(q, req);
        if (q->ifl) vq_pifl_used_begin(q, id, (uint16_t)next, wrap);
    }
    vq_packed_write_used(q, pos, id, written, flags);
    if (tracked) {
        if (q->log) vq_log_packed_desc(q, pos);
        if (q->ifl) vq_pifl_used_end(q, id);
    }
    q->id_slots[id] = 0;
    q->inflight_slots -= n;
    q->used_wrap = wrap;
    q->used_idx = (uint16_t)next;
    q->used_dirty = 1;
    q->inflight--;
    s->next_free = q->free_list;
    q->free_list = s;
}

/* With the dirty log or the inflight buffer: out of line. */
static __attribute__((noinline, cold)) void vq_complete_packed_tracked(vn_req *req, uint32_t written)
{
    vq_complete_packed_body(req, written, 1);
}

static void vq_complete_packed(vn_req *req, uint32_t written)
{
    const struct vn_vq *q = req->core_priv;
    if (__builtin_expect(((uintptr_t)q->log | (uintptr_t)q->ifl) != 0, 0)) {
        vq_complete_packed_tracked(req, written);
        return;
    }
    vq_complete_packed_body(req, written, 0);
}

/* Hand a mapped request to the device (its id and ring descriptors registered). */
static inline __attribute__((always_inline)) void vq_submit_packed(struct vn_vq *q, struct slot *s, uint16_t id,
                                                                   uint32_t slots)
{
    vn_req *req = &s->req;
    q->free_list = s->next_free;
    q->inflight++;
    q->stat_requests++;
    if (req->error) q->stat_errors++;
    q->id_slots[id] = (uint16_t)slots;
    q->inflight_slots += slots;
    req->head = id;
    req->queue_index = q->index;
    req->dev_ctx = q->dev->ctx;
    req->complete = vq_complete_packed;
    req->core_priv = q;
}

/* Requests a previous target process left in flight, from their copies in the
 * inflight buffer (checked like a ring: the front-end can write it), oldest first. */
static __attribute__((noinline, cold)) int vq_resubmit_packed(struct vn_vq *q)
{
    volatile struct pifl_queue *f = vq_pifl(q);
    struct vring_packed_desc *copy = malloc(VQ_MAX_CHAIN * sizeof(*copy));
    int done = 0;
    if (!copy) return 0;
    while (q->resubmit_pos < q->nresubmit && q->free_list && !q->broken) {
        uint16_t head = q->resubmit[q->resubmit_pos];
        uint32_t num = f->desc[head].num, e = head;
        if (num > VQ_MAX_CHAIN) num = VQ_MAX_CHAIN;
        for (uint32_t i = 0; i < num; i++) {
            if (e >= q->size) { num = i; break; }
            copy[i].addr = f->desc[e].addr;
            copy[i].len = f->desc[e].len;
            copy[i].id = f->desc[e].id;
            copy[i].flags = f->desc[e].flags;
            e = f->desc[e].next;
        }
        if (num == 0) { vq_mark_broken(q, "inflight buffer entry without descriptors"); break; }
        struct slot *s = q->free_list;
        uint16_t id;
        uint32_t slots;
        if (vq_map_chain_packed(q, copy, num, 0, num, &s->req, &id, &slots) < 0) break;
        vq_submit_packed(q, s, id, slots);
        q->id_entry[id] = head;
        q->resubmit_pos++;
        done++;
        q->dev->ops->submit(q->dev->ctx, &s->req);
    }
    free(copy);
    return done;
}

static __attribute__((noinline)) int vq_process_packed(struct vn_vq *q)
{
    const volatile struct vring_packed_desc *ring = (const volatile struct vring_packed_desc *)q->desc;
    int done = 0;
    if (__builtin_expect(q->resubmit_pos < q->nresubmit, 0)) {
        done = vq_resubmit_packed(q);
        if (q->resubmit_pos < q->nresubmit) return done;
    }
    q->pass_walked = 0;
    while (q->free_list && q->pass_walked < VQ_PASS_BUDGET) {
        uint16_t flags = ring[q->last_avail].flags;
        if (!vq_packed_desc_avail(flags, q->avail_wrap)) break;
        /* The head's flags before the rest of the buffer. */
        atomic_thread_fence(memory_order_acquire);
        struct slot *s = q->free_list;
        uint16_t id;
        uint32_t slots, start = q->last_avail;
        if (vq_map_chain_packed(q, ring, q->size, start, q->chain_limit, &s->req, &id, &slots) < 0) break;
        vq_submit_packed(q, s, id, slots);
        uint32_t pos = start + slots;
        if (pos >= q->size) {
            pos -= q->size;
            q->avail_wrap ^= 1;
        }
        q->last_avail = (uint16_t)pos;
        /* Before submit: the device may complete it inside the call. */
        if (__builtin_expect(q->ifl != NULL, 0)) vq_pifl_fetched(q, start, slots, id);
        q->dev->ops->submit(q->dev->ctx, &s->req);
        done++;
    }
    return done;
}

/* Interrupt mode: ask for kicks again; returns 1 if work raced in. */
static int vq_arm(struct vn_vq *q)
{
    if (q->broken || q->stopping || !q->enabled) return 0;
    if (q->packed) {
        ((volatile struct vring_packed_event *)q->used)->flags = VRING_PACKED_EVENT_F_ENABLE;
        if (__builtin_expect(q->log != NULL, 0)) vq_log_used(q);
        atomic_thread_fence(memory_order_seq_cst);
        uint16_t flags = ((const volatile struct vring_packed_desc *)q->desc)[q->last_avail].flags;
        return vq_packed_desc_avail(flags, q->avail_wrap) && q->free_list;
    }
    if (q->event_idx)
        *vq_avail_event(q) = q->last_avail;
    else
        *(volatile uint16_t *)&q->used->flags = 0;
    if (__builtin_expect(q->log != NULL, 0)) vq_log_used(q);
    atomic_thread_fence(memory_order_seq_cst);
    return *(volatile uint16_t *)&q->avail->idx != q->last_avail && q->free_list;
}

static void vq_disarm(struct vn_vq *q)
{
    if (q->packed) {
        /* Polling: the driver never needs to kick (with or without EVENT_IDX). */
        if (q->used && q->enabled && !q->broken) {
            ((volatile struct vring_packed_event *)q->used)->flags = VRING_PACKED_EVENT_F_DISABLE;
            if (__builtin_expect(q->log != NULL, 0)) vq_log_used(q);
        }
        return;
    }
    if (!q->event_idx && q->used && q->enabled && !q->broken) {
        *(volatile uint16_t *)&q->used->flags = VRING_USED_F_NO_NOTIFY;
        if (__builtin_expect(q->log != NULL, 0)) vq_log_used(q);
    }
}

/* ------------------------------------------------------------------ */
/* virtqueue: control-plane API                                        */
/* ------------------------------------------------------------------ */

struct vn_vq *vn_vq_new(struct vn_dev *dev, uint16_t index)
{
    struct vn_vq *q = calloc(1, sizeof(*q));
    if (!q) return NULL;
    q->dev = dev;
    q->index = index;
    q->kick_fd = -1;
    q->call_fd = -1;
    return q;
}

int vn_vq_free(struct vn_vq *q)
{
    if (!q) return 0;
    /* The reactor still holds a queue with requests in flight: freeing it would
     * hand the late completions freed memory. */
    if (q->running && vn_vq_stop(q, 0) != 0) return -EBUSY;
    free(q->slots);
    free(q->id_slots);
    free(q->id_entry);
    free(q->ifl_batch);
    free(q->resubmit);
    free(q);
    return 0;
}

void vn_vq_set_ring(struct vn_vq *q, uint32_t size, void *desc, void *avail, void *used)
{
    q->size = size;
    q->desc = desc;
    q->avail = avail;
    q->used = used;
}

struct set_mem_arg { struct vn_vq *q; struct vn_mem *m; };

static int vq_set_mem_on_reactor(void *p)
{
    struct set_mem_arg *a = p;
    a->q->mem = a->m;
    return 0;
}

void vn_vq_set_mem(struct vn_vq *q, struct vn_mem *m)
{
    struct set_mem_arg a = { q, m };
    if (q->running) vn_reactor_exec(q->dev->reactor, vq_set_mem_on_reactor, &a);
    else vq_set_mem_on_reactor(&a);
}

void vn_vq_set_base(struct vn_vq *q, uint32_t base)
{
    if (q->packed) {
        /* Bits 0-14 the avail position, 15 its wrap counter; the upper half the
         * used position and wrap counter (QEMU's encoding), or 0: as the avail
         * one (a stopped ring has nothing in flight). */
        uint32_t used = base >> 16 ? base >> 16 : base & 0xffff;
        q->last_avail = base & 0x7fff;
        q->avail_wrap = (base >> 15) & 1;
        q->used_idx = used & 0x7fff;
        q->used_wrap = (used >> 15) & 1;
        q->signalled_used = q->used_idx;
        return;
    }
    q->last_avail = (uint16_t)base;
    q->used_idx = (uint16_t)base;
    q->signalled_used = (uint16_t)base;
}

uint32_t vn_vq_get_base(struct vn_vq *q)
{
    if (q->packed)
        return ((uint32_t)q->last_avail | (uint32_t)q->avail_wrap << 15)
               | ((uint32_t)q->used_idx | (uint32_t)q->used_wrap << 15) << 16;
    return q->last_avail;
}

void vn_vq_set_packed(struct vn_vq *q, int packed) { q->packed = !!packed; }

struct set_int_arg { struct vn_vq *q; int value; int which; };

static int vq_set_int_on_reactor(void *p)
{
    struct set_int_arg *a = p;
    struct vn_vq *q = a->q;
    switch (a->which) {
    case 0: q->kick_fd = a->value; q->dev->reactor->epoll_dirty = 1; break;
    case 1: q->call_fd = a->value; break;
    case 2:
        q->enabled = a->value;
        /* A packed ring enabled after it started (SET_VRING_ENABLE follows the kick):
         * tell the driver not to kick a polling reactor (interrupt mode re-arms before
         * it sleeps). */
        if (q->packed && q->running && q->enabled) vq_disarm(q);
        break;
    }
    return 0;
}

static void vq_set_int(struct vn_vq *q, int which, int value)
{
    struct set_int_arg a = { q, value, which };
    if (q->running) vn_reactor_exec(q->dev->reactor, vq_set_int_on_reactor, &a);
    else vq_set_int_on_reactor(&a);
}

void vn_vq_set_kick(struct vn_vq *q, int fd) { vq_set_int(q, 0, fd); }
void vn_vq_set_call(struct vn_vq *q, int fd) { vq_set_int(q, 1, fd); }
void vn_vq_set_enabled(struct vn_vq *q, int enabled) { vq_set_int(q, 2, enabled); }

struct set_log_arg { struct vn_vq *q; struct vn_log *log; int log_used; uint64_t used_gpa; };

static int vq_set_log_on_reactor(void *p)
{
    struct set_log_arg *a = p;
    a->q->log = a->log;
    a->q->log_used = a->log_used;
    a->q->log_used_gpa = a->used_gpa;
    return 0;
}

void vn_vq_set_log(struct vn_vq *q, struct vn_log *l, int log_used, uint64_t used_gpa)
{
    struct set_log_arg a = { q, l, log_used, used_gpa };
    if (q->running) vn_reactor_exec(q->dev->reactor, vq_set_log_on_reactor, &a);
    else vq_set_log_on_reactor(&a);
}

void vn_vq_set_features(struct vn_vq *q, int event_idx, int indirect)
{
    q->event_idx = event_idx;
    q->indirect = indirect;
}

const char *vn_vq_broken_reason(struct vn_vq *q) { return q->broken; }
uint32_t vn_vq_inflight(struct vn_vq *q) { return q->inflight; }

void vn_vq_get_stats(struct vn_vq *q, uint64_t *out)
{
    out[0] = q->stat_requests;
    out[1] = q->stat_signals;
    out[2] = q->stat_errors;
}

void vn_vq_set_inflight(struct vn_vq *q, void *region, uint32_t capacity)
{
    q->ifl = region;
    q->ifl_capacity = region ? capacity : 0;
    q->nresubmit = q->resubmit_pos = 0;
}

void vn_vq_get_recovery(struct vn_vq *q, uint32_t *out)
{
    out[0] = q->recovered;
    out[1] = q->recovery_reset;
}

static void ifl_reset(struct vn_vq *q, uint16_t used)
{
    volatile struct ifl_queue *f = q->ifl;
    f->version = 0;
    for (uint32_t i = 0; i < q->size; i++) {
        f->desc[i].inflight = 0;
        f->desc[i].next = 0;
        f->desc[i].counter = 0;
    }
    f->features = 0;
    f->desc_num = (uint16_t)q->size;
    f->last_batch_head = 0;
    f->used_idx = used;
    f->version = 1;
    q->ifl_counter = 0;
}


/* Runs before the queue starts.  A buffer seen for the first time (version 0)
 * is initialised and the front-end's base stands.  Otherwise: finish the last
 * batch's bookkeeping if the previous process died between publishing used->idx
 * and clearing its flags, then queue every head still marked in flight, oldest
 * first, and resume the avail ring after them (the front-end, which could not
 * ask a dead process for its base, sent used->idx). */
static int vq_recover_inflight(struct vn_vq *q)
{
    volatile struct ifl_queue *f = q->ifl;
    uint16_t used = *(volatile uint16_t *)&q->used->idx;
    q->nresubmit = q->resubmit_pos = 0;
    q->recovered = 0;
    q->recovery_reset = 0;
    q->ifl_nbatch = 0;
    if (q->size > q->ifl_capacity) {
        q->recovery_reset = 3;
        q->ifl = NULL;
        return 0;
    }
    uint16_t version = f->version, desc_num = f->desc_num;
    if (version != 1 || desc_num != q->size) {
        if (version != 0) q->recovery_reset = 1;
        ifl_reset(q, used);
        return 0;
    }
    uint16_t batch = (uint16_t)(used - f->used_idx);
    if (batch > q->size) {
        q->recovery_reset = 2;
        ifl_reset(q, used);
        return 0;
    }
    uint16_t h = f->last_batch_head;
    for (uint16_t i = 0; i < batch; i++) {
        if (h >= q->size) {
            q->recovery_reset = 2;
            ifl_reset(q, used);
            return 0;
        }
        f->desc[h].inflight = 0;
        h = f->desc[h].next;
    }
    f->used_idx = used;
    struct ifl_entry *list = malloc(q->size * sizeof(*list));
    if (!list) return -ENOMEM;
    uint32_t n = 0;
    uint64_t max_counter = 0;
    for (uint32_t i = 0; i < q->size; i++) {
        if (f->desc[i].inflight != 1) continue;
        uint64_t c = f->desc[i].counter;
        list[n].counter = c;
        list[n].head = (uint16_t)i;
        n++;
        if (c > max_counter) max_counter = c;
    }
    qsort(list, n, sizeof(*list), ifl_entry_cmp);
    for (uint32_t i = 0; i < n; i++) q->resubmit[i] = list[i].head;
    free(list);
    q->nresubmit = n;
    q->recovered = n;
    q->ifl_counter = max_counter;
    q->last_avail = (uint16_t)(used + n);
    q->used_idx = used;
    q->signalled_used = used;
    return 0;
}

static int vq_start_on_reactor(void *p)
{
    struct vn_vq *q = p;
    struct vn_reactor *r = q->dev->reactor;
    if (r->nqueues >= REACTOR_MAX_QUEUES) return -ENOSPC;
    r->queues[r->nqueues++] = q;
    q->running = 1;
    q->stopping = 0;
    r->epoll_dirty = 1;
    vq_disarm(q);
    return 0;
}

int vn_vq_start(struct vn_vq *q)
{
    /* A previous stop timed out: finish it now if those requests completed since. */
    if (q->running && q->stopping && vn_vq_stop(q, 0) != 0) return -EBUSY;
    if (q->running) return 0;
    if (!q->desc || !q->avail || !q->used || !q->size) return -EINVAL;
    uint32_t n = q->size < VQ_MAX_SLOTS ? q->size : VQ_MAX_SLOTS;
    if (q->nslots != n) {
        free(q->slots);
        q->slots = calloc(n, sizeof(struct slot));
        if (!q->slots) return -ENOMEM;
        q->nslots = n;
    }
    q->free_list = NULL;
    for (uint32_t i = 0; i < n; i++) {
        q->slots[i].next_free = q->free_list;
        q->free_list = &q->slots[i];
    }
    q->nresubmit = q->resubmit_pos = 0;
    q->recovered = q->recovery_reset = 0;
    if (q->packed) {
        if (q->last_avail >= q->size || q->used_idx >= q->size) return -EINVAL;
        q->chain_limit = q->size < VQ_MAX_CHAIN ? q->size : VQ_MAX_CHAIN;
        free(q->id_slots);
        free(q->id_entry);
        q->id_slots = calloc(q->size, sizeof(uint16_t));
        q->id_entry = calloc(q->size, sizeof(uint16_t));
        if (!q->id_slots || !q->id_entry) return -ENOMEM;
        q->inflight_slots = 0;
        if (q->ifl) {
            free(q->resubmit);
            q->resubmit = calloc(q->size, sizeof(uint16_t));
            if (!q->resubmit) return -ENOMEM;
            int rc = vq_recover_inflight_packed(q);
            if (rc) return rc;
        }
        q->used_flags = q->used_wrap ? (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) : 0;
    } else if (q->ifl) {
        free(q->ifl_batch);
        free(q->resubmit);
        q->ifl_batch = calloc(q->size, sizeof(uint16_t));
        q->resubmit = calloc(q->size, sizeof(uint16_t));
        if (!q->ifl_batch || !q->resubmit) return -ENOMEM;
        int rc = vq_recover_inflight(q);
        if (rc) return rc;
    }
    q->inflight = 0;
    q->broken = NULL;
    q->used_dirty = 0;
    q->need_signal = 0;
    /* Coalescing measures the new session afresh. */
    q->co_next_check = q->co_next_event = q->co_delay = 0;
    q->co_reqs_at_check = q->stat_requests;
    return vn_reactor_exec(q->dev->reactor, vq_start_on_reactor, q);
}

static int vq_stopping_on_reactor(void *p)
{
    struct vn_vq *q = p;
    q->stopping = 1;
    if (q->inflight == 0) {
        struct vn_reactor *r = q->dev->reactor;
        vq_publish_used(q);
        vq_signal(q, 0);
        for (int i = 0; i < r->nqueues; i++) {
            if (r->queues[i] == q) {
                r->queues[i] = r->queues[--r->nqueues];
                break;
            }
        }
        q->running = 0;
        r->epoll_dirty = 1;
    }
    return (int)q->inflight;
}

int vn_vq_stop(struct vn_vq *q, int timeout_ms)
{
    if (!q->running) return 0;
    uint64_t deadline = now_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        int left = vn_reactor_exec(q->dev->reactor, vq_stopping_on_reactor, q);
        if (left == 0) return 0;
        if (now_ns() >= deadline) return left;
        struct timespec ts = { 0, 500000 };
        nanosleep(&ts, NULL);
    }
}

/* ------------------------------------------------------------------ */
/* devices                                                             */
/* ------------------------------------------------------------------ */

/* Remove `item` from an unordered array of `*n` pointers. */
static void list_remove(void **arr, int *n, const void *item)
{
    for (int i = 0; i < *n; i++) {
        if (arr[i] == item) {
            arr[i] = arr[--*n];
            return;
        }
    }
}

static int dev_attach_on_reactor(void *p)
{
    struct vn_dev *d = p;
    struct vn_reactor *r = d->reactor;
    if (r->ndevs >= REACTOR_MAX_DEVS) return -ENOSPC;
    r->devs[r->ndevs++] = d;
    if (d->ops->poll) r->polled_devs[r->npolled_devs++] = d;
    return 0;
}

static int dev_detach_on_reactor(void *p)
{
    struct vn_dev *d = p;
    struct vn_reactor *r = d->reactor;
    list_remove((void **)r->devs, &r->ndevs, d);
    list_remove((void **)r->polled_devs, &r->npolled_devs, d);
    if (d->co_delay_base) r->ncoalescing--;
    d->co_delay_base = 0;
    return 0;
}

struct coalescing_arg { struct vn_dev *d; uint64_t delay_base; uint32_t threshold; };

static int dev_set_coalescing_on_reactor(void *p)
{
    struct coalescing_arg *a = p;
    struct vn_dev *d = a->d;
    struct vn_reactor *r = d->reactor;
    r->ncoalescing += (a->delay_base != 0) - (d->co_delay_base != 0);
    d->co_delay_base = a->delay_base;
    d->co_threshold = a->threshold;
    for (int i = 0; i < r->nqueues; i++) {
        struct vn_vq *q = r->queues[i];
        if (q->dev != d) continue;
        q->co_next_check = q->co_next_event = q->co_delay = 0;
        q->co_reqs_at_check = q->stat_requests;
    }
    return 0;
}

int vn_dev_set_coalescing(struct vn_dev *d, uint32_t delay_base_us, uint32_t iops_threshold)
{
    uint64_t ticks = (uint64_t)delay_base_us * vn_tick_rate() / 1000000u;
    uint32_t threshold = (uint32_t)((uint64_t)iops_threshold * COALESCING_INTERVAL_MS / 1000u);
    if (ticks >= UINT32_MAX) return -EINVAL;
    if (threshold == 0) return -ERANGE;
    struct coalescing_arg a = { d, ticks, threshold };
    return vn_reactor_exec(d->reactor, dev_set_coalescing_on_reactor, &a);
}

struct vn_dev *vn_dev_new(struct vn_reactor *r, const struct vn_device_ops *ops, void *ctx, int *err)
{
    int rc = 0;
    struct vn_dev *d = NULL;
    if (!ops || ops->abi_version != VN_ABI_VERSION) rc = -EPROTO;
    else if (!ops->submit) rc = -EINVAL;
    else if (!(d = calloc(1, sizeof(*d)))) rc = -ENOMEM;
    if (!rc) {
        d->reactor = r;
        d->ops = ops;
        d->ctx = ctx;
        rc = vn_reactor_exec(r, dev_attach_on_reactor, d);
    }
    if (err) *err = rc;
    if (rc) {
        free(d);
        return NULL;
    }
    return d;
}

void vn_dev_free(struct vn_dev *d)
{
    if (!d) return;
    vn_reactor_exec(d->reactor, dev_detach_on_reactor, d);
    free(d);
}

/* ------------------------------------------------------------------ */
/* QoS rate limits (bdev_set_qos_limit)                                */
/* ------------------------------------------------------------------ */

static void qos_refill(struct qos_bucket *b, uint64_t rate, uint64_t now, uint64_t tick_rate)
{
    uint64_t last = atomic_load_explicit(&b->last, memory_order_relaxed);
    if (now <= last) return;
    uint64_t dt = now - last;
    int64_t burst = atomic_load_explicit(&b->burst, memory_order_relaxed);
    unsigned __int128 add = (unsigned __int128)rate * dt / tick_rate;
    if (add == 0) return;   /* not one token yet: the time stays for the next look */
    uint64_t used = dt;
    if (add > (unsigned __int128)burst) {
        add = (uint64_t)burst;          /* idle for long: full, and the clock restarts */
    } else {
        /* Only the time those whole tokens took is used up: no rounding is lost. */
        unsigned __int128 t = ((unsigned __int128)add * tick_rate + rate - 1) / rate;
        if (t < dt) used = (uint64_t)t;
    }
    if (!atomic_compare_exchange_strong_explicit(&b->last, &last, last + used, memory_order_relaxed,
                                                 memory_order_relaxed))
        return;                         /* another reactor added them */
    int64_t t = atomic_fetch_add_explicit(&b->tokens, (int64_t)add, memory_order_relaxed) + (int64_t)add;
    while (t > burst && !atomic_compare_exchange_weak_explicit(&b->tokens, &t, burst, memory_order_relaxed,
                                                               memory_order_relaxed)) {
    }
}

/* Whether `io` may go to the bdev now (and if so, its tokens are taken).  Only reads
 * and writes are limited, as in SPDK; other I/O waits only behind held-back I/O. */
static int qos_admit(struct vn_qos *q, vn_bdev_io *io, uint32_t block_size, uint64_t now)
{
    if (io->type != VN_IO_READ && io->type != VN_IO_WRITE) return 1;
    const int which[3] = { VN_QOS_RW_IOS, VN_QOS_RW_BYTES, io->type == VN_IO_WRITE ? VN_QOS_W_BYTES
                                                                                     : VN_QOS_R_BYTES };
    uint64_t rates[3];
    for (int i = 0; i < 3; i++) {
        struct qos_bucket *b = &q->b[which[i]];
        rates[i] = atomic_load_explicit(&b->rate, memory_order_relaxed);
        if (!rates[i]) continue;
        if (atomic_load_explicit(&b->tokens, memory_order_relaxed) <= 0) {
            qos_refill(b, rates[i], now, q->tick_rate);
            if (atomic_load_explicit(&b->tokens, memory_order_relaxed) <= 0) return 0;
        }
    }
    int64_t bytes = (int64_t)(io->num_blocks * block_size);
    for (int i = 0; i < 3; i++) {
        if (!rates[i]) continue;
        struct qos_bucket *b = &q->b[which[i]];
        atomic_fetch_sub_explicit(&b->tokens, i == 0 ? 1 : bytes, memory_order_relaxed);
        qos_refill(b, rates[i], now, q->tick_rate);
    }
    return 1;
}

static inline vn_bdev_io *qos_next(vn_bdev_io *io)
{
    vn_bdev_io *n;
    __builtin_memcpy(&n, io->driver_ctx, sizeof(n));
    return n;
}

static inline void qos_set_next(vn_bdev_io *io, vn_bdev_io *n)
{
    __builtin_memcpy(io->driver_ctx, &n, sizeof(n));
}

/* vn_bdev_desc.qos_submit while the bdev has limits (or I/O is still held back):
 * straight to the bdev when nothing waits and the tokens are there, else to the back
 * of the descriptor's FIFO. */
static void desc_qos_submit(vn_bdev_desc *d, vn_bdev_io *io)
{
    struct core_desc *c = (struct core_desc *)d;
    if (!c->qhead && (!c->qos || qos_admit(c->qos, io, d->block_size, io->start_ticks))) {
        d->bdev->ops->submit(d->bdev->ctx, d->chan, io);
        return;
    }
    qos_set_next(io, NULL);
    if (c->qtail) qos_set_next(c->qtail, io);
    else c->qhead = io;
    c->qtail = io;
    c->held++;
    if (!c->waiting) {
        c->r->qos_waiting[c->r->nqos_waiting++] = c;
        c->waiting = 1;
    }
}

static void qos_unlist(struct core_desc *c)
{
    if (!c->waiting) return;
    list_remove((void **)c->r->qos_waiting, &c->r->nqos_waiting, c);
    c->waiting = 0;
}

/* Once per reactor iteration, before new requests: resubmit held-back I/O, oldest
 * first, as far as the tokens go.  Returns the I/O submitted. */
static int reactor_qos_resubmit(struct vn_reactor *r)
{
    int work = 0;
    uint64_t now = vn_iostat_start(&r->clock);
    for (int i = 0; i < r->nqos_waiting;) {
        struct core_desc *c = r->qos_waiting[i];
        while (c->qhead) {
            vn_bdev_io *io = c->qhead;
            if (c->qos && !qos_admit(c->qos, io, c->d.block_size, now)) break;
            c->qhead = qos_next(io);
            if (!c->qhead) c->qtail = NULL;
            c->held--;
            /* May complete inline, and the device submit more: that goes to the back. */
            c->d.bdev->ops->submit(c->d.bdev->ctx, c->d.chan, io);
            work++;
        }
        if (c->qhead) { i++; continue; }
        r->qos_waiting[i] = r->qos_waiting[--r->nqos_waiting];
        c->waiting = 0;
        if (!c->qos) c->d.qos_submit = NULL;     /* limits gone and nothing left held back */
    }
    return work;
}

/* Fail the I/O a closing descriptor still holds back (it never reached the bdev). */
static void qos_fail_held(struct core_desc *c)
{
    qos_unlist(c);
    while (c->qhead) {
        vn_bdev_io *io = c->qhead;
        c->qhead = qos_next(io);
        c->held--;
        io->cb(io, -ENODEV);
    }
    c->qtail = NULL;
}

struct vn_qos *vn_qos_new(void)
{
    struct vn_qos *q = calloc(1, sizeof(*q));
    if (q) q->tick_rate = vn_tick_rate();
    return q;
}

void vn_qos_free(struct vn_qos *q) { free(q); }

void vn_qos_set_limit(struct vn_qos *q, int which, uint64_t per_sec, uint64_t min_burst)
{
    struct qos_bucket *b = &q->b[which];
    int64_t burst = (int64_t)(per_sec / (1000 / QOS_BURST_MS));
    if (burst < (int64_t)min_burst) burst = (int64_t)min_burst;
    uint64_t was = atomic_load(&b->rate);
    atomic_store(&b->burst, burst);
    if (per_sec && !was) {
        /* Starts full, as SPDK's first timeslice. */
        atomic_store(&b->last, vn_ticks());
        atomic_store(&b->tokens, burst);
    }
    atomic_store(&b->rate, per_sec);
}

struct desc_qos_arg { struct core_desc *c; struct vn_qos *qos; };

static int desc_set_qos_on_reactor(void *p)
{
    struct desc_qos_arg *a = p;
    struct core_desc *c = a->c;
    if (!c->d.bdev) return 0;
    c->qos = a->qos;
    /* Without limits the throttle stays until what it holds back is resubmitted. */
    if (a->qos) c->d.qos_submit = desc_qos_submit;
    else if (!c->qhead) c->d.qos_submit = NULL;
    return 0;
}

void vn_desc_set_qos(vn_bdev_desc *d, struct vn_qos *qos)
{
    struct core_desc *c = (struct core_desc *)d;
    struct desc_qos_arg a = { c, qos };
    vn_reactor_exec(c->r, desc_set_qos_on_reactor, &a);
}

uint64_t vn_desc_qos_held(vn_bdev_desc *d)
{
    return __atomic_load_n(&((struct core_desc *)d)->held, __ATOMIC_RELAXED);
}

/* ------------------------------------------------------------------ */
/* bdev descriptors                                                    */
/* ------------------------------------------------------------------ */

static int desc_open_on_reactor(void *p)
{
    struct core_desc *c = p;
    struct vn_reactor *r = c->r;
    vn_bdev *b = c->d.bdev;
    if (r->ndescs >= REACTOR_MAX_DESCS) return -ENOSPC;
    if (b->ops->channel_create) {
        c->d.chan = b->ops->channel_create(b->ctx);
        if (!c->d.chan) return -ENOMEM;
    }
    c->poll = c->d.chan ? b->ops->channel_poll : NULL;
    r->descs[r->ndescs++] = c;
    if (c->poll) r->polled_descs[r->npolled_descs++] = c;
    c->listed = 1;
    /* Its channel's fd joins the sleep set at once (a LUN hot-attached to running rings). */
    r->epoll_dirty = 1;
    return 0;
}

vn_bdev_desc *vn_desc_open(struct vn_reactor *r, vn_bdev *bdev, int *err)
{
    int rc = 0;
    struct core_desc *c = NULL;
    if (!bdev || !bdev->ops || bdev->ops->abi_version != VN_ABI_VERSION) rc = -EPROTO;
    else if (!bdev->ops->submit) rc = -EINVAL;
    else if (!(c = calloc(1, sizeof(*c)))) rc = -ENOMEM;
    if (!rc) {
        c->r = r;
        c->d.bdev = bdev;
        c->d.block_size = bdev->block_size;
        c->d.clock = &r->clock;
        rc = vn_reactor_exec(r, desc_open_on_reactor, c);
    }
    if (err) *err = rc;
    if (rc) {
        free(c);
        return NULL;
    }
    return &c->d;
}

static int desc_close_on_reactor(void *p)
{
    struct core_desc *c = p;
    struct vn_reactor *r = c->r;
    vn_bdev *b = c->d.bdev;
    if (!b) return 0;
    c->d.closing = 1;
    qos_fail_held(c);
    c->qos = NULL;
    c->d.qos_submit = NULL;
    if (c->d.in_flight) return (int)(c->d.in_flight > INT32_MAX ? INT32_MAX : c->d.in_flight);
    if (c->d.chan && b->ops->channel_destroy) b->ops->channel_destroy(b->ctx, c->d.chan);
    c->d.chan = NULL;
    c->d.bdev = NULL;
    c->poll = NULL;
    list_remove((void **)r->descs, &r->ndescs, c);
    list_remove((void **)r->polled_descs, &r->npolled_descs, c);
    c->listed = 0;
    return 0;
}

int vn_desc_close(vn_bdev_desc *d)
{
    if (!d) return 0;
    struct core_desc *c = (struct core_desc *)d;
    return vn_reactor_exec(c->r, desc_close_on_reactor, c);
}

int vn_desc_free(vn_bdev_desc *d)
{
    if (!d) return 0;
    struct core_desc *c = (struct core_desc *)d;
    /* Still on the reactor (its I/O never completed): leaked rather than freed
     * under the reactor's feet. */
    if (c->listed) return -EBUSY;
    free(c);
    return 0;
}

uint64_t vn_desc_in_flight(vn_bdev_desc *d) { return d ? __atomic_load_n(&d->in_flight, __ATOMIC_RELAXED) : 0; }

void vn_desc_get_iostat(vn_bdev_desc *d, uint64_t *out)
{
    __builtin_memcpy(out, &d->iostat, sizeof(d->iostat));
}

/* Runs on the control thread: a racing completion may keep its old max or min. */
void vn_desc_reset_iostat_maxmin(vn_bdev_desc *d)
{
    for (int k = 0; k < VN_STAT_KINDS; k++) d->iostat.max_ticks[k] = d->iostat.min_ticks[k] = 0;
}

void vn_bdev_set_num_blocks(vn_bdev *b, uint64_t num_blocks)
{
    __atomic_store_n(&b->num_blocks, num_blocks, __ATOMIC_RELAXED);
}

/* ------------------------------------------------------------------ */
/* reactors                                                            */
/* ------------------------------------------------------------------ */

static void reactor_rebuild_epoll(struct vn_reactor *r)
{
    close(r->epfd);
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
    epoll_ctl(r->epfd, EPOLL_CTL_ADD, r->msg_fd, &ev);
    for (int i = 0; i < r->nqueues; i++) {
        struct vn_vq *q = r->queues[i];
        if (q->kick_fd < 0 || q->broken) continue;
        ev.events = EPOLLIN;
        ev.data.ptr = q;
        epoll_ctl(r->epfd, EPOLL_CTL_ADD, q->kick_fd, &ev);
    }
    for (int i = 0; i < r->ndescs; i++) {
        struct core_desc *c = r->descs[i];
        vn_bdev *b = c->d.bdev;
        c->has_fd = 0;
        if (!c->d.chan || !b->ops->channel_fd) continue;
        int fd = b->ops->channel_fd(b->ctx, c->d.chan);
        if (fd < 0) continue;
        c->has_fd = 1;
        ev.events = EPOLLIN;
        ev.data.ptr = c;   /* never dereferenced: readiness only */
        epoll_ctl(r->epfd, EPOLL_CTL_ADD, fd, &ev);
    }
    r->epoll_dirty = 0;
}

static int reactor_iteration(struct vn_reactor *r)
{
    int work = 0;
    reactor_handle_msgs(r);
    if (__builtin_expect(r->nqos_waiting != 0, 0)) work += reactor_qos_resubmit(r);
    for (int i = 0; i < r->nqueues; i++)
        work += vq_process(r->queues[i]);
    for (int i = 0; i < r->npolled_descs; i++) {
        struct core_desc *c = r->polled_descs[i];
        work += c->poll(c->d.bdev->ctx, c->d.chan);
    }
    for (int i = 0; i < r->npolled_devs; i++) {
        struct vn_dev *d = r->polled_devs[i];
        work += d->ops->poll(d->ctx);
    }
    vn_iostat_flush(&r->clock);
    uint64_t now = r->ncoalescing ? vn_ticks() | 1 : 0;
    for (int i = 0; i < r->nqueues; i++) {
        struct vn_vq *q = r->queues[i];
        vq_publish_used(q);
        /* A held-back signal is work: an interrupt-mode reactor must not sleep on it. */
        work += vq_signal(q, now);
    }
    return work;
}

/* Interrupt mode: must the reactor keep polling (1 ms) instead of sleeping?  While
 * bdev I/O is in flight on a channel without an fd (it is only ever polled); one
 * with an fd wakes the reactor itself.  Requests a
 * device merely holds (virtio-scsi event buffers) do not count. */
static int reactor_outstanding(struct vn_reactor *r)
{
    for (int i = 0; i < r->ndescs; i++)
        if (r->descs[i]->d.in_flight && !r->descs[i]->has_fd) return 1;
    return 0;
}

static void *reactor_main(void *p)
{
    struct vn_reactor *r = p;
    atomic_store(&r->tid, (int)syscall(SYS_gettid));
    if (r->core >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(r->core, &set);
        pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    }
    char name[16];
    snprintf(name, sizeof(name), "reactor_%d", r->core);
    pthread_setname_np(pthread_self(), name);
    r->epoll_dirty = 1;
    uint64_t t_prev = now_ns();
    while (!atomic_load_explicit(&r->stop, memory_order_relaxed)) {
        int work = reactor_iteration(r);
        r->loops++;
        uint64_t t = now_ns();
        if (work) { r->busy_loops++; r->busy_ns += t - t_prev; }
        else r->idle_ns += t - t_prev;
        t_prev = t;
        if (!r->interrupt_mode || work) continue;
        /* Interrupt mode with nothing to do: re-enable notifications, re-check,
         * then sleep on the kick, message and completion fds. */
        int raced = 0;
        for (int i = 0; i < r->nqueues; i++) raced |= vq_arm(r->queues[i]);
        if (raced) continue;
        if (r->epoll_dirty) reactor_rebuild_epoll(r);
        struct epoll_event evs[64];
        /* Outstanding async I/O whose bdev has no fd still needs polling. */
        int timeout = reactor_outstanding(r) ? 1 : 1000;
        int n = epoll_wait(r->epfd, evs, 64, timeout);
        for (int i = 0; i < n; i++) {
            uint64_t v;
            struct vn_vq *q = evs[i].data.ptr;
            if (!q) { if (read(r->msg_fd, &v, sizeof(v)) < 0) {} continue; }
        }
        /* Drain every kick fd: cheap, and avoids tracking which ptr is a queue. */
        for (int i = 0; i < r->nqueues; i++) {
            struct vn_vq *q = r->queues[i];
            if (q->kick_fd < 0 || q->broken) continue;
            if (vn_fd_drain(q->kick_fd) == -EINTR) {
                vq_mark_broken(q, "the kick eventfd blocked the reactor (the front-end made it blocking)");
                r->epoll_dirty = 1;
            }
        }
        for (int i = 0; i < r->nqueues; i++) vq_disarm(r->queues[i]);
        t_prev = now_ns();
    }
    /* Answer whoever waits on us. */
    reactor_handle_msgs(r);
    return NULL;
}

struct vn_reactor *vn_reactor_new(int core, int interrupt_mode)
{
    struct vn_reactor *r = calloc(1, sizeof(*r));
    if (!r) return NULL;
    r->core = core;
    r->interrupt_mode = interrupt_mode;
    r->co_interval = vn_tick_rate() / (1000 / COALESCING_INTERVAL_MS);
    r->msg_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    r->epfd = epoll_create1(EPOLL_CLOEXEC);
    pthread_mutex_init(&r->lock, NULL);
    pthread_mutex_init(&r->exec_lock, NULL);
    pthread_cond_init(&r->cond, NULL);
    return r;
}

int vn_reactor_start(struct vn_reactor *r)
{
    int rc = pthread_create(&r->thread, NULL, reactor_main, r);
    if (rc) return -rc;
    r->started = 1;
    while (!atomic_load(&r->tid)) {
        struct timespec ts = { 0, 100000 };
        nanosleep(&ts, NULL);
    }
    return 0;
}

void vn_reactor_stop(struct vn_reactor *r)
{
    if (!r->started) return;
    atomic_store(&r->stop, 1);
    uint64_t one = 1;
    if (write(r->msg_fd, &one, sizeof(one)) < 0) {}
    pthread_join(r->thread, NULL);
    r->started = 0;
}

void vn_reactor_free(struct vn_reactor *r)
{
    if (!r) return;
    vn_reactor_stop(r);
    close(r->msg_fd);
    close(r->epfd);
    free(r);
}

void vn_reactor_get_stats(struct vn_reactor *r, uint64_t *out)
{
    out[0] = r->loops;
    out[1] = r->busy_loops;
    out[2] = r->idle_ns;
    out[3] = r->busy_ns;
}

int vn_reactor_core(struct vn_reactor *r) { return r->core; }
int vn_reactor_tid(struct vn_reactor *r) { return atomic_load(&r->tid); }

/* ------------------------------------------------------------------ */
/* I/O statistics clock                                                */
/* ------------------------------------------------------------------ */

uint64_t vn_ticks_now(void) { return vn_ticks(); }

uint32_t vn_max_transfer(void) { return VN_MAX_TRANSFER; }

uint64_t vn_tick_rate(void)
{
    static uint64_t rate;
    if (rate) return rate;
#if defined(__x86_64__)
    /* The TSC against CLOCK_MONOTONIC over 20 ms: well under 0.1% off. */
    struct timespec a, b, pause = { 0, 20000000 };
    clock_gettime(CLOCK_MONOTONIC, &a);
    uint64_t t0 = vn_ticks();
    nanosleep(&pause, NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    uint64_t t1 = vn_ticks();
    uint64_t ns = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000ull + (uint64_t)b.tv_nsec - (uint64_t)a.tv_nsec;
    rate = ns ? (uint64_t)((double)(t1 - t0) * 1e9 / (double)ns) : 1000000000ull;
#else
    rate = 1000000000ull;
#endif
    return rate;
}
