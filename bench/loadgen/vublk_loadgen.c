/*
 * vublk_loadgen - a minimal vhost-user-blk FRONTEND used as a load generator.
 *
 * It connects to a vhost-user-blk backend socket (no VM involved), negotiates
 * the protocol, shares a memfd region that holds one split virtqueue plus all
 * request headers / data buffers / status bytes, and then drives random 4k
 * (or --bs) reads or writes at a fixed queue depth on queue 0 while busy
 * polling the used ring.
 *
 * Written from the vhost-user spec (QEMU docs/interop/vhost-user.rst) and the
 * virtio 1.x split virtqueue / virtio-blk spec.
 *
 * Output: one JSON line on stdout.
 *
 * Build: gcc -O2 -Wall -o vublk_loadgen vublk_loadgen.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <inttypes.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* vhost-user protocol                                                  */
/* ------------------------------------------------------------------ */
enum {
    VHU_GET_FEATURES = 1,
    VHU_SET_FEATURES = 2,
    VHU_SET_OWNER = 3,
    VHU_RESET_OWNER = 4,
    VHU_SET_MEM_TABLE = 5,
    VHU_SET_VRING_NUM = 8,
    VHU_SET_VRING_ADDR = 9,
    VHU_SET_VRING_BASE = 10,
    VHU_GET_VRING_BASE = 11,
    VHU_SET_VRING_KICK = 12,
    VHU_SET_VRING_CALL = 13,
    VHU_GET_PROTOCOL_FEATURES = 15,
    VHU_SET_PROTOCOL_FEATURES = 16,
    VHU_GET_QUEUE_NUM = 17,
    VHU_SET_VRING_ENABLE = 18,
    VHU_GET_CONFIG = 24,
};

#define VHU_VERSION 0x1u
#define VHU_FLAG_REPLY (1u << 2)
#define VHU_FLAG_NEED_REPLY (1u << 3)

#define VHU_F_PROTOCOL_FEATURES 30
#define VHU_PROTO_F_MQ 0
#define VHU_PROTO_F_REPLY_ACK 3
#define VHU_PROTO_F_CONFIG 9

/* virtio feature bits */
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

#define BIT(n) (1ull << (n))

struct vhu_vring_state {
    uint32_t index;
    uint32_t num;
} __attribute__((packed));

struct vhu_vring_addr {
    uint32_t index;
    uint32_t flags;
    uint64_t desc_user_addr;
    uint64_t used_user_addr;
    uint64_t avail_user_addr;
    uint64_t log_guest_addr;
} __attribute__((packed));

struct vhu_mem_region {
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t mmap_offset;
} __attribute__((packed));

struct vhu_mem_table {
    uint32_t nregions;
    uint32_t padding;
    struct vhu_mem_region regions[8];
} __attribute__((packed));

struct vhu_config {
    uint32_t offset;
    uint32_t size;
    uint32_t flags;
    uint8_t region[256];
} __attribute__((packed));

struct vhu_msg {
    uint32_t request;
    uint32_t flags;
    uint32_t size;
    union {
        uint64_t u64;
        struct vhu_vring_state state;
        struct vhu_vring_addr addr;
        struct vhu_mem_table mem;
        struct vhu_config cfg;
        uint8_t raw[4096];
    } p;
} __attribute__((packed));

#define VHU_HDR_SIZE 12

/* ------------------------------------------------------------------ */
/* virtio split ring + virtio-blk                                       */
/* ------------------------------------------------------------------ */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};

/* packed ring (VIRTIO_F_RING_PACKED, --packed) */
#define VIRTIO_F_RING_PACKED 34
#define VRING_PACKED_DESC_F_AVAIL (1u << 7)
#define VRING_PACKED_DESC_F_USED (1u << 15)
#define VRING_PACKED_EVENT_F_ENABLE 0
#define VRING_PACKED_EVENT_F_DISABLE 1

struct vring_packed_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    uint16_t flags;
};

struct vring_packed_event {
    uint16_t off_wrap;
    uint16_t flags;
};

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_S_OK 0

struct virtio_blk_outhdr {
    uint32_t type;
    uint32_t ioprio;
    uint64_t sector;
};

/* ------------------------------------------------------------------ */
/* options / globals                                                    */
/* ------------------------------------------------------------------ */
static struct {
    const char *socket;
    int write;
    int seq; /* sequential instead of random offsets */
    unsigned qd;
    unsigned bs;
    double time_s;
    double warmup_s;
    unsigned qsize;
    int cpu;
    int event_idx;
    int no_call;
    int indirect; /* -1 auto, 0 never, 1 force */
    int packed;   /* packed virtqueue */
    int wait;     /* sleep on the call eventfd instead of spinning */
    double connect_timeout;
    uint64_t size_override; /* bytes, 0 = from config */
    uint64_t max_ios;       /* stop after this many submissions, 0 = no limit */
    int verbose;
    uint64_t seed;
} opt = {
    .socket = NULL,
    .write = 0,
    .qd = 1,
    .bs = 4096,
    .time_s = 5,
    .warmup_s = 1,
    .qsize = 256,
    .cpu = -1,
    .event_idx = 0,
    .no_call = 0,
    .indirect = -1,
    .connect_timeout = 10,
    .size_override = 0,
    .verbose = 0,
    .seed = 0x9E3779B97F4A7C15ull,
};

static int sock_fd = -1;
static uint64_t proto_features; /* negotiated */

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "vublk_loadgen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void vlog(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void vlog(const char *fmt, ...)
{
    if (!opt.verbose)
        return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "vublk_loadgen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------ */
/* control channel                                                      */
/* ------------------------------------------------------------------ */
static const char *req_name(uint32_t r)
{
    switch (r) {
    case VHU_GET_FEATURES: return "GET_FEATURES";
    case VHU_SET_FEATURES: return "SET_FEATURES";
    case VHU_SET_OWNER: return "SET_OWNER";
    case VHU_SET_MEM_TABLE: return "SET_MEM_TABLE";
    case VHU_SET_VRING_NUM: return "SET_VRING_NUM";
    case VHU_SET_VRING_ADDR: return "SET_VRING_ADDR";
    case VHU_SET_VRING_BASE: return "SET_VRING_BASE";
    case VHU_GET_VRING_BASE: return "GET_VRING_BASE";
    case VHU_SET_VRING_KICK: return "SET_VRING_KICK";
    case VHU_SET_VRING_CALL: return "SET_VRING_CALL";
    case VHU_GET_PROTOCOL_FEATURES: return "GET_PROTOCOL_FEATURES";
    case VHU_SET_PROTOCOL_FEATURES: return "SET_PROTOCOL_FEATURES";
    case VHU_GET_QUEUE_NUM: return "GET_QUEUE_NUM";
    case VHU_SET_VRING_ENABLE: return "SET_VRING_ENABLE";
    case VHU_GET_CONFIG: return "GET_CONFIG";
    default: return "?";
    }
}

static void vhu_send(struct vhu_msg *m, int fd)
{
    struct iovec iov = { .iov_base = m, .iov_len = VHU_HDR_SIZE + m->size };
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (fd >= 0) {
        memset(&u, 0, sizeof(u));
        mh.msg_control = u.buf;
        mh.msg_controllen = sizeof(u.buf);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    ssize_t n;
    do {
        n = sendmsg(sock_fd, &mh, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n != (ssize_t)iov.iov_len)
        die("sendmsg %s failed: %s", req_name(m->request), n < 0 ? strerror(errno) : "short write");
}

static void recv_all(void *buf, size_t len, const char *what)
{
    uint8_t *p = buf;
    while (len) {
        ssize_t n = recv(sock_fd, p, len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("recv reply to %s failed: %s", what,
                n == 0 ? "connection closed by backend" : strerror(errno));
        p += n;
        len -= (size_t)n;
    }
}

static void vhu_recv_reply(uint32_t req, struct vhu_msg *r)
{
    recv_all(r, VHU_HDR_SIZE, req_name(req));
    if (r->request != req)
        die("reply request mismatch: sent %s(%u) got %u", req_name(req), req, r->request);
    if (!(r->flags & VHU_FLAG_REPLY))
        die("reply to %s lacks REPLY flag (flags=0x%x)", req_name(req), r->flags);
    if (r->size > sizeof(r->p))
        die("reply to %s too large (%u)", req_name(req), r->size);
    if (r->size)
        recv_all(&r->p, r->size, req_name(req));
}

/* Send a message that has no natural reply.  If REPLY_ACK was negotiated ask
 * for an ack so errors surface right where they happen. */
static void vhu_set(uint32_t req, const void *payload, uint32_t size, int fd)
{
    struct vhu_msg m;
    memset(&m, 0, VHU_HDR_SIZE);
    m.request = req;
    m.flags = VHU_VERSION;
    m.size = size;
    if (size)
        memcpy(&m.p, payload, size);
    int ack = (proto_features & BIT(VHU_PROTO_F_REPLY_ACK)) != 0;
    if (ack)
        m.flags |= VHU_FLAG_NEED_REPLY;
    vhu_send(&m, fd);
    if (ack) {
        struct vhu_msg r;
        vhu_recv_reply(req, &r);
        if (r.size != 8)
            die("REPLY_ACK for %s has size %u", req_name(req), r.size);
        if (r.p.u64 != 0)
            die("backend NACKed %s (0x%" PRIx64 ")", req_name(req), r.p.u64);
    }
    vlog("%s ok%s", req_name(req), ack ? " (acked)" : "");
}

static uint64_t vhu_get_u64(uint32_t req)
{
    struct vhu_msg m, r;
    memset(&m, 0, VHU_HDR_SIZE);
    m.request = req;
    m.flags = VHU_VERSION;
    m.size = 0;
    vhu_send(&m, -1);
    vhu_recv_reply(req, &r);
    if (r.size != 8)
        die("reply to %s has size %u, expected 8", req_name(req), r.size);
    return r.p.u64;
}

static void vhu_connect(const char *path, double timeout_s)
{
    struct sockaddr_un sa;
    if (strlen(path) >= sizeof(sa.sun_path))
        die("socket path too long: %s", path);
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    strcpy(sa.sun_path, path);
    uint64_t deadline = now_ns() + (uint64_t)(timeout_s * 1e9);
    for (;;) {
        sock_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (sock_fd < 0)
            die("socket: %s", strerror(errno));
        if (connect(sock_fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
            break;
        int e = errno;
        close(sock_fd);
        sock_fd = -1;
        if (now_ns() > deadline)
            die("connect %s: %s", path, strerror(e));
        usleep(20000);
    }
    struct timeval tv = { .tv_sec = 10, .tv_usec = 0 };
    setsockopt(sock_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

/* ------------------------------------------------------------------ */
/* latency histogram: log-linear, 32 sub-buckets per power of two (~3%) */
/* ------------------------------------------------------------------ */
#define HSUB_BITS 5
#define HSUB (1u << HSUB_BITS)
#define HBUCKETS (64 * HSUB)
static uint64_t hist[HBUCKETS];

static inline unsigned hbucket(uint64_t v)
{
    if (v < 2 * HSUB)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    unsigned shift = msb - HSUB_BITS;
    return (shift + 1) * HSUB + (unsigned)((v >> shift) & (HSUB - 1));
}

static inline double hbucket_mid(unsigned idx)
{
    if (idx < 2 * HSUB)
        return idx;
    unsigned shift = idx / HSUB - 1;
    double lo = (double)((uint64_t)(HSUB + idx % HSUB) << shift);
    return lo + (double)(1ull << shift) / 2.0;
}

static double hist_pct(uint64_t total, double pct)
{
    if (!total)
        return 0;
    uint64_t want = (uint64_t)((double)total * pct / 100.0);
    if (want >= total)
        want = total - 1;
    uint64_t acc = 0;
    for (unsigned i = 0; i < HBUCKETS; i++) {
        acc += hist[i];
        if (acc > want)
            return hbucket_mid(i);
    }
    return 0;
}

/* ------------------------------------------------------------------ */
static volatile sig_atomic_t stop_flag;
static void on_sig(int s)
{
    (void)s;
    stop_flag = 1;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: vublk_loadgen --socket PATH [options]\n"
            "  --rw randread|randwrite|read|write  workload (default randread;\n"
            "                            read/write are sequential, wrapping at the end)\n"
            "  --qd N                    queue depth (default 1)\n"
            "  --bs BYTES                block size, multiple of 512 (default 4096)\n"
            "  --time SEC                measured run time (default 5)\n"
            "  --warmup SEC              warmup before measuring (default 1)\n"
            "  --queue-size N            virtqueue size, power of 2 (default 256)\n"
            "  --cpu C                   pin to cpu C\n"
            "  --event-idx               negotiate VIRTIO_RING_F_EVENT_IDX if offered\n"
            "  --no-call                 ask the backend not to signal the call eventfd\n"
            "                            (VRING_AVAIL_F_NO_INTERRUPT / used_event far away),\n"
            "                            like a polling guest driver; default: request calls\n"
            "  --indirect auto|on|off    indirect descriptors (auto: only if qd*3 > queue size)\n"
            "  --packed                  a packed virtqueue (VIRTIO_F_RING_PACKED) instead of split\n"
            "  --wait                    sleep on the call eventfd while nothing completed, like an\n"
            "                            interrupt-driven guest (default: spin on the used ring,\n"
            "                            which takes a whole core)\n"
            "  --size BYTES              device size if the backend has no GET_CONFIG\n"
            "  --connect-timeout SEC     retry connecting for this long (default 10)\n"
            "  --seed N                  PRNG seed\n"
            "  --ios N                   stop after N submitted requests (or --time,\n"
            "                            whichever comes first); 'ios' in the output\n"
            "                            counts only those completed after warmup\n"
            "  -v, --verbose             log negotiation to stderr\n");
    exit(2);
}

static void parse_args(int argc, char **argv)
{
    enum { O_SOCK = 1000, O_RW, O_QD, O_BS, O_TIME, O_WARM, O_QS, O_CPU, O_EIDX, O_NOCALL,
           O_IND, O_SIZE, O_CTO, O_SEED, O_IOS, O_PACKED, O_WAIT };
    static const struct option lo[] = {
        { "socket", required_argument, 0, O_SOCK },
        { "rw", required_argument, 0, O_RW },
        { "qd", required_argument, 0, O_QD },
        { "bs", required_argument, 0, O_BS },
        { "time", required_argument, 0, O_TIME },
        { "warmup", required_argument, 0, O_WARM },
        { "queue-size", required_argument, 0, O_QS },
        { "cpu", required_argument, 0, O_CPU },
        { "event-idx", no_argument, 0, O_EIDX },
        { "no-call", no_argument, 0, O_NOCALL },
        { "indirect", required_argument, 0, O_IND },
        { "size", required_argument, 0, O_SIZE },
        { "connect-timeout", required_argument, 0, O_CTO },
        { "seed", required_argument, 0, O_SEED },
        { "ios", required_argument, 0, O_IOS },
        { "packed", no_argument, 0, O_PACKED },
        { "wait", no_argument, 0, O_WAIT },
        { "verbose", no_argument, 0, 'v' },
        { "help", no_argument, 0, 'h' },
        { 0, 0, 0, 0 },
    };
    int c;
    while ((c = getopt_long(argc, argv, "vh", lo, NULL)) != -1) {
        switch (c) {
        case O_SOCK: opt.socket = optarg; break;
        case O_RW:
            if (!strcmp(optarg, "randread"))
                opt.write = 0, opt.seq = 0;
            else if (!strcmp(optarg, "randwrite"))
                opt.write = 1, opt.seq = 0;
            else if (!strcmp(optarg, "read"))
                opt.write = 0, opt.seq = 1;
            else if (!strcmp(optarg, "write"))
                opt.write = 1, opt.seq = 1;
            else
                die("bad --rw %s", optarg);
            break;
        case O_QD: opt.qd = (unsigned)strtoul(optarg, NULL, 0); break;
        case O_BS: opt.bs = (unsigned)strtoul(optarg, NULL, 0); break;
        case O_TIME: opt.time_s = atof(optarg); break;
        case O_WARM: opt.warmup_s = atof(optarg); break;
        case O_QS: opt.qsize = (unsigned)strtoul(optarg, NULL, 0); break;
        case O_CPU: opt.cpu = atoi(optarg); break;
        case O_EIDX: opt.event_idx = 1; break;
        case O_NOCALL: opt.no_call = 1; break;
        case O_IND:
            if (!strcmp(optarg, "auto")) opt.indirect = -1;
            else if (!strcmp(optarg, "on")) opt.indirect = 1;
            else if (!strcmp(optarg, "off")) opt.indirect = 0;
            else die("bad --indirect %s", optarg);
            break;
        case O_SIZE: opt.size_override = strtoull(optarg, NULL, 0); break;
        case O_CTO: opt.connect_timeout = atof(optarg); break;
        case O_IOS: opt.max_ios = strtoull(optarg, NULL, 0); break;
        case O_PACKED: opt.packed = 1; break;
        case O_WAIT: opt.wait = 1; break;
        case O_SEED: opt.seed = strtoull(optarg, NULL, 0) | 1; break;
        case 'v': opt.verbose = 1; break;
        default: usage();
        }
    }
    if (!opt.socket)
        usage();
    if (opt.qd == 0)
        die("--qd must be >= 1");
    if (opt.bs == 0 || opt.bs % 512)
        die("--bs must be a positive multiple of 512");
    if (opt.qsize == 0 || (opt.qsize & (opt.qsize - 1)) || opt.qsize > 32768)
        die("--queue-size must be a power of two <= 32768");
    if (opt.qd > opt.qsize)
        die("--qd %u exceeds --queue-size %u", opt.qd, opt.qsize);
    if (opt.time_s <= 0)
        die("--time must be > 0");
    if (opt.wait && opt.no_call)
        die("--wait sleeps until the backend signals: it cannot go with --no-call");
}

/* --wait: nothing completed; sleep until the backend signals (at most 100 ms, so the
 * run's clock and SIGINT are still looked at).  The eventfd is level-triggered: a
 * signal sent after the ring was found empty and before poll() is not lost. */
static void wait_call(int callfd)
{
    struct pollfd p = { .fd = callfd, .events = POLLIN };
    if (poll(&p, 1, 100) > 0) {
        uint64_t v;
        if (read(callfd, &v, sizeof(v)) < 0) { /* EAGAIN: raced with nothing */ }
    }
}

static inline size_t align_up(size_t v, size_t a)
{
    return (v + a - 1) & ~(a - 1);
}

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static inline uint64_t next_block(uint64_t *rng, uint64_t *seq_next, uint64_t nblocks)
{
    if (opt.seq) {
        uint64_t b = *seq_next;
        *seq_next = b + 1 == nblocks ? 0 : b + 1;
        return b;
    }
    /* uniform in [0, nblocks) without a division */
    return (uint64_t)(((unsigned __int128)xorshift64(rng) * nblocks) >> 64);
}

/* vring_need_event() from the virtio spec */
static inline int need_event(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event_idx - 1) < (uint16_t)(new_idx - old_idx);
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);

    if (opt.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(opt.cpu, &set);
        if (sched_setaffinity(0, sizeof(set), &set))
            die("sched_setaffinity(%d): %s", opt.cpu, strerror(errno));
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_sig);
    signal(SIGTERM, on_sig);

    /* ---------------- negotiation ---------------- */
    vhu_connect(opt.socket, opt.connect_timeout);

    uint64_t dev_features = vhu_get_u64(VHU_GET_FEATURES);
    vlog("device features 0x%016" PRIx64, dev_features);
    if (!(dev_features & BIT(VIRTIO_F_VERSION_1)))
        die("backend does not offer VIRTIO_F_VERSION_1 (features 0x%" PRIx64 ")", dev_features);

    if (dev_features & BIT(VHU_F_PROTOCOL_FEATURES)) {
        uint64_t pf = vhu_get_u64(VHU_GET_PROTOCOL_FEATURES);
        vlog("protocol features offered 0x%" PRIx64, pf);
        uint64_t want = BIT(VHU_PROTO_F_REPLY_ACK) | BIT(VHU_PROTO_F_CONFIG) | BIT(VHU_PROTO_F_MQ);
        uint64_t ack = pf & want;
        /* proto_features is still 0 here: SET_PROTOCOL_FEATURES itself is sent
         * without NEED_REPLY. */
        vhu_set(VHU_SET_PROTOCOL_FEATURES, &ack, 8, -1);
        proto_features = ack;
    }

    vhu_set(VHU_SET_OWNER, NULL, 0, -1);

    if (proto_features & BIT(VHU_PROTO_F_MQ)) {
        uint64_t nq = vhu_get_u64(VHU_GET_QUEUE_NUM);
        vlog("backend supports %" PRIu64 " queues", nq);
    }

    uint64_t capacity_sectors = 0;
    uint32_t blk_size = 512;
    if (proto_features & BIT(VHU_PROTO_F_CONFIG)) {
        struct vhu_msg m, r;
        memset(&m, 0, sizeof(m));
        m.request = VHU_GET_CONFIG;
        m.flags = VHU_VERSION;
        m.p.cfg.offset = 0;
        m.p.cfg.size = 60; /* struct virtio_blk_config up to write_zeroes fields */
        m.p.cfg.flags = 0;
        m.size = 12 + m.p.cfg.size;
        vhu_send(&m, -1);
        vhu_recv_reply(VHU_GET_CONFIG, &r);
        if (r.size >= 12 + 8 && r.p.cfg.size >= 8) {
            memcpy(&capacity_sectors, r.p.cfg.region, 8);
            if ((dev_features & BIT(VIRTIO_BLK_F_BLK_SIZE)) && r.p.cfg.size >= 24) {
                uint32_t b;
                memcpy(&b, r.p.cfg.region + 20, 4);
                if (b >= 512)
                    blk_size = b;
            }
            vlog("config: capacity %" PRIu64 " sectors, blk_size %u", capacity_sectors, blk_size);
        } else {
            fprintf(stderr, "vublk_loadgen: GET_CONFIG failed (reply size %u)\n", r.size);
        }
    }
    if (opt.size_override)
        capacity_sectors = opt.size_override / 512;
    if (!capacity_sectors) {
        capacity_sectors = (1ull << 30) / 512;
        fprintf(stderr, "vublk_loadgen: unknown capacity, assuming 1 GiB (use --size)\n");
    }
    if (opt.bs % blk_size)
        die("--bs %u is not a multiple of device block size %u", opt.bs, blk_size);
    uint64_t nblocks = capacity_sectors * 512 / opt.bs;
    if (!nblocks)
        die("device smaller than one block");
    if (opt.write && (dev_features & BIT(VIRTIO_BLK_F_RO)))
        die("device is read-only (VIRTIO_BLK_F_RO) but --rw randwrite requested");

    int use_indirect;
    if (opt.indirect == 1)
        use_indirect = 1;
    else if (opt.indirect == 0)
        use_indirect = 0;
    else
        use_indirect = (uint64_t)opt.qd * 3 > opt.qsize;
    if (use_indirect && !(dev_features & BIT(VIRTIO_RING_F_INDIRECT_DESC)))
        die("qd %u needs %u descriptors > queue size %u and backend has no INDIRECT_DESC; "
            "raise --queue-size", opt.qd, opt.qd * 3, opt.qsize);
    if (!use_indirect && (uint64_t)opt.qd * 3 > opt.qsize)
        die("qd %u needs %u descriptors > queue size %u", opt.qd, opt.qd * 3, opt.qsize);

    uint64_t features = BIT(VIRTIO_F_VERSION_1);
    features |= dev_features & BIT(VHU_F_PROTOCOL_FEATURES);
    features |= dev_features & (BIT(VIRTIO_BLK_F_BLK_SIZE) | BIT(VIRTIO_BLK_F_SEG_MAX) |
                                BIT(VIRTIO_BLK_F_SIZE_MAX) | BIT(VIRTIO_BLK_F_RO));
    int event_idx = opt.event_idx && (dev_features & BIT(VIRTIO_RING_F_EVENT_IDX));
    if (opt.event_idx && !event_idx)
        fprintf(stderr, "vublk_loadgen: backend does not offer EVENT_IDX, not using it\n");
    if (event_idx)
        features |= BIT(VIRTIO_RING_F_EVENT_IDX);
    if (use_indirect)
        features |= BIT(VIRTIO_RING_F_INDIRECT_DESC);
    const int packed = opt.packed;
    if (packed && !(dev_features & BIT(VIRTIO_F_RING_PACKED)))
        die("--packed: the backend does not offer VIRTIO_F_RING_PACKED");
    if (packed)
        features |= BIT(VIRTIO_F_RING_PACKED);
    vhu_set(VHU_SET_FEATURES, &features, 8, -1);
    vlog("acked features 0x%016" PRIx64, features);

    /* ---------------- shared memory ---------------- */
    const unsigned N = opt.qsize;
    const size_t page = 4096;
    const size_t slot_bs = align_up(opt.bs, page);
    size_t off_desc = 0;
    size_t off_avail = align_up(off_desc + 16ul * N, page);
    size_t off_used = align_up(off_avail + 6 + 2ul * N, page);
    size_t off_req = align_up(off_used + 6 + 8ul * N, page);
    size_t off_ind = align_up(off_req + 64ul * opt.qd, page);
    size_t off_data = align_up(off_ind + 64ul * opt.qd, page);
    size_t mem_size = align_up(off_data + slot_bs * opt.qd, 2ul << 20);

    int memfd = memfd_create("vublk_loadgen", MFD_CLOEXEC);
    if (memfd < 0)
        die("memfd_create: %s", strerror(errno));
    if (ftruncate(memfd, (off_t)mem_size))
        die("ftruncate: %s", strerror(errno));
    uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, memfd, 0);
    if (mem == MAP_FAILED)
        die("mmap: %s", strerror(errno));
    memset(mem, 0, mem_size);
    /* "guest physical" base: deliberately not 0 and not equal to the user
     * address, so a backend mixing up GPA and user addresses fails loudly. */
    const uint64_t gpa_base = 0x40000000ull;
#define GPA(off) (gpa_base + (uint64_t)(off))

    struct vring_desc *desc = (struct vring_desc *)(mem + off_desc);
    volatile uint16_t *avail_flags = (uint16_t *)(mem + off_avail);
    volatile uint16_t *avail_idx_p = (uint16_t *)(mem + off_avail + 2);
    volatile uint16_t *avail_ring = (uint16_t *)(mem + off_avail + 4);
    volatile uint16_t *used_event_p = (uint16_t *)(mem + off_avail + 4 + 2ul * N);
    volatile uint16_t *used_flags = (uint16_t *)(mem + off_used);
    volatile uint16_t *used_idx_p = (uint16_t *)(mem + off_used + 2);
    volatile struct vring_used_elem *used_ring = (struct vring_used_elem *)(mem + off_used + 4);
    volatile uint16_t *avail_event_p = (uint16_t *)(mem + off_used + 4 + 8ul * N);

    /* pre-build all requests: request i = header, data, status */
    const unsigned dpr = use_indirect ? 1 : 3; /* ring descriptors per request */
    /* Packed: request i is buffer id i; its descriptors (or its indirect table's one)
     * are written into the ring at each submission, from this template. */
    struct vring_packed_desc *ptmpl = calloc(3ul * opt.qd, sizeof(*ptmpl));
    volatile struct vring_packed_desc *pring = (struct vring_packed_desc *)(mem + off_desc);
    volatile struct vring_packed_event *driver_ev = (struct vring_packed_event *)(mem + off_avail);
    volatile struct vring_packed_event *device_ev = (struct vring_packed_event *)(mem + off_used);
    if (!ptmpl)
        die("oom");
    for (unsigned i = 0; packed && i < opt.qd; i++) {
        struct vring_packed_desc t[3] = {
            { GPA(off_req + 64ul * i), 16, (uint16_t)i, 0 },
            { GPA(off_data + slot_bs * i), opt.bs, (uint16_t)i, (uint16_t)(opt.write ? 0 : VRING_DESC_F_WRITE) },
            { GPA(off_req + 64ul * i + 16), 1, (uint16_t)i, VRING_DESC_F_WRITE },
        };
        mem[off_req + 64ul * i + 16] = 0xff;
        ((struct virtio_blk_outhdr *)(mem + off_req + 64ul * i))->type = opt.write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
        if (use_indirect) {
            memcpy(mem + off_ind + 64ul * i, t, sizeof(t));
            ptmpl[3ul * i] = (struct vring_packed_desc){ GPA(off_ind + 64ul * i), sizeof(t), (uint16_t)i,
                                                         VRING_DESC_F_INDIRECT };
        } else {
            t[0].flags |= VRING_DESC_F_NEXT;
            t[1].flags |= VRING_DESC_F_NEXT;
            memcpy(&ptmpl[3ul * i], t, sizeof(t));
        }
    }
    if (packed)
        driver_ev->flags = opt.no_call ? VRING_PACKED_EVENT_F_DISABLE : VRING_PACKED_EVENT_F_ENABLE;
    for (unsigned i = 0; !packed && i < opt.qd; i++) {
        struct virtio_blk_outhdr *h = (void *)(mem + off_req + 64ul * i);
        h->type = opt.write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
        h->ioprio = 0;
        h->sector = 0;
        mem[off_req + 64ul * i + 16] = 0xff; /* status */
        struct vring_desc *d;
        uint16_t base;
        if (use_indirect) {
            d = (struct vring_desc *)(mem + off_ind + 64ul * i);
            base = 0;
            desc[i].addr = GPA(off_ind + 64ul * i);
            desc[i].len = 3 * sizeof(struct vring_desc);
            desc[i].flags = VRING_DESC_F_INDIRECT;
            desc[i].next = 0;
        } else {
            d = desc + 3 * i;
            base = (uint16_t)(3 * i);
        }
        d[0].addr = GPA(off_req + 64ul * i);
        d[0].len = 16;
        d[0].flags = VRING_DESC_F_NEXT;
        d[0].next = (uint16_t)(base + 1);
        d[1].addr = GPA(off_data + slot_bs * i);
        d[1].len = opt.bs;
        d[1].flags = VRING_DESC_F_NEXT | (opt.write ? 0 : VRING_DESC_F_WRITE);
        d[1].next = (uint16_t)(base + 2);
        d[2].addr = GPA(off_req + 64ul * i + 16);
        d[2].len = 1;
        d[2].flags = VRING_DESC_F_WRITE;
        d[2].next = 0;
    }
    if (opt.no_call && !event_idx && !packed)
        *avail_flags = VRING_AVAIL_F_NO_INTERRUPT;

    struct vhu_mem_table mt;
    memset(&mt, 0, sizeof(mt));
    mt.nregions = 1;
    mt.regions[0].guest_phys_addr = gpa_base;
    mt.regions[0].memory_size = mem_size;
    mt.regions[0].userspace_addr = (uint64_t)(uintptr_t)mem;
    mt.regions[0].mmap_offset = 0;
    vhu_set(VHU_SET_MEM_TABLE, &mt, 8 + sizeof(struct vhu_mem_region), memfd);

    /* ---------------- vring setup ---------------- */
    struct vhu_vring_state st = { .index = 0, .num = N };
    vhu_set(VHU_SET_VRING_NUM, &st, sizeof(st), -1);
    /* Packed: avail and used positions 0, both wrap counters 1. */
    st.num = packed ? 0x80008000u : 0;
    vhu_set(VHU_SET_VRING_BASE, &st, sizeof(st), -1);
    struct vhu_vring_addr va = {
        .index = 0,
        .flags = 0,
        .desc_user_addr = (uint64_t)(uintptr_t)(mem + off_desc),
        .used_user_addr = (uint64_t)(uintptr_t)(mem + off_used),
        .avail_user_addr = (uint64_t)(uintptr_t)(mem + off_avail),
        .log_guest_addr = 0,
    };
    vhu_set(VHU_SET_VRING_ADDR, &va, sizeof(va), -1);

    int callfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int kickfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (callfd < 0 || kickfd < 0)
        die("eventfd: %s", strerror(errno));
    uint64_t idx0 = 0;
    vhu_set(VHU_SET_VRING_CALL, &idx0, 8, callfd);
    vhu_set(VHU_SET_VRING_KICK, &idx0, 8, kickfd);
    if (features & BIT(VHU_F_PROTOCOL_FEATURES)) {
        struct vhu_vring_state en = { .index = 0, .num = 1 };
        vhu_set(VHU_SET_VRING_ENABLE, &en, sizeof(en), -1);
    }
    /* Without REPLY_ACK we cannot know when the backend processed the above;
     * a round trip with a GET message acts as a barrier. */
    if (!(proto_features & BIT(VHU_PROTO_F_REPLY_ACK)))
        (void)vhu_get_u64(VHU_GET_FEATURES);

    /* ---------------- workload ---------------- */
    uint64_t *sub_ts = calloc(opt.qd, sizeof(uint64_t));
    if (!sub_ts)
        die("oom");
    uint64_t rng = opt.seed;
    uint64_t seq_next = 0;
    const uint32_t spb = opt.bs / 512; /* sectors per block */
    uint8_t *req_base = mem + off_req;
    const uint64_t one = 1;

    uint16_t avail_idx = 0, last_used = 0;
    /* packed ring positions and wrap counters (the driver's) */
    uint32_t p_avail = 0, p_used = 0;
    uint16_t p_avail_wrap = 1, p_used_wrap = 1;
#define PACKED_SUBMIT(r)                                                                              \
    do {                                                                                              \
        const struct vring_packed_desc *t_ = &ptmpl[3ul * (r)];                                       \
        uint16_t bits_ = p_avail_wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;         \
        uint32_t head_ = p_avail;                                                                     \
        uint16_t head_flags_ = t_[0].flags | bits_;                                                   \
        for (unsigned k_ = 0; k_ < dpr; k_++) {                                                       \
            volatile struct vring_packed_desc *d_ = &pring[p_avail];                                  \
            d_->addr = t_[k_].addr;                                                                   \
            d_->len = t_[k_].len;                                                                     \
            d_->id = t_[k_].id;                                                                       \
            if (k_) d_->flags = t_[k_].flags | bits_;                                                 \
            if (++p_avail == N) { p_avail = 0; p_avail_wrap ^= 1;                                     \
                                  bits_ = p_avail_wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED; } \
        }                                                                                             \
        __atomic_store_n(&pring[head_].flags, head_flags_, __ATOMIC_RELEASE);                         \
    } while (0)
/* Request r completed (either ring layout): check its status, count its latency inside
 * the measured window, and set refill_ to whether it goes out again; if so its header
 * has a new sector (same slot, new random offset) and its status byte is reset. */
#define COMPLETE_REQ(r_, refill_)                                                             \
    do {                                                                                      \
        uint8_t *stp_ = req_base + 64ul * (r_) + 16;                                          \
        if (*stp_ != VIRTIO_BLK_S_OK)                                                         \
            errors++;                                                                         \
        uint64_t lat_ = now - sub_ts[r_];                                                     \
        if (measuring && !draining) {                                                         \
            completions++;                                                                    \
            lat_sum += lat_;                                                                  \
            if (lat_ > lat_max) lat_max = lat_;                                               \
            if (lat_ < lat_min) lat_min = lat_;                                               \
            hist[hbucket(lat_)]++;                                                            \
        }                                                                                     \
        (refill_) = !(draining || (opt.max_ios && submitted >= opt.max_ios));                 \
        if (!(refill_)) {                                                                     \
            inflight--;                                                                       \
            break;                                                                            \
        }                                                                                     \
        submitted++;                                                                          \
        struct virtio_blk_outhdr *h_ = (void *)(req_base + 64ul * (r_));                      \
        h_->sector = next_block(&rng, &seq_next, nblocks) * spb;                              \
        *stp_ = 0xff;                                                                         \
    } while (0)
    unsigned inflight = 0;
    uint64_t kicks = 0, kicks_suppressed = 0, completions = 0, errors = 0, bad_ids = 0;
    uint64_t lat_sum = 0, lat_max = 0, lat_min = UINT64_MAX;
    int measuring = 0, draining = 0;
    uint64_t submitted = 0;
    const unsigned first = opt.max_ios && opt.max_ios < opt.qd ? (unsigned)opt.max_ios : opt.qd;

    /* submit all requests */
    uint64_t t0 = now_ns();
    for (unsigned i = 0; i < first; i++) {
        struct virtio_blk_outhdr *h = (void *)(req_base + 64ul * i);
        h->sector = next_block(&rng, &seq_next, nblocks) * spb;
        req_base[64ul * i + 16] = 0xff;
        sub_ts[i] = t0;
        if (packed) {
            PACKED_SUBMIT(i);
            continue;
        }
        avail_ring[avail_idx & (N - 1)] = (uint16_t)(i * dpr);
        avail_idx++;
    }
    if (event_idx && !packed)
        *used_event_p = opt.no_call ? (uint16_t)(last_used + 0x8000) : last_used;
    if (!packed)
        __atomic_store_n(avail_idx_p, avail_idx, __ATOMIC_RELEASE);
    inflight = first;
    submitted = first;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (write(kickfd, &one, 8) != 8)
        die("kick: %s", strerror(errno));
    kicks++;

    uint64_t warm_end = t0 + (uint64_t)(opt.warmup_s * 1e9);
    uint64_t meas_start = 0, meas_end = 0, end_deadline = 0;
    if (opt.warmup_s <= 0) {
        measuring = 1;
        meas_start = t0;
        end_deadline = t0 + (uint64_t)(opt.time_s * 1e9);
    }
    uint64_t drain_deadline = 0;
    uint16_t old_avail = avail_idx;
    unsigned idle = 0;

    for (;;) {
        uint64_t now;
        if (packed) {
            uint16_t fl = __atomic_load_n(&pring[p_used].flags, __ATOMIC_ACQUIRE);
            int ready = !!(fl & VRING_PACKED_DESC_F_AVAIL) == p_used_wrap && !!(fl & VRING_PACKED_DESC_F_USED) == p_used_wrap;
            if (!ready) {
                if (opt.wait)
                    wait_call(callfd);
                else if (++idle < 1024)
                    continue;
                idle = 0;
                now = now_ns();
            } else {
                idle = 0;
                now = now_ns();
                unsigned batch = 0;
                for (;;) {
                    fl = __atomic_load_n(&pring[p_used].flags, __ATOMIC_ACQUIRE);
                    if (!(!!(fl & VRING_PACKED_DESC_F_AVAIL) == p_used_wrap
                          && !!(fl & VRING_PACKED_DESC_F_USED) == p_used_wrap))
                        break;
                    uint32_t r = pring[p_used].id;
                    p_used += dpr;
                    if (p_used >= N) { p_used -= N; p_used_wrap ^= 1; }
                    if (r >= opt.qd) {
                        bad_ids++;
                        errors++;
                        continue;
                    }
                    int refill;
                    COMPLETE_REQ(r, refill);
                    if (!refill)
                        continue;
                    PACKED_SUBMIT(r);
                    sub_ts[r] = now;
                    batch++;
                }
                if (batch) {
                    __atomic_thread_fence(__ATOMIC_SEQ_CST);
                    if (device_ev->flags != VRING_PACKED_EVENT_F_DISABLE) {
                        if (write(kickfd, &one, 8) != 8 && errno != EAGAIN)
                            die("kick: %s", strerror(errno));
                        kicks += measuring;
                    } else {
                        kicks_suppressed += measuring;
                    }
                }
            }
            goto progress;
        }
        uint16_t uidx = __atomic_load_n(used_idx_p, __ATOMIC_ACQUIRE);
        if (uidx == last_used) {
            if (opt.wait)
                wait_call(callfd);
            else if (++idle < 1024)
                continue;
            idle = 0;
            now = now_ns();
        } else {
            idle = 0;
            now = now_ns();
            unsigned batch = 0;
            while (last_used != uidx) {
                volatile struct vring_used_elem *e = &used_ring[last_used & (N - 1)];
                uint32_t id = e->id;
                last_used++;
                uint32_t r = id / dpr;
                if (r >= opt.qd || id % dpr) {
                    bad_ids++;
                    errors++;
                    continue;
                }
                int refill;
                COMPLETE_REQ(r, refill);
                if (!refill)
                    continue;
                avail_ring[avail_idx & (N - 1)] = (uint16_t)id;
                avail_idx++;
                sub_ts[r] = now;
                batch++;
            }
            if (event_idx)
                *used_event_p = opt.no_call ? (uint16_t)(last_used + 0x8000) : last_used;
            if (batch) {
                __atomic_store_n(avail_idx_p, avail_idx, __ATOMIC_RELEASE);
                /* store(avail->idx) must be visible before we read the
                 * backend's notification suppression state */
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                int kick;
                if (event_idx)
                    kick = need_event(*avail_event_p, avail_idx, old_avail);
                else
                    kick = !(*used_flags & VRING_USED_F_NO_NOTIFY);
                old_avail = avail_idx;
                if (kick) {
                    if (write(kickfd, &one, 8) != 8 && errno != EAGAIN)
                        die("kick: %s", strerror(errno));
                    kicks += measuring;
                } else {
                    kicks_suppressed += measuring;
                }
            }
        }
    progress:
        if (stop_flag && !draining) {
            if (!measuring) {
                meas_start = now;
                measuring = 1;
            }
            meas_end = now;
            draining = 1;
            drain_deadline = now + 5000000000ull;
        }
        if (!measuring) {
            if (now >= warm_end) {
                measuring = 1;
                meas_start = now;
                end_deadline = now + (uint64_t)(opt.time_s * 1e9);
                kicks = 0;
            }
        } else if (!draining) {
            if (inflight == 0) { /* --ios reached and everything completed */
                meas_end = now;
                break;
            }
            if (now >= end_deadline) {
                meas_end = now;
                draining = 1;
                drain_deadline = now + 5000000000ull;
            }
        } else {
            if (inflight == 0)
                break;
            if (now > drain_deadline) {
                fprintf(stderr, "vublk_loadgen: %u requests never completed\n", inflight);
                errors += inflight;
                break;
            }
        }
    }
    /* completions counted while draining are outside the measured window for
     * IOPS purposes; count them only for latency.  Use the window. */
    double secs = (double)(meas_end - meas_start) / 1e9;

    /* Stop the ring; the reply tells us how far the backend consumed. */
    int64_t backend_avail = -1;
    if (inflight == 0) {
        struct vhu_msg m, r;
        memset(&m, 0, sizeof(m));
        m.request = VHU_GET_VRING_BASE;
        m.flags = VHU_VERSION;
        m.size = sizeof(struct vhu_vring_state);
        m.p.state.index = 0;
        vhu_send(&m, -1);
        vhu_recv_reply(VHU_GET_VRING_BASE, &r);
        if (r.size >= 8)
            backend_avail = r.p.state.num;
        uint32_t expect = packed ? (p_avail | (uint32_t)p_avail_wrap << 15) * 0x10001u : avail_idx;
        if (backend_avail != expect)
            fprintf(stderr, "vublk_loadgen: GET_VRING_BASE returned %" PRId64 ", expected %u\n",
                    backend_avail, expect);
    }
    close(sock_fd);

    /* Only completions observed inside [meas_start, meas_end) are counted
     * (for both IOPS and latency); requests still in flight at meas_end are
     * drained but not counted. */
    uint64_t window_ios = completions;
    double iops = secs > 0 ? (double)window_ios / secs : 0;
    double mean_us = completions ? (double)lat_sum / (double)completions / 1000.0 : 0;
    double p50_us = hist_pct(completions, 50) / 1000.0;
    double p99_us = hist_pct(completions, 99) / 1000.0;
    double p999_us = hist_pct(completions, 99.9) / 1000.0;

    printf("{\"rw\":\"%s\",\"qd\":%u,\"bs\":%u,\"iops\":%.0f,\"mean_lat_us\":%.3f,"
           "\"p50_lat_us\":%.3f,\"p99_lat_us\":%.3f,\"p999_lat_us\":%.3f,\"min_lat_us\":%.3f,"
           "\"max_lat_us\":%.3f,\"errors\":%" PRIu64 ",\"ios\":%" PRIu64 ",\"secs\":%.3f,"
           "\"kicks\":%" PRIu64 ",\"kicks_suppressed\":%" PRIu64 ",\"event_idx\":%s,"
           "\"no_call\":%s,\"wait\":%s,\"indirect\":%s,\"packed\":%s,\"queue_size\":%u,\"features\":\"0x%" PRIx64 "\","
           "\"capacity_bytes\":%" PRIu64 ",\"socket\":\"%s\"}\n",
           opt.seq ? (opt.write ? "write" : "read") : (opt.write ? "randwrite" : "randread"), opt.qd, opt.bs, iops, mean_us, p50_us, p99_us,
           p999_us, completions ? lat_min / 1000.0 : 0.0, lat_max / 1000.0, errors, completions,
           secs, kicks, kicks_suppressed, event_idx ? "true" : "false",
           opt.no_call ? "true" : "false", opt.wait ? "true" : "false", use_indirect ? "true" : "false", packed ? "true" : "false", N, features,
           capacity_sectors * 512, opt.socket);
    fflush(stdout);
    if (bad_ids)
        fprintf(stderr, "vublk_loadgen: %" PRIu64 " used elements with invalid id\n", bad_ids);
    return errors ? 1 : 0;
}
