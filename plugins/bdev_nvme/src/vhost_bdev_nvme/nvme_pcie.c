/*
 * bdev_nvme: a userspace NVMe PCIe driver over VFIO (see nvme_pcie.h for the shape).
 *
 * IOVA = host virtual address everywhere (SPDK's VA mode): the queues and the per-command
 * PRP/SGL pages are anonymous mappings of ours, DMA-mapped at their own address; guest
 * memory is mapped by the control plane as the core registers it.  So the iovecs a request
 * carries are bus addresses as they are.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/vfio.h>

#include "vhost_core/vhost_native.h"
#include "nvme_pcie.h"

#define PG 4096u
#define ADMIN_DEPTH 32u
#define MAX_QPAIRS 64
#define MAX_CMD_BYTES (1u << 20)        /* per command: one page of PRP entries covers it */
#define SGL_MAX 256                      /* 16-byte descriptors in one page */
#define NBOUNCE 4                        /* bounce buffers per queue pair ... */
#define BOUNCE_BYTES (256u << 10)        /* ... of this size (a bounced command moves at most this) */

/* Controller registers. */
#define REG_CAP 0x00
#define REG_VS 0x08
#define REG_CC 0x14
#define REG_CSTS 0x1c
#define REG_AQA 0x24
#define REG_ASQ 0x28
#define REG_ACQ 0x30

struct sqe {
    uint32_t cdw0, nsid, cdw2, cdw3;
    uint64_t mptr, prp1, prp2;
    uint32_t cdw10, cdw11, cdw12, cdw13, cdw14, cdw15;
};

struct cqe {
    uint32_t dw0, dw1;
    uint16_t sqhd, sqid, cid, status;
};

struct nvp_ctrlr;

struct nvp_cmd {
    vn_bdev_io *io;             /* NULL: free (or abandoned, below) */
    uint64_t deadline_ms;
    uint32_t bytes;
    uint8_t abandoned;          /* timed out: the slot waits for the controller's answer */
    int8_t bounce;              /* bounce buffer index, or -1 */
    uint64_t bskip;             /* bytes of the request before this command's (bounced reads) */
};

struct nvp_qpair {
    struct nvp_ctrlr *c;
    uint16_t qid, depth;
    struct sqe *sq;
    volatile struct cqe *cq;
    volatile uint32_t *sq_db, *cq_db;
    uint16_t sq_tail, cq_head, phase;
    uint8_t *pages;             /* one PRP-list / SGL / DSM page per slot */
    uint8_t *bounce;            /* NBOUNCE buffers of BOUNCE_BYTES, DMA-mapped */
    uint32_t bounce_free;       /* bit i: buffer i is free */
    struct nvp_cmd *cmds;
    uint16_t *free_cids;
    uint32_t nfree;
    uint32_t outstanding;
    uint64_t next_check_ms;
    vn_bdev_io *pend_head, *pend_tail;  /* requests waiting for slots (linked in driver_ctx) */
    int irq_fd;                 /* eventfd of its MSI-X vector, or -1 */
    int irq_mode;               /* the reactor sleeps on irq_fd (it asked for channel_fd) */
    atomic_uint acked_gen;      /* the reset generation whose quiescing its reactor acknowledged */
    /* Owner: the reactor thread using it, and how many channels of it. */
    int owner_tid;
    int refs;
};

struct nvp_ctrlr {
    atomic_int refs;
    int container, group, device;
    volatile uint8_t *bar;
    size_t bar_len;
    uint64_t cfg_off;
    uint64_t cap;
    uint32_t dstrd;
    /* admin */
    struct sqe *asq;
    volatile struct cqe *acq;
    uint16_t asq_tail, acq_head, aphase, acid;
    uint8_t *abuf;
    pthread_mutex_t admin_lock;
    /* I/O */
    uint32_t max_xfer;
    int sgl;
    uint32_t io_timeout_ms;
    atomic_int failed;
    atomic_uint reset_gen;      /* odd: a controller reset is under way (nvp_reset_begin .. _end) */
    pthread_mutex_t q_lock;
    int nq;
    struct nvp_qpair qp[MAX_QPAIRS];
    int req_fd;
    /* Commands past the I/O timeout, for the control plane to abort (NVMe Abort): qid | cid << 16,
     * pushed by the reactors, taken by nvp_take_timed_out; tmo_fd is signalled on each push. */
    int tmo_fd;
    pthread_mutex_t tmo_lock;
    uint32_t tmo[64];
    uint32_t ntmo;
    int msix;                   /* MSI-X vectors enabled through VFIO (0: none) */
    /* statistics, updated by the reactors with relaxed atomics */
    struct nvp_stats st;
    /* DMA mappings of our own (to unmap/free on release) */
    struct { void *p; size_t len; } own[4 + 3 * MAX_QPAIRS];
    int nown;
};

struct nvp_ns {
    vn_bdev bdev;
    struct nvp_ctrlr *c;
    uint32_t nsid;
};

struct nvp_chan {
    struct nvp_ns *ns;
    struct nvp_qpair *q;
};

/* Per-request state in vn_bdev_io.driver_ctx. */
struct nvp_io {
    vn_bdev_io *next;           /* pending FIFO */
    struct nvp_ns *ns;
    uint64_t next_block, end_block;
    uint32_t parts_out;
    int status;
    int queued;
};
_Static_assert(sizeof(struct nvp_io) <= sizeof(((vn_bdev_io *)0)->driver_ctx), "driver_ctx too small");

static inline struct nvp_io *IOS(vn_bdev_io *io) { return (struct nvp_io *)io->driver_ctx; }

#define STAT_ADD(c, field, n) __atomic_fetch_add(&(c)->st.field, (n), __ATOMIC_RELAXED)

static void seterr(char *err, size_t len, const char *fmt, ...)
{
    if (!err || !len) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t now_ms_precise(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static inline uint32_t rd32(struct nvp_ctrlr *c, uint32_t off)
{
    return *(volatile uint32_t *)(c->bar + off);
}

static inline uint64_t rd64(struct nvp_ctrlr *c, uint32_t off)
{
    return (uint64_t)rd32(c, off) | (uint64_t)rd32(c, off + 4) << 32;
}

static inline void wr32(struct nvp_ctrlr *c, uint32_t off, uint32_t v)
{
    *(volatile uint32_t *)(c->bar + off) = v;
}

static inline void wr64(struct nvp_ctrlr *c, uint32_t off, uint64_t v)
{
    wr32(c, off, (uint32_t)v);
    wr32(c, off + 4, (uint32_t)(v >> 32));
}

static volatile uint32_t *doorbell(struct nvp_ctrlr *c, uint16_t qid, int cq)
{
    return (volatile uint32_t *)(c->bar + 0x1000 + (2u * qid + (cq ? 1 : 0)) * (4u << c->dstrd));
}

/* ------------------------------------------------------------------ DMA memory */

int nvp_dma_map(void *ctrlr, uint64_t vaddr, uint64_t len)
{
    struct nvp_ctrlr *c = ctrlr;
    struct vfio_iommu_type1_dma_map m = {.argsz = sizeof(m),
                                         .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                         .vaddr = vaddr, .iova = vaddr, .size = len};
    return ioctl(c->container, VFIO_IOMMU_MAP_DMA, &m) < 0 ? -errno : 0;
}

int nvp_dma_unmap(void *ctrlr, uint64_t vaddr, uint64_t len)
{
    struct nvp_ctrlr *c = ctrlr;
    struct vfio_iommu_type1_dma_unmap u = {.argsz = sizeof(u), .iova = vaddr, .size = len};
    return ioctl(c->container, VFIO_IOMMU_UNMAP_DMA, &u) < 0 ? -errno : 0;
}

/* Zeroed, page-aligned, DMA-mapped at its own address; NULL and *rc on failure. */
static void *dma_alloc(struct nvp_ctrlr *c, size_t len, int *rc)
{
    len = (len + PG - 1) & ~(size_t)(PG - 1);
    if (c->nown >= (int)(sizeof(c->own) / sizeof(c->own[0]))) { *rc = -ENOSPC; return NULL; }
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) { *rc = -errno; return NULL; }
    int r = nvp_dma_map(c, (uint64_t)(uintptr_t)p, len);
    if (r < 0) { munmap(p, len); *rc = r; return NULL; }
    c->own[c->nown].p = p;
    c->own[c->nown].len = len;
    c->nown++;
    return p;
}

/* ------------------------------------------------------------------ open */

static int cfg_rw(struct nvp_ctrlr *c, void *buf, size_t len, uint64_t off, int wr)
{
    ssize_t n = wr ? pwrite(c->device, buf, len, (off_t)(c->cfg_off + off))
                   : pread(c->device, buf, len, (off_t)(c->cfg_off + off));
    return n == (ssize_t)len ? 0 : (n < 0 ? -errno : -EIO);
}

static void release(struct nvp_ctrlr *c)
{
    if (c->req_fd >= 0) {
        if (c->device >= 0) {
            struct vfio_irq_set s = {.argsz = sizeof(s), .flags = VFIO_IRQ_SET_DATA_NONE |
                                     VFIO_IRQ_SET_ACTION_TRIGGER, .index = VFIO_PCI_REQ_IRQ_INDEX,
                                     .start = 0, .count = 0};
            ioctl(c->device, VFIO_DEVICE_SET_IRQS, &s);
        }
        close(c->req_fd);
    }
    if (c->tmo_fd >= 0) close(c->tmo_fd);
    if (c->msix && c->device >= 0) {
        struct vfio_irq_set s = {.argsz = sizeof(s), .flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                                 .index = VFIO_PCI_MSIX_IRQ_INDEX, .start = 0, .count = 0};
        ioctl(c->device, VFIO_DEVICE_SET_IRQS, &s);
    }
    for (int i = 0; i < c->nq; i++) {
        free(c->qp[i].cmds), free(c->qp[i].free_cids);
        if (c->qp[i].irq_fd >= 0) close(c->qp[i].irq_fd);
    }
    for (int i = c->nown - 1; i >= 0; i--) {
        if (c->container >= 0) nvp_dma_unmap(c, (uint64_t)(uintptr_t)c->own[i].p, c->own[i].len);
        munmap(c->own[i].p, c->own[i].len);
    }
    if (c->bar) munmap((void *)c->bar, c->bar_len);
    if (c->device >= 0) close(c->device);
    if (c->group >= 0) close(c->group);
    if (c->container >= 0) close(c->container);
    pthread_mutex_destroy(&c->admin_lock);
    pthread_mutex_destroy(&c->q_lock);
    pthread_mutex_destroy(&c->tmo_lock);
    free(c);
}

/* BAR0: the whole region, or the mmap-able area at its start (the MSI-X table may not be). */
static int map_bar0(struct nvp_ctrlr *c, char *err, size_t errlen)
{
    size_t argsz = sizeof(struct vfio_region_info) + 4096;
    struct vfio_region_info *ri = calloc(1, argsz);
    if (!ri) return -ENOMEM;
    ri->argsz = (uint32_t)argsz;
    ri->index = VFIO_PCI_BAR0_REGION_INDEX;
    if (ioctl(c->device, VFIO_DEVICE_GET_REGION_INFO, ri) < 0) {
        int rc = -errno;
        seterr(err, errlen, "VFIO_DEVICE_GET_REGION_INFO (BAR0): %s", strerror(errno));
        free(ri);
        return rc;
    }
    if (!(ri->flags & VFIO_REGION_INFO_FLAG_MMAP) || ri->size < 0x2000) {
        seterr(err, errlen, "BAR0 cannot be mapped (flags %#x, size %llu): not an NVMe controller's BAR",
               ri->flags, (unsigned long long)ri->size);
        free(ri);
        return -ENODEV;
    }
    size_t len = ri->size;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, c->device, (off_t)ri->offset);
    if (p == MAP_FAILED && (ri->flags & VFIO_REGION_INFO_FLAG_CAPS) && ri->cap_offset) {
        /* Sparse mmap areas: take the one at offset 0 (registers and doorbells). */
        struct vfio_info_cap_header *h = (void *)((uint8_t *)ri + ri->cap_offset);
        for (;;) {
            if (h->id == VFIO_REGION_INFO_CAP_SPARSE_MMAP) {
                struct vfio_region_info_cap_sparse_mmap *s = (void *)h;
                for (uint32_t i = 0; i < s->nr_areas; i++)
                    if (s->areas[i].offset == 0 && s->areas[i].size >= 0x2000) {
                        len = s->areas[i].size;
                        p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, c->device, (off_t)ri->offset);
                        break;
                    }
                break;
            }
            if (!h->next) break;
            h = (void *)((uint8_t *)ri + h->next);
        }
    }
    free(ri);
    if (p == MAP_FAILED) {
        int rc = -errno;
        seterr(err, errlen, "cannot mmap BAR0: %s", strerror(errno));
        return rc;
    }
    c->bar = p;
    c->bar_len = len;
    return 0;
}

void *nvp_open(const char *bdf, char *err, size_t errlen)
{
    struct nvp_ctrlr *c = calloc(1, sizeof(*c));
    if (!c) { seterr(err, errlen, "out of memory"); return NULL; }
    atomic_init(&c->refs, 1);
    atomic_init(&c->failed, 0);
    c->container = c->group = c->device = c->req_fd = -1;
    pthread_mutex_init(&c->admin_lock, NULL);
    pthread_mutex_init(&c->q_lock, NULL);
    pthread_mutex_init(&c->tmo_lock, NULL);
    c->tmo_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (c->tmo_fd < 0) { seterr(err, errlen, "eventfd: %s", strerror(errno)); goto fail; }
    c->io_timeout_ms = 30000;
    c->max_xfer = MAX_CMD_BYTES;

    char path[PATH_MAX], link[PATH_MAX];
    snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", bdf);
    ssize_t n = readlink(path, link, sizeof(link) - 1);
    if (n < 0) {
        seterr(err, errlen, "%s has no IOMMU group (%s): enable the IOMMU (intel_iommu=on / amd_iommu=on)",
               bdf, strerror(errno));
        goto fail;
    }
    link[n] = 0;
    const char *grp = strrchr(link, '/');
    grp = grp ? grp + 1 : link;

    c->container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
    if (c->container < 0) {
        seterr(err, errlen, "cannot open /dev/vfio/vfio: %s (load the vfio and vfio_iommu_type1 modules)",
               strerror(errno));
        goto fail;
    }
    if (ioctl(c->container, VFIO_GET_API_VERSION) != VFIO_API_VERSION) {
        seterr(err, errlen, "unknown VFIO API version");
        goto fail;
    }
    int type = ioctl(c->container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) > 0 ? VFIO_TYPE1v2_IOMMU
             : ioctl(c->container, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU) > 0 ? VFIO_TYPE1_IOMMU : -1;
    if (type < 0) {
        seterr(err, errlen, "the VFIO container offers no type-1 IOMMU (load vfio_iommu_type1)");
        goto fail;
    }
    snprintf(path, sizeof(path), "/dev/vfio/%s", grp);
    c->group = open(path, O_RDWR | O_CLOEXEC);
    if (c->group < 0) {
        seterr(err, errlen, "cannot open %s (IOMMU group of %s): %s%s", path, bdf, strerror(errno),
               errno == EBUSY ? " (another process holds the group)" : "");
        goto fail;
    }
    struct vfio_group_status gs = {.argsz = sizeof(gs)};
    if (ioctl(c->group, VFIO_GROUP_GET_STATUS, &gs) < 0 || !(gs.flags & VFIO_GROUP_FLAGS_VIABLE)) {
        seterr(err, errlen, "IOMMU group %s of %s is not viable: every device in /sys/kernel/iommu_groups/%s/"
               "devices must be bound to vfio-pci (or no driver)", grp, bdf, grp);
        errno = EBUSY;
        goto fail;
    }
    if (ioctl(c->group, VFIO_GROUP_SET_CONTAINER, &c->container) < 0) {
        seterr(err, errlen, "VFIO_GROUP_SET_CONTAINER: %s", strerror(errno));
        goto fail;
    }
    if (ioctl(c->container, VFIO_SET_IOMMU, type) < 0) {
        seterr(err, errlen, "VFIO_SET_IOMMU: %s", strerror(errno));
        goto fail;
    }
    c->device = ioctl(c->group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    if (c->device < 0) {
        seterr(err, errlen, "VFIO_GROUP_GET_DEVICE_FD %s: %s", bdf, strerror(errno));
        goto fail;
    }
    struct vfio_region_info cfg = {.argsz = sizeof(cfg), .index = VFIO_PCI_CONFIG_REGION_INDEX};
    if (ioctl(c->device, VFIO_DEVICE_GET_REGION_INFO, &cfg) < 0) {
        seterr(err, errlen, "VFIO_DEVICE_GET_REGION_INFO (config space): %s", strerror(errno));
        goto fail;
    }
    c->cfg_off = cfg.offset;
    if (map_bar0(c, err, errlen) < 0) { errno = ENODEV; goto fail; }
    /* Memory space and bus mastering on, legacy interrupts off. */
    uint16_t cmd;
    if (cfg_rw(c, &cmd, 2, 4, 0) < 0) { seterr(err, errlen, "cannot read the PCI command register"); goto fail; }
    cmd |= 0x2 | 0x4 | 0x400;
    if (cfg_rw(c, &cmd, 2, 4, 1) < 0) { seterr(err, errlen, "cannot enable bus mastering"); goto fail; }
    c->cap = rd64(c, REG_CAP);
    c->dstrd = (uint32_t)(c->cap >> 32) & 0xf;
    return c;
fail:;
    int saved = errno;
    release(c);
    errno = saved;
    return NULL;
}

uint64_t nvp_cap(void *ctrlr) { return ((struct nvp_ctrlr *)ctrlr)->cap; }
uint32_t nvp_vs(void *ctrlr) { return rd32(ctrlr, REG_VS); }

static int wait_rdy(struct nvp_ctrlr *c, uint32_t want, uint32_t timeout_ms)
{
    uint64_t deadline = now_ms_precise() + timeout_ms;
    for (;;) {
        uint32_t csts = rd32(c, REG_CSTS);
        if (csts == 0xffffffffu) return -ENODEV;
        if ((csts & 1) == want) return 0;
        if (want && (csts & 2)) return -EIO;       /* CFS */
        if (now_ms_precise() > deadline) return -ETIMEDOUT;
        usleep(1000);
    }
}

int nvp_enable(void *ctrlr, uint32_t timeout_ms, char *err, size_t errlen)
{
    struct nvp_ctrlr *c = ctrlr;
    uint32_t to = (uint32_t)((c->cap >> 24) & 0xff) * 500;
    if (!to || to > timeout_ms) to = timeout_ms;
    if (((c->cap >> 48) & 0xf) != 0) {
        seterr(err, errlen, "the controller's smallest memory page is above 4 KiB (CAP.MPSMIN %u)",
               (unsigned)((c->cap >> 48) & 0xf));
        return -ENOTSUP;
    }
    if (!((c->cap >> 37) & 1)) {
        seterr(err, errlen, "the controller does not support the NVM command set (CAP.CSS)");
        return -ENOTSUP;
    }
    uint32_t cc = rd32(c, REG_CC);
    if (cc & 1) {
        wr32(c, REG_CC, cc & ~1u);
    }
    int rc = wait_rdy(c, 0, to);
    if (rc < 0) {
        seterr(err, errlen, "the controller did not become ready for reset (CSTS.RDY stays 1): %s", strerror(-rc));
        return rc;
    }
    if (!c->asq) {
        c->asq = dma_alloc(c, ADMIN_DEPTH * sizeof(struct sqe), &rc);
        if (c->asq) c->acq = dma_alloc(c, ADMIN_DEPTH * sizeof(struct cqe), &rc);
        if (c->acq) c->abuf = dma_alloc(c, PG, &rc);
        if (!c->abuf) {
            seterr(err, errlen, "cannot allocate and DMA-map the admin queue: %s%s", strerror(-rc),
                   rc == -EINVAL || rc == -ENOSPC || rc == -EFAULT
                   ? " (an IOMMU address width below the host's virtual addresses? QEMU: -device "
                     "intel-iommu,aw-bits=48)" : "");
            return rc;
        }
    }
    memset(c->asq, 0, ADMIN_DEPTH * sizeof(struct sqe));
    memset((void *)c->acq, 0, ADMIN_DEPTH * sizeof(struct cqe));
    c->asq_tail = c->acq_head = 0;
    c->aphase = 1;
    wr32(c, REG_AQA, (ADMIN_DEPTH - 1) << 16 | (ADMIN_DEPTH - 1));
    wr64(c, REG_ASQ, (uint64_t)(uintptr_t)c->asq);
    wr64(c, REG_ACQ, (uint64_t)(uintptr_t)c->acq);
    /* IOCQES 16 bytes (4), IOSQES 64 bytes (6), MPS 4 KiB, NVM command set, round robin. */
    wr32(c, REG_CC, (4u << 20) | (6u << 16) | 1u);
    rc = wait_rdy(c, 1, to);
    if (rc < 0) {
        seterr(err, errlen, "the controller did not become ready (CSTS %#x): %s", rd32(c, REG_CSTS),
               rc == -EIO ? "controller fatal status" : strerror(-rc));
        return rc;
    }
    return 0;
}

/* ------------------------------------------------------------------ admin */

int nvp_admin(void *ctrlr, const uint8_t *sqe_in, void *buf, uint32_t len, int to_ctrlr, uint32_t timeout_ms,
              uint8_t *cqe_out, char *err, size_t errlen)
{
    struct nvp_ctrlr *c = ctrlr;
    if (len > PG) { seterr(err, errlen, "admin data above 4 KiB"); return -EINVAL; }
    if (atomic_load(&c->failed)) { seterr(err, errlen, "the controller is gone"); return -ENODEV; }
    pthread_mutex_lock(&c->admin_lock);
    uint16_t cid = ++c->acid;
    struct sqe s;
    memcpy(&s, sqe_in, sizeof(s));
    s.cdw0 = (s.cdw0 & 0xffff) | (uint32_t)cid << 16;
    if (len) {
        if (to_ctrlr) memcpy(c->abuf, buf, len);
        else memset(c->abuf, 0, PG);
        s.prp1 = (uint64_t)(uintptr_t)c->abuf;
        s.prp2 = 0;
    }
    c->asq[c->asq_tail] = s;
    c->asq_tail = (uint16_t)((c->asq_tail + 1) % ADMIN_DEPTH);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    *doorbell(c, 0, 0) = c->asq_tail;
    uint64_t deadline = now_ms_precise() + timeout_ms;
    int rc = 0;
    for (;;) {
        volatile struct cqe *e = &c->acq[c->acq_head];
        uint16_t st = e->status;
        if ((st & 1) == c->aphase) {
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            struct cqe got;
            got.dw0 = e->dw0; got.dw1 = e->dw1; got.sqhd = e->sqhd; got.sqid = e->sqid; got.cid = e->cid;
            got.status = st;
            c->acq_head = (uint16_t)((c->acq_head + 1) % ADMIN_DEPTH);
            if (c->acq_head == 0) c->aphase ^= 1;
            *doorbell(c, 0, 1) = c->acq_head;
            if (got.cid != cid) continue;       /* a late answer to a command that timed out */
            if (cqe_out) memcpy(cqe_out, &got, sizeof(got));
            if (got.status >> 1) {
                seterr(err, errlen, "admin command %#x failed: status type %u code %#x", s.cdw0 & 0xff,
                       (got.status >> 9) & 7, (got.status >> 1) & 0xff);
                rc = -EREMOTEIO;
            } else if (len && !to_ctrlr) {
                memcpy(buf, c->abuf, len);
            }
            break;
        }
        if (now_ms_precise() > deadline) {
            uint32_t csts = rd32(c, REG_CSTS);
            seterr(err, errlen, "admin command %#x not answered within %u ms (CSTS %#x)", s.cdw0 & 0xff,
                   timeout_ms, csts);
            rc = csts == 0xffffffffu ? -ENODEV : -ETIMEDOUT;
            break;
        }
        usleep(50);
    }
    pthread_mutex_unlock(&c->admin_lock);
    return rc;
}

void nvp_set_limits(void *ctrlr, uint32_t max_xfer_bytes, int sgl, uint32_t io_timeout_ms)
{
    struct nvp_ctrlr *c = ctrlr;
    c->max_xfer = max_xfer_bytes && max_xfer_bytes < MAX_CMD_BYTES ? max_xfer_bytes : MAX_CMD_BYTES;
    c->sgl = sgl;
    c->io_timeout_ms = io_timeout_ms ? io_timeout_ms : 30000;
}

/* MSI-X: vector 0 (the admin queue's, left unused: the control plane polls it) and one eventfd
 * per I/O queue pair, vector = qid.  Returns the vectors enabled, 0 when there are too few. */
static int setup_msix(struct nvp_ctrlr *c, uint16_t count, int *fds)
{
    struct vfio_irq_info ii = {.argsz = sizeof(ii), .index = VFIO_PCI_MSIX_IRQ_INDEX};
    if (ioctl(c->device, VFIO_DEVICE_GET_IRQ_INFO, &ii) < 0 || ii.count < (uint32_t)count + 1) return 0;
    size_t sz = sizeof(struct vfio_irq_set) + sizeof(int32_t) * (count + 1u);
    struct vfio_irq_set *set = calloc(1, sz);
    if (!set) return 0;
    int32_t *data = (int32_t *)set->data;
    data[0] = -1;
    for (uint16_t i = 0; i < count; i++) {
        fds[i] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        data[i + 1] = fds[i];
    }
    set->argsz = (uint32_t)sz;
    set->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    set->index = VFIO_PCI_MSIX_IRQ_INDEX;
    set->start = 0;
    set->count = count + 1u;
    int ok = 1;
    for (uint16_t i = 0; i < count; i++) ok &= fds[i] >= 0;
    if (!ok || ioctl(c->device, VFIO_DEVICE_SET_IRQS, set) < 0) {
        for (uint16_t i = 0; i < count; i++) if (fds[i] >= 0) close(fds[i]), fds[i] = -1;
        free(set);
        return 0;
    }
    free(set);
    return count + 1;
}

int nvp_create_io_queues(void *ctrlr, uint16_t count, uint16_t depth, uint32_t timeout_ms, char *err,
                         size_t errlen)
{
    struct nvp_ctrlr *c = ctrlr;
    uint32_t mqes = (uint32_t)(c->cap & 0xffff) + 1;
    if (depth > mqes) depth = (uint16_t)mqes;
    if (count > MAX_QPAIRS) count = MAX_QPAIRS;
    int made = 0;
    int fds[MAX_QPAIRS];
    for (int i = 0; i < MAX_QPAIRS; i++) fds[i] = -1;
    if (c->nq == 0) c->msix = setup_msix(c, count, fds);
    for (uint16_t i = 0; i < count; i++) {
        struct nvp_qpair *q = &c->qp[c->nq];
        int rc = 0;
        memset(q, 0, sizeof(*q));
        q->c = c;
        q->qid = (uint16_t)(c->nq + 1);
        q->depth = depth;
        q->irq_fd = fds[i];
        fds[i] = -1;
        q->sq = dma_alloc(c, (size_t)depth * sizeof(struct sqe) + (size_t)depth * sizeof(struct cqe), &rc);
        if (q->sq) q->pages = dma_alloc(c, (size_t)depth * PG, &rc);
        if (q->pages) q->bounce = dma_alloc(c, (size_t)NBOUNCE * BOUNCE_BYTES, &rc);
        q->bounce_free = (1u << NBOUNCE) - 1;
        q->cmds = calloc(depth, sizeof(*q->cmds));
        q->free_cids = calloc(depth, sizeof(*q->free_cids));
        if (!q->sq || !q->pages || !q->bounce || !q->cmds || !q->free_cids) {
            free(q->cmds), free(q->free_cids);
            if (q->irq_fd >= 0) close(q->irq_fd);
            for (int k = 0; k < MAX_QPAIRS; k++) if (fds[k] >= 0) close(fds[k]);
            seterr(err, errlen, "cannot allocate I/O queue %u: %s", q->qid, strerror(rc ? -rc : ENOMEM));
            return made ? made : (rc ? rc : -ENOMEM);
        }
        q->cq = (volatile struct cqe *)((uint8_t *)q->sq + (size_t)depth * sizeof(struct sqe));
        q->phase = 1;
        /* CIDs: 0 .. depth-2 (a queue of depth N holds N-1 commands). */
        for (uint16_t k = 0; k + 1 < depth; k++) q->free_cids[q->nfree++] = (uint16_t)(depth - 2 - k);
        uint8_t sqe[64] = {0}, cqe[16];
        struct sqe *s = (struct sqe *)sqe;
        s->cdw0 = 0x05;         /* Create I/O Completion Queue */
        s->prp1 = (uint64_t)(uintptr_t)q->cq;
        s->cdw10 = (uint32_t)(depth - 1) << 16 | q->qid;
        /* Physically contiguous; with MSI-X, interrupts on vector qid. */
        s->cdw11 = q->irq_fd >= 0 ? ((uint32_t)q->qid << 16 | 2u | 1u) : 1u;
        rc = nvp_admin(c, sqe, NULL, 0, 0, timeout_ms, cqe, err, errlen);
        if (rc == 0) {
            memset(sqe, 0, sizeof(sqe));
            s->cdw0 = 0x01;     /* Create I/O Submission Queue */
            s->prp1 = (uint64_t)(uintptr_t)q->sq;
            s->cdw10 = (uint32_t)(depth - 1) << 16 | q->qid;
            s->cdw11 = (uint32_t)q->qid << 16 | 1;
            rc = nvp_admin(c, sqe, NULL, 0, 0, timeout_ms, cqe, err, errlen);
        }
        if (rc < 0) {
            free(q->cmds), free(q->free_cids);
            if (q->irq_fd >= 0) close(q->irq_fd);
            for (int k = 0; k < MAX_QPAIRS; k++) if (fds[k] >= 0) close(fds[k]);
            return made ? made : rc;
        }
        q->sq_db = doorbell(c, q->qid, 0);
        q->cq_db = doorbell(c, q->qid, 1);
        c->nq++;
        made++;
    }
    return made;
}

/* ------------------------------------------------------------------ reset */

int nvp_reset_begin(void *ctrlr, uint32_t timeout_ms)
{
    struct nvp_ctrlr *c = ctrlr;
    unsigned gen = atomic_fetch_add(&c->reset_gen, 1) + 1;
    if (!(gen & 1)) gen = atomic_fetch_add(&c->reset_gen, 1) + 1;     /* was odd already (a failed reset) */
    uint64_t one = 1;
    for (int i = 0; i < c->nq; i++)             /* wake interrupt-mode reactors: they poll, see it, ack */
        if (c->qp[i].irq_fd >= 0 && write(c->qp[i].irq_fd, &one, sizeof(one)) < 0) { /* counter full */ }
    uint64_t deadline = now_ms_precise() + timeout_ms;
    for (;;) {
        int all = 1;
        pthread_mutex_lock(&c->q_lock);
        for (int i = 0; i < c->nq; i++)
            if (c->qp[i].refs && atomic_load_explicit(&c->qp[i].acked_gen, memory_order_acquire) != gen) all = 0;
        pthread_mutex_unlock(&c->q_lock);
        if (all) return 0;
        if (now_ms_precise() > deadline) return -ETIMEDOUT;
        usleep(1000);
    }
}

int nvp_reset_queues(void *ctrlr, uint32_t timeout_ms, char *err, size_t errlen)
{
    struct nvp_ctrlr *c = ctrlr;
    for (int i = 0; i < c->nq; i++) {
        struct nvp_qpair *q = &c->qp[i];
        memset(q->sq, 0, (size_t)q->depth * (sizeof(struct sqe) + sizeof(struct cqe)));
        memset(q->cmds, 0, (size_t)q->depth * sizeof(*q->cmds));
        q->nfree = 0;
        for (uint16_t k = 0; k + 1 < q->depth; k++) q->free_cids[q->nfree++] = (uint16_t)(q->depth - 2 - k);
        q->sq_tail = q->cq_head = 0;
        q->phase = 1;
        q->outstanding = 0;
        q->bounce_free = (1u << NBOUNCE) - 1;
        q->pend_head = q->pend_tail = NULL;
        q->next_check_ms = 0;
        uint8_t sqe[64] = {0}, cqe[16];
        struct sqe *s = (struct sqe *)sqe;
        s->cdw0 = 0x05;         /* Create I/O Completion Queue, as at attach */
        s->prp1 = (uint64_t)(uintptr_t)q->cq;
        s->cdw10 = (uint32_t)(q->depth - 1) << 16 | q->qid;
        s->cdw11 = q->irq_fd >= 0 ? ((uint32_t)q->qid << 16 | 2u | 1u) : 1u;
        int rc = nvp_admin(c, sqe, NULL, 0, 0, timeout_ms, cqe, err, errlen);
        if (rc == 0) {
            memset(sqe, 0, sizeof(sqe));
            s->cdw0 = 0x01;     /* Create I/O Submission Queue */
            s->prp1 = (uint64_t)(uintptr_t)q->sq;
            s->cdw10 = (uint32_t)(q->depth - 1) << 16 | q->qid;
            s->cdw11 = (uint32_t)q->qid << 16 | 1;
            rc = nvp_admin(c, sqe, NULL, 0, 0, timeout_ms, cqe, err, errlen);
        }
        if (rc < 0) return rc;
    }
    return 0;
}

void nvp_reset_end(void *ctrlr)
{
    struct nvp_ctrlr *c = ctrlr;
    pthread_mutex_lock(&c->tmo_lock);
    c->ntmo = 0;                                /* commands of the old queues */
    pthread_mutex_unlock(&c->tmo_lock);
    atomic_fetch_add_explicit(&c->reset_gen, 1, memory_order_release);
}

int nvp_request_eventfd(void *ctrlr)
{
    struct nvp_ctrlr *c = ctrlr;
    if (c->req_fd >= 0) return c->req_fd;
    struct vfio_irq_info ii = {.argsz = sizeof(ii), .index = VFIO_PCI_REQ_IRQ_INDEX};
    if (ioctl(c->device, VFIO_DEVICE_GET_IRQ_INFO, &ii) < 0) return -errno;
    if (ii.count < 1) return -ENOTSUP;
    int fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0) return -errno;
    struct { struct vfio_irq_set s; int32_t fd; } set;
    memset(&set, 0, sizeof(set));
    set.s.argsz = sizeof(set);
    set.s.flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    set.s.index = VFIO_PCI_REQ_IRQ_INDEX;
    set.s.start = 0;
    set.s.count = 1;
    set.fd = fd;
    if (ioctl(c->device, VFIO_DEVICE_SET_IRQS, &set) < 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    c->req_fd = fd;
    return fd;
}

int nvp_timeout_eventfd(void *ctrlr)
{
    return ((struct nvp_ctrlr *)ctrlr)->tmo_fd;
}

int nvp_take_timed_out(void *ctrlr, uint32_t *out, int max)
{
    struct nvp_ctrlr *c = ctrlr;
    pthread_mutex_lock(&c->tmo_lock);
    int n = (int)c->ntmo < max ? (int)c->ntmo : max;
    memcpy(out, c->tmo, (size_t)n * sizeof(*out));
    memmove(c->tmo, c->tmo + n, (c->ntmo - (uint32_t)n) * sizeof(*out));
    c->ntmo -= (uint32_t)n;
    pthread_mutex_unlock(&c->tmo_lock);
    return n;
}

static void timed_out(struct nvp_ctrlr *c, uint16_t qid, uint16_t cid)
{
    pthread_mutex_lock(&c->tmo_lock);
    if (c->ntmo < sizeof(c->tmo) / sizeof(c->tmo[0])) c->tmo[c->ntmo++] = qid | (uint32_t)cid << 16;
    pthread_mutex_unlock(&c->tmo_lock);
    uint64_t one = 1;
    if (write(c->tmo_fd, &one, sizeof(one)) < 0) { /* EAGAIN: already signalled */ }
}

void nvp_fail(void *ctrlr, int fail)
{
    atomic_store(&((struct nvp_ctrlr *)ctrlr)->failed, fail);
}

void nvp_get_stats(void *ctrlr, struct nvp_stats *out)
{
    struct nvp_ctrlr *c = ctrlr;
    uint64_t *dst = (uint64_t *)out;
    const uint64_t *src = (const uint64_t *)&c->st;
    for (size_t i = 0; i < offsetof(struct nvp_stats, last_status) / 8; i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    out->last_status = __atomic_load_n(&c->st.last_status, __ATOMIC_RELAXED);
    out->reserved = 0;
}

int nvp_interrupts(void *ctrlr)
{
    return ((struct nvp_ctrlr *)ctrlr)->msix;
}

int nvp_queues_in_use(void *ctrlr)
{
    struct nvp_ctrlr *c = ctrlr;
    int n = 0;
    pthread_mutex_lock(&c->q_lock);
    for (int i = 0; i < c->nq; i++) n += c->qp[i].refs > 0;
    pthread_mutex_unlock(&c->q_lock);
    return n;
}

void nvp_shutdown(void *ctrlr, uint32_t timeout_ms)
{
    struct nvp_ctrlr *c = ctrlr;
    uint32_t csts = rd32(c, REG_CSTS);
    if (csts == 0xffffffffu || !(rd32(c, REG_CC) & 1)) return;
    wr32(c, REG_CC, (rd32(c, REG_CC) & ~(3u << 14)) | (1u << 14));      /* normal shutdown */
    uint64_t deadline = now_ms_precise() + timeout_ms;
    while (((csts = rd32(c, REG_CSTS)) >> 2 & 3) != 2 && csts != 0xffffffffu && now_ms_precise() < deadline)
        usleep(1000);
}

void nvp_put(void *ctrlr)
{
    struct nvp_ctrlr *c = ctrlr;
    if (atomic_fetch_sub(&c->refs, 1) == 1) release(c);
}

/* ------------------------------------------------------------------ I/O path */

static void io_finish(vn_bdev_io *io, struct nvp_ctrlr *c)
{
    struct nvp_io *s = IOS(io);
    int st = s->status;
    uint32_t t = io->type < 6 ? io->type : 5;
    if (st) {
        STAT_ADD(c, errors[t], 1);
    } else {
        STAT_ADD(c, ops[t], 1);
        if (io->type == VN_IO_READ) STAT_ADD(c, bytes_read, io->num_blocks * io->desc->block_size);
        else if (io->type == VN_IO_WRITE) STAT_ADD(c, bytes_written, io->num_blocks * io->desc->block_size);
    }
    io->cb(io, st);
}

/* Data pointer of a command for bytes [skip, skip+len) of io's iovecs: PRPs when the
 * buffers allow (every segment but the first starts on a page, every one but the last
 * ends on one), else an SGL when the controller takes them.  page: the slot's page. */
static int build_dptr(struct nvp_qpair *q, vn_bdev_io *io, uint64_t skip, uint32_t len, struct sqe *s,
                      uint8_t *page)
{
    struct iovec v[SGL_MAX];
    int n = vn_iov_slice(io->iov, io->iovcnt, skip, len, v, SGL_MAX);
    if (n <= 0) return -EINVAL;
    int prp_ok = ((uintptr_t)v[0].iov_base & 3) == 0;
    for (int i = 0; prp_ok && i < n; i++) {
        uintptr_t a = (uintptr_t)v[i].iov_base, e = a + v[i].iov_len;
        if ((i > 0 && (a & (PG - 1))) || (i < n - 1 && (e & (PG - 1)))) prp_ok = 0;
    }
    if (prp_ok) {
        uint64_t *list = (uint64_t *)page;
        uint32_t nent = 0;
        s->prp1 = (uint64_t)(uintptr_t)v[0].iov_base;
        for (int i = 0; i < n; i++) {
            uintptr_t a = (uintptr_t)v[i].iov_base, e = a + v[i].iov_len;
            uintptr_t pgs = i == 0 ? (a & ~(uintptr_t)(PG - 1)) + PG : a;
            for (uintptr_t p = pgs; p < e; p += PG) {
                if (nent >= PG / 8) return -E2BIG;
                list[nent++] = p;
            }
        }
        if (nent == 0) s->prp2 = 0;
        else if (nent == 1) s->prp2 = list[0];
        else {
            s->prp2 = (uint64_t)(uintptr_t)list;
            STAT_ADD(q->c, prp_lists, 1);
        }
        return 0;
    }
    if (!q->c->sgl) return -EINVAL;
    s->cdw0 |= 1u << 14;                        /* PSDT: SGL for data */
    uint8_t *d = (uint8_t *)&s->prp1;           /* SGL1 occupies DPTR (16 bytes) */
    if (n == 1) {
        uint64_t a = (uint64_t)(uintptr_t)v[0].iov_base;
        uint32_t l = (uint32_t)v[0].iov_len;
        memcpy(d, &a, 8); memcpy(d + 8, &l, 4); memset(d + 12, 0, 4);
        d[15] = 0x00;                           /* data block */
    } else {
        for (int i = 0; i < n; i++) {
            uint8_t *e = page + 16 * i;
            uint64_t a = (uint64_t)(uintptr_t)v[i].iov_base;
            uint32_t l = (uint32_t)v[i].iov_len;
            memcpy(e, &a, 8); memcpy(e + 8, &l, 4); memset(e + 12, 0, 4);
            e[15] = 0x00;
        }
        uint64_t a = (uint64_t)(uintptr_t)page;
        uint32_t l = (uint32_t)(16 * n);
        memcpy(d, &a, 8); memcpy(d + 8, &l, 4); memset(d + 12, 0, 4);
        d[15] = 0x30;                           /* last segment */
    }
    STAT_ADD(q->c, sgls, 1);
    return 0;
}

static void pend_push(struct nvp_qpair *q, vn_bdev_io *io)
{
    IOS(io)->next = NULL;
    IOS(io)->queued = 1;
    if (q->pend_tail) IOS(q->pend_tail)->next = io;
    else q->pend_head = io;
    q->pend_tail = io;
}

/* Submit what of io still waits to be submitted.  Returns 1 when it ran out of slots (io
 * must wait), 0 otherwise (everything submitted, or io completed). */
static int drive(struct nvp_qpair *q, vn_bdev_io *io)
{
    struct nvp_io *s = IOS(io);
    struct nvp_ctrlr *c = q->c;
    uint32_t bs = io->desc->block_size;
    int rang = 0;
    while (s->next_block < s->end_block) {
        if (!q->nfree) { if (rang) break; return 1; }
        uint16_t cid = q->free_cids[--q->nfree];
        struct sqe cmd;
        memset(&cmd, 0, sizeof(cmd));
        cmd.nsid = s->ns->nsid;
        uint64_t nb = s->end_block - s->next_block;
        uint8_t *page = q->pages + (size_t)cid * PG;
        int rc = 0, bounce = -1;
        switch (io->type) {
        case VN_IO_READ:
        case VN_IO_WRITE: {
            uint64_t maxb = c->max_xfer / bs;
            if (nb > maxb) nb = maxb;
            if (nb > 65536) nb = 65536;
            cmd.cdw0 = io->type == VN_IO_READ ? 0x02 : 0x01;
            cmd.cdw10 = (uint32_t)s->next_block;
            cmd.cdw11 = (uint32_t)(s->next_block >> 32);
            cmd.cdw12 = (uint32_t)(nb - 1);
            rc = build_dptr(q, io, (s->next_block - io->offset_blocks) * bs, (uint32_t)(nb * bs), &cmd, page);
            if (rc == -EINVAL && bs <= BOUNCE_BYTES) {
                /* Neither PRPs nor SGLs describe these buffers: copy through a bounce buffer. */
                if (!q->bounce_free) {
                    q->free_cids[q->nfree++] = cid;
                    if (rang) goto out;
                    return 1;                   /* waits like a request without a slot */
                }
                int b = __builtin_ctz(q->bounce_free);
                if (nb > BOUNCE_BYTES / bs) nb = BOUNCE_BYTES / bs;
                cmd.cdw12 = (uint32_t)(nb - 1);
                uint8_t *buf = q->bounce + (size_t)b * BOUNCE_BYTES;
                uint64_t skip = (s->next_block - io->offset_blocks) * bs;
                if (io->type == VN_IO_WRITE) vn_iov_copy_from(io->iov, io->iovcnt, skip, buf, nb * bs);
                struct iovec bv = {buf, nb * bs};
                vn_bdev_io tmp;
                tmp.iov = &bv;
                tmp.iovcnt = 1;
                cmd.cdw0 &= ~(3u << 14);
                rc = build_dptr(q, &tmp, 0, (uint32_t)(nb * bs), &cmd, page);
                if (rc == 0) {
                    q->bounce_free &= ~(1u << b);
                    bounce = b;
                    q->cmds[cid].bskip = skip;
                    STAT_ADD(c, bounced, 1);
                }
            }
            break;
        }
        case VN_IO_WRITE_ZEROES:
            if (nb > 65536) nb = 65536;
            cmd.cdw0 = 0x08;
            cmd.cdw10 = (uint32_t)s->next_block;
            cmd.cdw11 = (uint32_t)(s->next_block >> 32);
            cmd.cdw12 = (uint32_t)(nb - 1);
            break;
        case VN_IO_UNMAP: {
            if (nb > 0x80000000ull) nb = 0x80000000ull;
            uint32_t r[4] = {0, (uint32_t)nb, (uint32_t)s->next_block, (uint32_t)(s->next_block >> 32)};
            memcpy(page, r, sizeof(r));
            cmd.cdw0 = 0x09;
            cmd.cdw10 = 0;                      /* one range */
            cmd.cdw11 = 1u << 2;                /* deallocate */
            cmd.prp1 = (uint64_t)(uintptr_t)page;
            break;
        }
        case VN_IO_FLUSH:
            cmd.cdw0 = 0x00;                    /* its one "block" [0, 1) is the command */
            nb = 1;
            break;
        default:
            rc = -ENOTSUP;
        }
        if (rc < 0) {
            q->free_cids[q->nfree++] = cid;
            if (rc == -EINVAL) STAT_ADD(c, unaligned, 1);
            s->status = rc;
            s->end_block = s->next_block;       /* submit no more; complete once parts return */
            break;
        }
        q->cmds[cid].bounce = (int8_t)bounce;
        q->cmds[cid].bytes = (uint32_t)(nb * bs);
        cmd.cdw0 |= (uint32_t)cid << 16;
        q->cmds[cid].io = io;
        q->cmds[cid].abandoned = 0;
        q->cmds[cid].deadline_ms = now_ms() + c->io_timeout_ms;
        q->sq[q->sq_tail] = cmd;
        q->sq_tail = (uint16_t)(q->sq_tail + 1 == q->depth ? 0 : q->sq_tail + 1);
        q->outstanding++;
        s->parts_out++;
        s->next_block += nb;
        rang = 1;
        STAT_ADD(c, commands, 1);
    }
out:
    if (rang) {
        __atomic_thread_fence(__ATOMIC_RELEASE);
        *q->sq_db = q->sq_tail;
    }
    if (s->parts_out == 0 && (s->next_block >= s->end_block)) {
        io_finish(io, c);
        return 0;
    }
    return s->next_block < s->end_block;       /* more to submit: waits for a slot or a bounce buffer */
}

static void fail_all(struct nvp_qpair *q, int status)
{
    struct nvp_ctrlr *c = q->c;
    while (q->pend_head) {
        vn_bdev_io *io = q->pend_head;
        q->pend_head = IOS(io)->next;
        if (!q->pend_head) q->pend_tail = NULL;
        IOS(io)->queued = 0;
        IOS(io)->end_block = IOS(io)->next_block;
        if (!IOS(io)->status) IOS(io)->status = status;
        if (IOS(io)->parts_out == 0) { STAT_ADD(c, failed_removed, 1); io_finish(io, c); }
    }
    for (uint16_t cid = 0; cid < q->depth; cid++) {
        struct nvp_cmd *cmd = &q->cmds[cid];
        if (!cmd->io || cmd->abandoned) continue;
        vn_bdev_io *io = cmd->io;
        cmd->abandoned = 1;                     /* the device is gone: the slot is never reused */
        q->outstanding--;
        struct nvp_io *s = IOS(io);
        if (!s->status) s->status = status;
        s->end_block = s->next_block;
        if (--s->parts_out == 0) { STAT_ADD(c, failed_removed, 1); io_finish(io, c); }
    }
}

static int qpair_poll(struct nvp_qpair *q)
{
    struct nvp_ctrlr *c = q->c;
    int done = 0;
    if (q->irq_mode) {
        /* Reset the interrupt before looking at the queue: a completion posted after this read
         * signals anew, one posted before is seen below (the fd is level-triggered). */
        uint64_t v;
        if (read(q->irq_fd, &v, sizeof(v)) < 0) { /* EAGAIN: no interrupt */ }
    }
    if (__builtin_expect(atomic_load_explicit(&c->failed, memory_order_relaxed), 0)) {
        if (q->outstanding || q->pend_head) { fail_all(q, -EIO); return 1; }
        return 0;
    }
    unsigned gen = atomic_load_explicit(&c->reset_gen, memory_order_acquire);
    if (__builtin_expect(gen & 1, 0)) {
        /* A reset: fail what is queued and in flight, then leave the queue to the control
         * plane (which re-creates it) until the reset ends. */
        if (atomic_load_explicit(&q->acked_gen, memory_order_relaxed) == gen) return 0;
        int had = q->outstanding || q->pend_head;
        fail_all(q, -EIO);
        atomic_store_explicit(&q->acked_gen, gen, memory_order_release);
        return had;
    }
    if (!q->outstanding && !q->pend_head) return 0;
    for (;;) {
        volatile struct cqe *e = &q->cq[q->cq_head];
        uint16_t st = e->status;
        if ((st & 1) != q->phase) break;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint16_t cid = e->cid;
        q->cq_head = (uint16_t)(q->cq_head + 1 == q->depth ? 0 : q->cq_head + 1);
        if (q->cq_head == 0) q->phase ^= 1;
        done++;
        if (cid >= q->depth || !q->cmds[cid].io) continue;     /* not ours: ignore */
        struct nvp_cmd *cmd = &q->cmds[cid];
        vn_bdev_io *io = cmd->io;
        int abandoned = cmd->abandoned;
        int b = cmd->bounce;
        cmd->io = NULL;
        cmd->abandoned = 0;
        cmd->bounce = -1;
        q->free_cids[q->nfree++] = cid;
        if (b >= 0) {
            if (!abandoned && io->type == VN_IO_READ && !(st >> 1))
                vn_iov_copy_to(io->iov, io->iovcnt, cmd->bskip, q->bounce + (size_t)b * BOUNCE_BYTES, cmd->bytes);
            q->bounce_free |= 1u << b;
        }
        if (abandoned) continue;                /* its request failed already (timeout) */
        q->outstanding--;
        struct nvp_io *s = IOS(io);
        if (st >> 1) {
            STAT_ADD(c, status_errors, 1);
            __atomic_store_n(&c->st.last_status, (uint32_t)((st >> 1) & 0x7ff), __ATOMIC_RELAXED);
            if (!s->status) s->status = -EIO;
            s->end_block = s->next_block;
        }
        if (--s->parts_out == 0 && s->next_block >= s->end_block && s->queued != 1) io_finish(io, c);
    }
    if (done) *q->cq_db = q->cq_head;
    /* Requests waiting for slots. */
    while (q->pend_head && q->nfree) {
        vn_bdev_io *io = q->pend_head;
        q->pend_head = IOS(io)->next;
        if (!q->pend_head) q->pend_tail = NULL;
        IOS(io)->queued = 0;
        if (drive(q, io)) { pend_push(q, io); break; }
    }
    /* Commands the controller does not answer: fail their requests. */
    if (q->outstanding) {
        uint64_t now = now_ms();
        if (now >= q->next_check_ms) {
            q->next_check_ms = now + 100;
            for (uint16_t cid = 0; cid < q->depth; cid++) {
                struct nvp_cmd *cmd = &q->cmds[cid];
                if (!cmd->io || cmd->abandoned || now < cmd->deadline_ms) continue;
                cmd->abandoned = 1;
                q->outstanding--;
                STAT_ADD(c, timeouts, 1);
                timed_out(c, q->qid, cid);
                struct nvp_io *s = IOS(cmd->io);
                if (!s->status) s->status = -ETIMEDOUT;
                s->end_block = s->next_block;
                if (--s->parts_out == 0 && s->queued != 1) io_finish(cmd->io, c);
                done++;
            }
        }
    }
    return done;
}

static void ns_submit(void *bdev_ctx, void *chan, vn_bdev_io *io)
{
    struct nvp_ns *ns = bdev_ctx;
    struct nvp_chan *ch = chan;
    struct nvp_qpair *q = ch->q;
    struct nvp_io *s = IOS(io);
    memset(s, 0, sizeof(*s));
    s->ns = ns;
    /* A flush is one command: the range [0, 1) stands for it. */
    s->next_block = io->type == VN_IO_FLUSH ? 0 : io->offset_blocks;
    s->end_block = io->type == VN_IO_FLUSH ? 1 : io->offset_blocks + io->num_blocks;
    if (__builtin_expect(atomic_load_explicit(&ns->c->failed, memory_order_relaxed) ||
                         (atomic_load_explicit(&ns->c->reset_gen, memory_order_acquire) & 1), 0)) {
        s->status = -EIO;
        STAT_ADD(ns->c, failed_removed, 1);
        io_finish(io, ns->c);
        return;
    }
    if (io->type != VN_IO_FLUSH && io->num_blocks == 0) {
        io_finish(io, ns->c);
        return;
    }
    if (q->pend_head) {                         /* keep order behind waiting requests */
        STAT_ADD(ns->c, queue_full, 1);
        pend_push(q, io);
        return;
    }
    if (drive(q, io)) {
        STAT_ADD(ns->c, queue_full, 1);
        pend_push(q, io);
    }
}

static void *ns_channel_create(void *bdev_ctx)
{
    struct nvp_ns *ns = bdev_ctx;
    struct nvp_ctrlr *c = ns->c;
    int tid = (int)syscall(SYS_gettid);
    struct nvp_qpair *q = NULL;
    pthread_mutex_lock(&c->q_lock);
    for (int i = 0; i < c->nq && !q; i++)
        if (c->qp[i].refs && c->qp[i].owner_tid == tid) q = &c->qp[i];
    for (int i = 0; i < c->nq && !q; i++)
        if (!c->qp[i].refs) { q = &c->qp[i]; q->owner_tid = tid; }
    if (q) q->refs++;
    pthread_mutex_unlock(&c->q_lock);
    if (!q) return NULL;
    struct nvp_chan *ch = calloc(1, sizeof(*ch));
    if (!ch) {
        pthread_mutex_lock(&c->q_lock);
        q->refs--;
        pthread_mutex_unlock(&c->q_lock);
        return NULL;
    }
    ch->ns = ns;
    ch->q = q;
    return ch;
}

static void ns_channel_destroy(void *bdev_ctx, void *chan)
{
    struct nvp_chan *ch = chan;
    struct nvp_ctrlr *c = ch->ns->c;
    pthread_mutex_lock(&c->q_lock);
    ch->q->refs--;
    pthread_mutex_unlock(&c->q_lock);
    free(ch);
}

static int ns_channel_poll(void *bdev_ctx, void *chan)
{
    return qpair_poll(((struct nvp_chan *)chan)->q);
}

/* Asked for by interrupt-mode reactors only: the queue's MSI-X eventfd (or -1: polled every
 * 1 ms while I/O is in flight). */
static int ns_channel_fd(void *bdev_ctx, void *chan)
{
    struct nvp_qpair *q = ((struct nvp_chan *)chan)->q;
    if (q->irq_fd < 0) return -1;
    q->irq_mode = 1;
    return q->irq_fd;
}

static const struct vn_bdev_ops ns_ops = {
    .abi_version = VN_ABI_VERSION,
    .submit = ns_submit,
    .channel_create = ns_channel_create,
    .channel_destroy = ns_channel_destroy,
    .channel_poll = ns_channel_poll,
    .channel_fd = ns_channel_fd,
};

void *nvp_ns_new(void *ctrlr, uint32_t nsid, uint32_t block_size, uint64_t num_blocks, uint32_t io_types)
{
    struct nvp_ns *ns = calloc(1, sizeof(*ns));
    if (!ns) return NULL;
    struct nvp_ctrlr *c = ctrlr;
    atomic_fetch_add(&c->refs, 1);
    ns->c = c;
    ns->nsid = nsid;
    ns->bdev.ops = &ns_ops;
    ns->bdev.ctx = ns;
    ns->bdev.block_size = block_size;
    ns->bdev.io_types = io_types;
    ns->bdev.num_blocks = num_blocks;
    return ns;
}

void nvp_ns_free(void *p)
{
    struct nvp_ns *ns = p;
    if (!ns) return;
    nvp_put(ns->c);
    free(ns);
}
