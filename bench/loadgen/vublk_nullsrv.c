/*
 * vublk_nullsrv - a "zero-cost" polling vhost-user-blk BACKEND used only to
 * calibrate the load generator (how many IOPS can the frontend drive when the
 * target does no work at all?).
 *
 * It completes every request immediately with VIRTIO_BLK_S_OK without
 * touching the data buffers, busy-polls its single virtqueue, keeps
 * VRING_USED_F_NO_NOTIFY set (so the frontend never has to kick), and signals
 * the call eventfd only when the frontend asked for it (no
 * VRING_AVAIL_F_NO_INTERRUPT / EVENT_IDX used_event).
 *
 * Written from the vhost-user spec and the virtio 1.x split-ring spec.
 * Not a storage target: nothing is stored.
 *
 * usage: vublk_nullsrv --socket PATH [--size BYTES] [--cpu C] [--once] [-v]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

enum {
    VHU_GET_FEATURES = 1, VHU_SET_FEATURES = 2, VHU_SET_OWNER = 3, VHU_RESET_OWNER = 4,
    VHU_SET_MEM_TABLE = 5, VHU_SET_LOG_BASE = 6, VHU_SET_LOG_FD = 7, VHU_SET_VRING_NUM = 8,
    VHU_SET_VRING_ADDR = 9, VHU_SET_VRING_BASE = 10, VHU_GET_VRING_BASE = 11,
    VHU_SET_VRING_KICK = 12, VHU_SET_VRING_CALL = 13, VHU_SET_VRING_ERR = 14,
    VHU_GET_PROTOCOL_FEATURES = 15, VHU_SET_PROTOCOL_FEATURES = 16, VHU_GET_QUEUE_NUM = 17,
    VHU_SET_VRING_ENABLE = 18, VHU_GET_CONFIG = 24, VHU_SET_CONFIG = 25,
};
#define VHU_FLAG_REPLY (1u << 2)
#define VHU_FLAG_NEED_REPLY (1u << 3)
#define BIT(n) (1ull << (n))
#define VHU_F_PROTOCOL_FEATURES 30
#define VHU_PROTO_F_MQ 0
#define VHU_PROTO_F_REPLY_ACK 3
#define VHU_PROTO_F_CONFIG 9
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_RING_F_INDIRECT_DESC 28
#define VIRTIO_RING_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_USED_F_NO_NOTIFY 1
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct vring_desc { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; };
struct region { uint64_t gpa, size, uva; uint8_t *map; size_t maplen; uint64_t off; };

struct msg {
    uint32_t request, flags, size;
    union {
        uint64_t u64;
        struct { uint32_t index, num; } state;
        struct { uint32_t index, flags; uint64_t desc, used, avail, log; } __attribute__((packed)) addr;
        struct { uint32_t nregions, pad; struct { uint64_t gpa, size, uva, off; } r[8]; } __attribute__((packed)) mem;
        struct { uint32_t offset, size, flags; uint8_t data[256]; } __attribute__((packed)) cfg;
        uint8_t raw[4096];
    } p;
} __attribute__((packed));

static struct {
    const char *socket;
    uint64_t size;
    int cpu, once, verbose;
} opt = { NULL, 1ull << 30, -1, 0, 0 };

static int conn = -1;
static uint64_t features, proto;
static struct region regs[8];
static unsigned nregs;
static struct {
    unsigned num;
    uint16_t last_avail;
    struct vring_desc *desc;
    volatile uint16_t *avail; /* flags, idx, ring[], used_event */
    volatile uint16_t *used;  /* flags, idx, elems..., avail_event */
    int kick, call;
    int started, enabled;
    uint16_t signalled_used;
    int signalled_valid;
} vq;

static void vlog(const char *f, ...)
{
    if (!opt.verbose) return;
    va_list ap; va_start(ap, f);
    fprintf(stderr, "vublk_nullsrv: "); vfprintf(stderr, f, ap); fputc('\n', stderr);
    va_end(ap);
}

static void *gpa_to_va(uint64_t gpa, uint64_t len)
{
    for (unsigned i = 0; i < nregs; i++)
        if (gpa >= regs[i].gpa && gpa + len <= regs[i].gpa + regs[i].size)
            return regs[i].map + regs[i].off + (gpa - regs[i].gpa);
    return NULL;
}

static void *uva_to_va(uint64_t uva)
{
    for (unsigned i = 0; i < nregs; i++)
        if (uva >= regs[i].uva && uva < regs[i].uva + regs[i].size)
            return regs[i].map + regs[i].off + (uva - regs[i].uva);
    return NULL;
}

static void unmap_all(void)
{
    for (unsigned i = 0; i < nregs; i++)
        munmap(regs[i].map, regs[i].maplen);
    nregs = 0;
}

static void reset_conn(void)
{
    unmap_all();
    if (vq.kick >= 0) close(vq.kick);
    if (vq.call >= 0) close(vq.call);
    memset(&vq, 0, sizeof(vq));
    vq.kick = vq.call = -1;
    features = proto = 0;
}

/* returns -1 on EOF/error */
static int recv_msg(struct msg *m, int *fds, int *nfds)
{
    union { char buf[CMSG_SPACE(8 * sizeof(int))]; struct cmsghdr a; } u;
    struct iovec iov = { m, 12 };
    struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof(u.buf) };
    ssize_t n = recvmsg(conn, &mh, MSG_CMSG_CLOEXEC | MSG_WAITALL);
    if (n != 12) return -1;
    *nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            memcpy(fds + *nfds, CMSG_DATA(c), (size_t)k * sizeof(int));
            *nfds += k;
        }
    if (m->size > sizeof(m->p)) return -1;
    if (m->size && recv(conn, &m->p, m->size, MSG_WAITALL) != (ssize_t)m->size) return -1;
    return 0;
}

static void reply(struct msg *m, uint32_t size)
{
    m->flags = 1 | VHU_FLAG_REPLY;
    m->size = size;
    if (send(conn, m, 12 + size, MSG_NOSIGNAL) < 0) vlog("send: %s", strerror(errno));
}

static void reply_u64(struct msg *m, uint64_t v)
{
    m->p.u64 = v;
    reply(m, 8);
}

static int handle_msg(void)
{
    struct msg m;
    int fds[8], nfds = 0, rc = 0;
    if (recv_msg(&m, fds, &nfds)) return -1;
    int replied = 0;
    switch (m.request) {
    case VHU_GET_FEATURES:
        reply_u64(&m, BIT(VIRTIO_F_VERSION_1) | BIT(VHU_F_PROTOCOL_FEATURES) |
                          BIT(VIRTIO_RING_F_EVENT_IDX) | BIT(VIRTIO_RING_F_INDIRECT_DESC) |
                          BIT(VIRTIO_BLK_F_BLK_SIZE) | BIT(VIRTIO_BLK_F_SEG_MAX));
        replied = 1;
        break;
    case VHU_SET_FEATURES: features = m.p.u64; break;
    case VHU_GET_PROTOCOL_FEATURES:
        reply_u64(&m, BIT(VHU_PROTO_F_MQ) | BIT(VHU_PROTO_F_REPLY_ACK) | BIT(VHU_PROTO_F_CONFIG));
        replied = 1;
        break;
    case VHU_SET_PROTOCOL_FEATURES: proto = m.p.u64; break;
    case VHU_GET_QUEUE_NUM: reply_u64(&m, 1); replied = 1; break;
    case VHU_SET_OWNER: case VHU_RESET_OWNER: case VHU_SET_VRING_ERR: break;
    case VHU_SET_MEM_TABLE:
        unmap_all();
        for (unsigned i = 0; i < m.p.mem.nregions && i < 8 && (int)i < nfds; i++) {
            size_t len = m.p.mem.r[i].size + m.p.mem.r[i].off;
            void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fds[i], 0);
            if (p == MAP_FAILED) { rc = 1; break; }
            regs[nregs++] = (struct region){ m.p.mem.r[i].gpa, m.p.mem.r[i].size, m.p.mem.r[i].uva,
                                             p, len, m.p.mem.r[i].off };
        }
        break;
    case VHU_SET_VRING_NUM: vq.num = m.p.state.num; break;
    case VHU_SET_VRING_BASE: vq.last_avail = (uint16_t)m.p.state.num; break;
    case VHU_SET_VRING_ADDR:
        vq.desc = uva_to_va(m.p.addr.desc);
        vq.avail = uva_to_va(m.p.addr.avail);
        vq.used = uva_to_va(m.p.addr.used);
        if (!vq.desc || !vq.avail || !vq.used) rc = 1;
        else vq.used[0] = VRING_USED_F_NO_NOTIFY;
        break;
    case VHU_SET_VRING_KICK:
    case VHU_SET_VRING_CALL: {
        int fd = (m.p.u64 & 0x100) ? -1 : (nfds ? fds[0] : -1);
        if (nfds && fd < 0) close(fds[0]);
        nfds = 0;
        if (m.request == VHU_SET_VRING_KICK) {
            if (vq.kick >= 0) close(vq.kick);
            vq.kick = fd;
            vq.started = 1;
            if (!(features & BIT(VHU_F_PROTOCOL_FEATURES))) vq.enabled = 1;
        } else {
            if (vq.call >= 0) close(vq.call);
            vq.call = fd;
        }
        break;
    }
    case VHU_SET_VRING_ENABLE: vq.enabled = m.p.state.num != 0; break;
    case VHU_GET_VRING_BASE:
        vq.started = 0;
        m.p.state.num = vq.last_avail;
        reply(&m, 8);
        replied = 1;
        break;
    case VHU_GET_CONFIG: {
        uint8_t cfg[256];
        memset(cfg, 0, sizeof(cfg));
        uint64_t cap = opt.size / 512;
        uint32_t segmax = 126, bsz = 512;
        uint16_t nq = 1;
        memcpy(cfg, &cap, 8);
        memcpy(cfg + 12, &segmax, 4);
        memcpy(cfg + 20, &bsz, 4);
        memcpy(cfg + 34, &nq, 2);
        uint32_t off = m.p.cfg.offset, sz = m.p.cfg.size;
        if (off > 256 || sz > 256 - off) { reply(&m, 0); replied = 1; break; }
        memcpy(m.p.cfg.data, cfg + off, sz);
        reply(&m, 12 + sz);
        replied = 1;
        break;
    }
    default:
        vlog("unhandled request %u", m.request);
        rc = 1;
    }
    for (int i = 0; i < nfds; i++)
        if (m.request != VHU_SET_MEM_TABLE || rc) close(fds[i]);
    if (m.request == VHU_SET_MEM_TABLE && !rc)
        for (int i = (int)nregs; i < nfds; i++) close(fds[i]);
    vlog("request %u rc=%d", m.request, rc);
    if (!replied && (m.flags & VHU_FLAG_NEED_REPLY) && (proto & BIT(VHU_PROTO_F_REPLY_ACK)))
        reply_u64(&m, rc ? 1 : 0);
    return 0;
}

static inline int need_event(uint16_t ev, uint16_t n, uint16_t o)
{
    return (uint16_t)(n - ev - 1) < (uint16_t)(n - o);
}

/* process everything available; returns number of requests completed */
static unsigned process(void)
{
    const unsigned N = vq.num;
    uint16_t aidx = __atomic_load_n(&vq.avail[1], __ATOMIC_ACQUIRE);
    if (aidx == vq.last_avail) return 0;
    volatile uint32_t *uring = (volatile uint32_t *)(vq.used + 2);
    uint16_t uidx = vq.used[1], old_uidx = uidx;
    unsigned done = 0;
    while (vq.last_avail != aidx) {
        uint16_t head = vq.avail[2 + (vq.last_avail & (N - 1))];
        vq.last_avail++;
        struct vring_desc *tbl = vq.desc;
        unsigned tmax = N;
        uint16_t i = head;
        if (tbl[i].flags & VRING_DESC_F_INDIRECT) {
            tmax = tbl[i].len / 16;
            tbl = gpa_to_va(tbl[i].addr, tbl[i].len);
            i = 0;
        }
        uint8_t *status = NULL;
        uint32_t wlen = 0;
        for (unsigned n = 0; tbl && n < tmax; n++) {
            struct vring_desc *d = &tbl[i];
            if (d->flags & VRING_DESC_F_WRITE) wlen += d->len;
            if (!(d->flags & VRING_DESC_F_NEXT)) {
                status = gpa_to_va(d->addr + d->len - 1, 1);
                break;
            }
            i = d->next;
        }
        if (status) *status = 0;
        uring[2 * (uidx & (N - 1))] = head;
        uring[2 * (uidx & (N - 1)) + 1] = wlen;
        uidx++;
        done++;
    }
    __atomic_store_n(&vq.used[1], uidx, __ATOMIC_RELEASE);
    if (features & BIT(VIRTIO_RING_F_EVENT_IDX)) /* never ask for kicks */
        vq.used[2 + 4 * N] = (uint16_t)(vq.last_avail + 0x8000);
    if (vq.call >= 0) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        int sig;
        if (features & BIT(VIRTIO_RING_F_EVENT_IDX))
            sig = need_event(vq.avail[2 + N], uidx, old_uidx);
        else
            sig = !(vq.avail[0] & VRING_AVAIL_F_NO_INTERRUPT);
        if (sig) {
            uint64_t one = 1;
            if (write(vq.call, &one, 8) < 0) { /* ignore */ }
        }
    }
    return done;
}

static volatile sig_atomic_t stop;
static void on_sig(int s) { (void)s; stop = 1; }

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "socket", 1, 0, 's' }, { "size", 1, 0, 'z' }, { "cpu", 1, 0, 'c' },
        { "once", 0, 0, 'o' }, { "verbose", 0, 0, 'v' }, { 0, 0, 0, 0 } };
    int c;
    while ((c = getopt_long(argc, argv, "s:z:c:ov", lo, NULL)) != -1) {
        switch (c) {
        case 's': opt.socket = optarg; break;
        case 'z': opt.size = strtoull(optarg, NULL, 0); break;
        case 'c': opt.cpu = atoi(optarg); break;
        case 'o': opt.once = 1; break;
        case 'v': opt.verbose = 1; break;
        default: fprintf(stderr, "usage: vublk_nullsrv --socket PATH [--size B] [--cpu C] [--once] [-v]\n"); return 2;
        }
    }
    if (!opt.socket) { fprintf(stderr, "--socket required\n"); return 2; }
    if (opt.cpu >= 0) {
        cpu_set_t s; CPU_ZERO(&s); CPU_SET(opt.cpu, &s);
        sched_setaffinity(0, sizeof(s), &s);
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa_stop;
    memset(&sa_stop, 0, sizeof(sa_stop));
    sa_stop.sa_handler = on_sig; /* no SA_RESTART: accept()/poll() must return EINTR */
    sigaction(SIGINT, &sa_stop, NULL);
    sigaction(SIGTERM, &sa_stop, NULL);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", opt.socket);
    unlink(opt.socket);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) || listen(lfd, 1)) {
        perror("bind/listen");
        return 1;
    }
    vq.kick = vq.call = -1;
    while (!stop) {
        conn = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) { if (errno == EINTR) continue; perror("accept"); break; }
        vlog("connected");
        unsigned spin = 0;
        while (!stop) {
            int active = vq.started && vq.enabled && vq.desc && vq.num;
            if (active) {
                process();
                if (++spin & 4095) continue;
            }
            struct pollfd pf = { conn, POLLIN, 0 };
            int r = poll(&pf, 1, active ? 0 : 200);
            if (r > 0 && handle_msg()) break;
        }
        vlog("disconnected");
        close(conn);
        conn = -1;
        reset_conn();
        if (opt.once) break;
    }
    unlink(opt.socket);
    return 0;
}
