/*
 * Internal declarations of the core's native module (not part of the public
 * plugin contract, which is include/vhost_core/vhost_native.h).  The same text,
 * minus the preprocessor lines, is the cffi cdef (see build.py).
 */

/* ---- guest memory table ---- */
#define VN_MAX_REGIONS 64

struct vn_region {
    uint64_t gpa;       /* guest physical start */
    uint64_t size;
    uint64_t uva;       /* frontend's user virtual address */
    uint64_t mmap_offset;
    uint8_t *host;      /* our mapping of gpa */
    void *map_base;     /* what mmap returned (covers mmap_offset .. +size) */
    uint64_t map_len;
};

struct vn_mem {
    uint32_t nregions;
    uint32_t faulted;   /* set (from the SIGBUS handler) when a mapping lost its file pages */
    struct vn_region regions[VN_MAX_REGIONS];
};

struct vn_mem *vn_mem_new(void);
/* Whether fd may back guest memory (a regular file on tmpfs/memfd, hugetlbfs or a
 * local disk filesystem): 0 and its page size, or -EBADFD (not a regular file),
 * -EMEDIUMTYPE (a filesystem that could stall page faults: FUSE, NFS, ...). */
int vn_mem_fd_kind(int fd, uint64_t *page_size);
/* Map `size` bytes of `fd` at `mmap_offset`; returns 0 or -errno. */
int vn_mem_add_region(struct vn_mem *m, int fd, uint64_t gpa, uint64_t size,
                      uint64_t uva, uint64_t mmap_offset);
void vn_mem_free(struct vn_mem *m);
/* Non-zero once an access to one of m's mappings hit SIGBUS (the front-end shrank
 * the file under it): those mappings now hold private zero pages and the
 * session must be dropped. */
int vn_mem_faulted(struct vn_mem *m);
/* Memory hot-plug (CONFIGURE_MEM_SLOTS), with rings running.  Each returns a new
 * table and leaves `old` an empty shell (its mappings and SIGBUS guards move to the
 * result; free the shell with vn_mem_free once no ring uses it).  On failure NULL,
 * *err = -errno, and `old` is untouched.
 * with_region: old's regions plus a new one mapped from fd (-EEXIST: it overlaps
 * one of them in guest-physical or front-end address space; -E2BIG: table full).
 * without_region: old's regions but the one at exactly gpa/size/uva (-ENOENT if
 * none); that one goes, still mapped, into *removed, to be freed once no request
 * in flight can be writing to it. */
struct vn_mem *vn_mem_with_region(struct vn_mem *old, int fd, uint64_t gpa, uint64_t size,
                                  uint64_t uva, uint64_t mmap_offset, int *err);
struct vn_mem *vn_mem_without_region(struct vn_mem *old, uint64_t gpa, uint64_t size, uint64_t uva,
                                     struct vn_mem **removed, int *err);
/* Host pointer for [gpa, gpa+len) wholly inside one region, else NULL. */
void *vn_mem_gpa_to_host(struct vn_mem *m, uint64_t gpa, uint64_t len);
void *vn_mem_uva_to_host(struct vn_mem *m, uint64_t uva, uint64_t len);

/* ---- virtqueues ---- */
struct vn_vq;
struct vn_dev;

struct vn_vq *vn_vq_new(struct vn_dev *dev, uint16_t index);
/* Free a stopped queue.  -EBUSY (and nothing freed) while requests it handed to
 * the device are still in flight. */
int vn_vq_free(struct vn_vq *q);
/* Ring layout in host addresses (translated by the control plane). */
void vn_vq_set_ring(struct vn_vq *q, uint32_t size, void *desc, void *avail, void *used);
/* The table the queue translates with; on a running queue it takes effect between
 * two reactor iterations (requests already fetched keep their host addresses). */
void vn_vq_set_mem(struct vn_vq *q, struct vn_mem *m);
/* Split rings: the next avail index.  Packed rings (vn_vq_set_packed): bits 0-14
 * the avail position, 15 its wrap counter, 16-30 the used position, 31 its wrap
 * counter (vhost-user's encoding; an upper half of 0 on set means "as the avail"). */
void vn_vq_set_base(struct vn_vq *q, uint32_t base);
uint32_t vn_vq_get_base(struct vn_vq *q);
/* The ring layout: split (0) or packed (VIRTIO_F_RING_PACKED); set while stopped.
 * A packed ring's desc/avail/used are its descriptor ring, driver area and
 * device area. */
void vn_vq_set_packed(struct vn_vq *q, int packed);
void vn_vq_set_kick(struct vn_vq *q, int fd);
void vn_vq_set_call(struct vn_vq *q, int fd);
void vn_vq_set_features(struct vn_vq *q, int event_idx, int indirect);
void vn_vq_set_enabled(struct vn_vq *q, int enabled);
/* Why the queue stopped itself (a malformed ring), or NULL. */
const char *vn_vq_broken_reason(struct vn_vq *q);
uint32_t vn_vq_inflight(struct vn_vq *q);
/* Start serving on the device's reactor / stop fetching and wait for in-flight
 * requests (up to timeout_ms).  stop returns the number still in flight. */
int vn_vq_start(struct vn_vq *q);
int vn_vq_stop(struct vn_vq *q, int timeout_ms);
void vn_vq_get_stats(struct vn_vq *q, uint64_t *out);  /* [requests, kicks_sent, errors] */

/* In-flight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): `region`
 * is this queue's part of the front-end's shared inflight buffer, room for
 * `capacity` descriptors (NULL: no tracking).  Set while the queue is stopped;
 * the next vn_vq_start then resubmits, in their original order, the requests a
 * previous target process took from the ring and never completed. */
#define VN_INFLIGHT_HEADER 16
#define VN_INFLIGHT_DESC 16
/* The packed-ring layout (QueueRegionPacked, DescStatePacked), for packed queues. */
#define VN_INFLIGHT_PACKED_HEADER 32
#define VN_INFLIGHT_PACKED_DESC 32
void vn_vq_set_inflight(struct vn_vq *q, void *region, uint32_t capacity);
/* The region is read in the layout of the queue's ring at start (split or packed).
 * What the last start recovered: [requests resubmitted, region reset reason]
 * (0: kept; 1: made for another ring size; 2: inconsistent with the used ring;
 * 3: too small for the ring). */
void vn_vq_get_recovery(struct vn_vq *q, uint32_t *out);

/* Dirty page log for live migration (VHOST_F_LOG_ALL, VHOST_USER_PROTOCOL_F_LOG_SHMFD):
 * one bit per 4 KiB guest-physical page, set by the data path after it wrote the
 * page.  vn_log_new maps `size` bytes of `fd` at `offset` (checked against the
 * file, SIGBUS-guarded); NULL and *err = -errno on refusal. */
#define VN_LOG_PAGE 4096
#define VN_LOG_MAX_BYTES 1073741824
struct vn_log;
struct vn_log *vn_log_new(int fd, uint64_t size, uint64_t offset, int *err);
/* Non-zero once the front-end shrank the log's file under the mapping. */
int vn_log_faulted(struct vn_log *l);
/* Pages that could not be marked because the log is too small for them. */
uint64_t vn_log_missed(struct vn_log *l);
void vn_log_free(struct vn_log *l);
/* Log the queue's guest writes into `l` (NULL: logging off).  With log_used, the
 * used ring's writes are logged too, at guest-physical `used_gpa` (SET_VRING_ADDR's
 * log_guest_addr).  Takes effect between two reactor iterations. */
void vn_vq_set_log(struct vn_vq *q, struct vn_log *l, int log_used, uint64_t used_gpa);

/* ---- devices (a controller's data-path half) ---- */
struct vn_reactor;
/* Place a device on a reactor; NULL and *err = -errno on failure (-EPROTO: the
 * table was built for another VN_ABI_VERSION; -ENOSPC: the reactor is full). */
struct vn_dev *vn_dev_new(struct vn_reactor *r, const struct vn_device_ops *ops, void *ctx, int *err);
/* Detach from the reactor (all queues must be stopped) and free. */
void vn_dev_free(struct vn_dev *d);
/* Interrupt coalescing (SPDK's vhost_controller_set_coalescing): a queue whose
 * request rate exceeds iops_threshold has its guest interrupts spaced by up to
 * delay_base_us, in proportion to the excess (0: off).  -ERANGE: iops_threshold
 * below 100 (SPDK's minimum); -EINVAL: delay_base_us too large. */
int vn_dev_set_coalescing(struct vn_dev *d, uint32_t delay_base_us, uint32_t iops_threshold);

/* ---- bdev descriptors (vhost_native.h) ---- */
/* Open `bdev` on reactor r: its channel is made there and polled from then on.
 * NULL and *err = -errno on failure. */
vn_bdev_desc *vn_desc_open(struct vn_reactor *r, vn_bdev *bdev, int *err);
/* New I/O is refused from the first call on (closing); returns the I/O still in
 * flight, 0 once the channel is gone and the descriptor closed (call until 0). */
int vn_desc_close(vn_bdev_desc *d);
/* Free a closed descriptor (-EBUSY, and nothing freed, while it is still open). */
int vn_desc_free(vn_bdev_desc *d);
uint64_t vn_desc_in_flight(vn_bdev_desc *d);
/* The descriptor's struct vn_iostat as 25 uint64 words. */
void vn_desc_get_iostat(vn_bdev_desc *d, uint64_t *out);
void vn_desc_reset_iostat_maxmin(vn_bdev_desc *d);
/* A resized bdev: its size for every reactor from now on. */
void vn_bdev_set_num_blocks(vn_bdev *b, uint64_t num_blocks);

/* ---- QoS rate limits (bdev_set_qos_limit) ---- */
/* One per bdev with limits, shared by all its descriptors on every reactor. */
enum vn_qos_limit { VN_QOS_RW_IOS = 0, VN_QOS_RW_BYTES = 1, VN_QOS_R_BYTES = 2, VN_QOS_W_BYTES = 3,
                    VN_QOS_LIMITS = 4 };
struct vn_qos;
struct vn_qos *vn_qos_new(void);
/* Free once no descriptor uses it any more. */
void vn_qos_free(struct vn_qos *q);
/* Set one limit, per second (I/Os or bytes; 0: none); `min_burst`: the fewest tokens
 * the bucket may hold (1 I/O, 512 bytes). */
void vn_qos_set_limit(struct vn_qos *q, int which, uint64_t per_sec, uint64_t min_burst);
/* Throttle the descriptor's I/O by `q` (NULL: no more; what is held back goes on). */
void vn_desc_set_qos(vn_bdev_desc *d, struct vn_qos *q);
/* I/O the descriptor holds back right now (read racily). */
uint64_t vn_desc_qos_held(vn_bdev_desc *d);

/* ---- reactors ---- */
struct vn_reactor *vn_reactor_new(int core, int interrupt_mode);
int vn_reactor_start(struct vn_reactor *r);
void vn_reactor_stop(struct vn_reactor *r);   /* joins the thread */
void vn_reactor_free(struct vn_reactor *r);
/* [loops, busy_loops, idle_ns, busy_ns] */
void vn_reactor_get_stats(struct vn_reactor *r, uint64_t *out);
int vn_reactor_core(struct vn_reactor *r);
int vn_reactor_tid(struct vn_reactor *r);
/* Run fn(arg) on the reactor thread and wait for it; returns fn's result.  A
 * device's control plane reaches its C half this way (Reactor.run). */
typedef int (*vn_exec_fn)(void *arg);
int vn_reactor_exec(struct vn_reactor *r, vn_exec_fn fn, void *arg);

/* ---- front-end eventfds ---- */
/* Signal (add 1) / drain an eventfd the front-end gave us, on any thread, without
 * ever stalling it for long: a call the front-end made block is interrupted after
 * 50-100 ms and fails with -EINTR (the fd is then hostile: stop using it).  A
 * saturated counter is success (a wake-up is pending anyway). */
int vn_fd_signal(int fd);
int vn_fd_drain(int fd);
/* Guarded calls interrupted so far (daemon-wide). */
uint64_t vn_fd_guard_interrupts(void);

/* VN_MAX_TRANSFER of vhost_native.h, for device types' Python halves (config space). */
uint32_t vn_max_transfer(void);

/* ---- I/O statistics clock ---- */
/* vn_ticks() (vhost_native.h) now, and its rate in ticks per second (measured once). */
uint64_t vn_ticks_now(void);
uint64_t vn_tick_rate(void);
