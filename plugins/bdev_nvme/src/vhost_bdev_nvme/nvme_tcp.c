/*
 * NVMe/TCP initiator: NVMe over Fabrics on TCP (NVMe/TCP transport specification 1.0),
 * as SPDK's and Linux's hosts speak it.
 *
 * Queue pairs are non-blocking state machines over one TCP connection each:
 * connect -> ICReq/ICResp -> Fabrics Connect -> ready.  The admin queue is driven by
 * the control plane's thread (it waits in poll(2), bounded by its timeout); each I/O
 * queue belongs to one reactor channel and is only ever polled, never waited on: its
 * epoll fd (socket + a timerfd ticking while it is not connected) is the channel's fd.
 *
 * Reads land straight in the guest's buffers (readv into the request's iovecs, at the
 * C2HData PDU's offset); writes leave from them (sendmsg of header + guest iovecs), in
 * the command capsule when they fit the controller's in-capsule size, else in H2CData
 * PDUs answering each R2T.  Every header field the target sends is checked against the
 * command it names; anything off fails the connection, which then reconnects (the
 * commands in flight are sent again) or, once the control plane says so, fails its I/O.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

#include "vhost_core/vhost_native.h"
#include "nvme_tcp.h"

#define ADMIN_DEPTH 32
#define MAX_IO_DEPTH 128
#define MAX_QUEUES 128
#define HDR_MAX 256
#define ICREQ_LEN 128
#define CH_LEN 8
#define RSP_HLEN 24             /* CapsuleResp, C2HData, R2T, C2HTermReq headers */
#define CMD_HLEN 72
#define CONNECT_DATA_LEN 1024
#define TX_IOV_MAX (VN_MAX_IOV + 8)
#define RX_BUDGET 256           /* recv calls per poll: one busy queue cannot hold the reactor */
#define TICK_MS 100
#define MAX_SENDS 4             /* a command lost with its connection this often fails (EIO) */

enum { PDU_ICREQ = 0, PDU_ICRESP = 1, PDU_H2C_TERM = 2, PDU_C2H_TERM = 3, PDU_CMD = 4, PDU_RSP = 5,
       PDU_H2C_DATA = 6, PDU_C2H_DATA = 7, PDU_R2T = 9 };
enum { F_HDGST = 1, F_DDGST = 2, F_DATA_LAST = 4, F_DATA_SUCCESS = 8 };
enum { Q_IDLE, Q_CONNECTING, Q_ICREQ, Q_FCONNECT, Q_READY };
enum { DIR_NONE, DIR_H2C, DIR_C2H };
enum { RX_HDR, RX_PAD, RX_DATA, RX_DDGST };
enum { TX_CMD, TX_H2C, TX_ICREQ };
enum { SLOT_IO, SLOT_ADMIN, SLOT_CONNECT };

struct ctrlr;
struct slot;

struct tx {
    struct tx *next;
    struct slot *slot;
    uint8_t kind;
    uint8_t queued;
    uint32_t hdr_len;           /* header + header digest + padding */
    uint32_t data_len;
    uint32_t ddgst_len;
    uint32_t total;
    const struct iovec *iov;
    uint32_t iovcnt;
    uint64_t skip;
    uint8_t ddgst[4];
    uint8_t hdr[HDR_MAX];
};

struct slot {
    uint16_t cid;
    uint8_t busy, dir, kind, awaiting, resend, incapsule, deferred, owns, sends;
    uint8_t sqe[64];
    const struct iovec *iov;
    uint32_t iovcnt;
    uint64_t skip;
    uint32_t len;
    uint32_t xfer;              /* bytes received (C2H) or sent in H2CData (H2C) */
    uint32_t r2t_end;
    uint32_t h2c_len;           /* bytes of the H2CData PDU being sent */
    uint16_t ttag;
    int status;
    int done;
    uint8_t cqe[16];
    vn_bdev_io *io;
    struct iovec own;
    uint8_t dsm[16];
    struct tx tx;
    struct slot *next_free;
};

/* Per request, in vn_bdev_io.driver_ctx. */
struct req {
    vn_bdev_io *next;
    uint64_t next_blk;          /* blocks handed to commands so far */
    uint64_t total;
    uint32_t outstanding;       /* commands in flight */
    int32_t status;
    uint8_t queued;             /* in the qpair's pending list */
};
_Static_assert(sizeof(struct req) <= sizeof(((vn_bdev_io *)0)->driver_ctx), "struct req must fit driver_ctx");

struct ns {
    vn_bdev bdev;               /* first */
    struct ctrlr *c;
    uint32_t nsid;
};

struct qpair {
    struct ctrlr *c;
    struct ns *ns;
    uint16_t qid, depth;
    int is_admin;
    int fd, epfd, tfd;
    uint32_t ep_events;
    int timer_on;
    int state;
    uint64_t gen;
    uint64_t retry_at, deadline;
    int hd, dd;                 /* digest lengths in use: 0 or 4 */
    uint32_t maxh2cdata, cpda_align;
    /* receive */
    int rx_phase;
    uint8_t rx[HDR_MAX];
    uint32_t rx_have, rx_full;
    struct slot *rx_slot;
    uint32_t rx_datao, rx_datal, rx_done, rx_pad, rx_flags;
    uint8_t rx_dd[4];
    /* send */
    struct tx *tx_head, *tx_tail;
    uint32_t tx_off;
    struct tx ictx;
    /* commands */
    struct slot *slots, *free;
    uint32_t busy;
    vn_bdev_io *pend_head, *pend_tail;
    uint16_t cntlid_out;        /* admin: from the Connect response */
    uint16_t conn_status;
    uint32_t conn_result;
    int err_no;
    char err[120];
    struct iovec iov[TX_IOV_MAX];
};

struct ctrlr {
    atomic_int refs;
    struct sockaddr_storage sa;
    socklen_t salen;
    char addr_text[80];
    char subnqn[256], hostnqn[256];
    uint8_t hostid[16];
    int hdgst, ddgst;
    uint32_t kato_ms;
    _Atomic uint32_t incapsule, max_xfer, reconnect_ms, connect_ms;
    _Atomic uint16_t io_depth, nqueues, cntlid;
    atomic_int state, fail_io;
    _Atomic uint64_t gen;
    _Atomic uint64_t qid_used[2];
    struct qpair *admin;
    struct nvt_stats stats;     /* counters: relaxed atomics; last_error: err_lock */
    atomic_flag err_lock;
};

/* ------------------------------------------------------------------ */
/* CRC32C (Castagnoli), for header and data digests                   */
/* ------------------------------------------------------------------ */

static uint32_t crc_table[256];
static int crc_hw;

__attribute__((constructor)) static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
        crc_table[i] = c;
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2");
#endif
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc_update_hw(uint32_t crc, const uint8_t *p, size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)c;
    while (n--) crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
#endif

static uint32_t crc_update(uint32_t crc, const void *buf, size_t n)
{
    const uint8_t *p = buf;
#if defined(__x86_64__)
    if (crc_hw) return crc_update_hw(crc, p, n);
#endif
    while (n--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

uint32_t nvt_crc32c(const void *buf, size_t len)
{
    return ~crc_update(~0u, buf, len);
}

static uint32_t crc_iov(const struct iovec *iov, uint32_t cnt, uint64_t skip, uint64_t len)
{
    uint32_t crc = ~0u;
    for (uint32_t i = 0; i < cnt && len; i++) {
        uint64_t l = iov[i].iov_len;
        if (skip >= l) { skip -= l; continue; }
        uint64_t n = l - skip;
        if (n > len) n = len;
        crc = crc_update(crc, (uint8_t *)iov[i].iov_base + skip, n);
        len -= n;
        skip = 0;
    }
    return ~crc;
}

/* ------------------------------------------------------------------ */
/* little helpers                                                      */
/* ------------------------------------------------------------------ */

static inline void put16(uint8_t *p, uint16_t v) { p[0] = v; p[1] = v >> 8; }
static inline void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = v >> (8 * i); }
static inline void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = v >> (8 * i); }
static inline uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static inline void stat_add(uint64_t *p, uint64_t v)
{
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

static inline struct req *req_of(vn_bdev_io *io)
{
    return (struct req *)io->driver_ctx;
}

static void set_err(struct qpair *q, int e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->err, sizeof(q->err), fmt, ap);
    va_end(ap);
    q->err_no = e;
}

/* ------------------------------------------------------------------ */
/* queue pairs                                                         */
/* ------------------------------------------------------------------ */

static void qp_fail(struct qpair *q, int e, const char *fmt, ...);
static void qp_start_pending(struct qpair *q);
static int qp_flush_tx(struct qpair *q);

static struct qpair *qp_new(struct ctrlr *c, uint16_t qid, uint16_t depth, int with_epoll)
{
    struct qpair *q = calloc(1, sizeof(*q));
    if (!q) return NULL;
    q->slots = calloc(depth, sizeof(struct slot));
    if (!q->slots) { free(q); return NULL; }
    q->c = c;
    q->qid = qid;
    q->depth = depth;
    q->is_admin = qid == 0;
    q->fd = q->epfd = q->tfd = -1;
    for (int i = depth - 1; i >= 0; i--) {
        q->slots[i].cid = (uint16_t)i;
        q->slots[i].tx.slot = &q->slots[i];
        q->slots[i].next_free = q->free;
        q->free = &q->slots[i];
    }
    if (with_epoll) {
        q->epfd = epoll_create1(EPOLL_CLOEXEC);
        q->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (q->epfd < 0 || q->tfd < 0) goto fail;
        struct epoll_event ev = { .events = EPOLLIN, .data.u32 = 1 };
        if (epoll_ctl(q->epfd, EPOLL_CTL_ADD, q->tfd, &ev) < 0) goto fail;
    }
    return q;
fail:
    if (q->epfd >= 0) close(q->epfd);
    if (q->tfd >= 0) close(q->tfd);
    free(q->slots);
    free(q);
    return NULL;
}

static void qp_timer(struct qpair *q, int on)
{
    if (q->tfd < 0 || q->timer_on == on) return;
    struct itimerspec its = { { 0, 0 }, { 0, 0 } };
    if (on) {
        its.it_value.tv_nsec = TICK_MS * 1000000L;
        its.it_interval.tv_nsec = TICK_MS * 1000000L;
    }
    timerfd_settime(q->tfd, 0, &its, NULL);
    q->timer_on = on;
}

static void qp_update_ep(struct qpair *q)
{
    if (q->epfd < 0 || q->fd < 0) return;
    uint32_t want = EPOLLIN | ((q->tx_head || q->state == Q_CONNECTING) ? EPOLLOUT : 0);
    if (want == q->ep_events) return;
    struct epoll_event ev = { .events = want, .data.u32 = 0 };
    epoll_ctl(q->epfd, q->ep_events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, q->fd, &ev);
    q->ep_events = want;
}

static void qp_close_fd(struct qpair *q)
{
    if (q->fd < 0) return;
    if (q->epfd >= 0 && q->ep_events) epoll_ctl(q->epfd, EPOLL_CTL_DEL, q->fd, NULL);
    q->ep_events = 0;
    close(q->fd);
    q->fd = -1;
}

static void qp_free(struct qpair *q)
{
    if (!q) return;
    qp_close_fd(q);
    if (q->epfd >= 0) close(q->epfd);
    if (q->tfd >= 0) close(q->tfd);
    free(q->slots);
    free(q);
}

static struct slot *slot_get(struct qpair *q)
{
    struct slot *s = q->free;
    if (!s) return NULL;
    q->free = s->next_free;
    uint16_t cid = s->cid;
    struct tx *keep = &s->tx;
    memset(s, 0, offsetof(struct slot, tx));
    s->cid = cid;
    keep->slot = s;
    keep->queued = 0;
    s->busy = 1;
    q->busy++;
    return s;
}

static void slot_put(struct qpair *q, struct slot *s)
{
    s->busy = 0;
    s->io = NULL;
    s->next_free = q->free;
    q->free = s;
    q->busy--;
}

static void tx_queue(struct qpair *q, struct tx *t)
{
    t->total = t->hdr_len + t->data_len + t->ddgst_len;
    t->next = NULL;
    t->queued = 1;
    if (q->tx_tail) q->tx_tail->next = t;
    else q->tx_head = t;
    q->tx_tail = t;
}

/* The common header, header digest and padding up to the data at `pdo`. */
static uint32_t pdu_header(struct qpair *q, uint8_t *h, uint8_t type, uint8_t flags, uint32_t hlen,
                           uint32_t data_len)
{
    uint32_t hd = (uint32_t)q->hd;
    uint32_t pdo = 0, pad = 0, dd = 0;
    if (data_len) {
        uint32_t a = q->cpda_align ? q->cpda_align : 4;
        pdo = (hlen + hd + a - 1) / a * a;
        pad = pdo - hlen - hd;
        dd = (uint32_t)q->dd;
        if (dd) flags |= F_DDGST;
    }
    if (hd) flags |= F_HDGST;
    h[0] = type;
    h[1] = flags;
    h[2] = (uint8_t)hlen;
    h[3] = (uint8_t)pdo;
    put32(h + 4, hlen + hd + pad + data_len + dd);
    return hlen + hd + pad;
}

static void pdu_seal(struct qpair *q, struct tx *t, uint32_t hlen)
{
    if (t->hdr[1] & F_HDGST) put32(t->hdr + hlen, nvt_crc32c(t->hdr, hlen));
    if (t->hdr_len > hlen + ((t->hdr[1] & F_HDGST) ? 4u : 0u))
        memset(t->hdr + hlen + ((t->hdr[1] & F_HDGST) ? 4 : 0), 0,
               t->hdr_len - hlen - ((t->hdr[1] & F_HDGST) ? 4 : 0));
    t->ddgst_len = 0;
    if (t->data_len && (t->hdr[1] & F_DDGST)) {
        put32(t->ddgst, crc_iov(t->iov, t->iovcnt, t->skip, t->data_len));
        t->ddgst_len = 4;
    }
    (void)q;
}

static void slot_send_cmd(struct qpair *q, struct slot *s)
{
    struct tx *t = &s->tx;
    uint32_t limit = q->is_admin || s->kind == SLOT_CONNECT ? 8192 : atomic_load(&q->c->incapsule);
    s->incapsule = s->dir == DIR_H2C && s->len && s->len <= limit;
    uint8_t *sqe = s->sqe;
    sqe[1] = 0x40;              /* PSDT: SGL */
    put16(sqe + 2, s->cid);
    memset(sqe + 24, 0, 16);
    put32(sqe + 32, s->dir == DIR_NONE ? 0 : s->len);
    sqe[39] = s->incapsule ? 0x01 : 0x5A;   /* data block, offset : transport data block */
    t->kind = TX_CMD;
    t->iov = s->iov;
    t->iovcnt = s->iovcnt;
    t->skip = s->skip;
    t->data_len = s->incapsule ? s->len : 0;
    t->hdr_len = pdu_header(q, t->hdr, PDU_CMD, 0, CMD_HLEN, t->data_len);
    memcpy(t->hdr + CH_LEN, sqe, 64);
    pdu_seal(q, t, CMD_HLEN);
    s->awaiting = 1;
    s->sends++;
    s->xfer = s->incapsule ? s->len : 0;
    tx_queue(q, t);
    if (!q->is_admin && s->kind == SLOT_IO) {
        stat_add(&q->c->stats.commands, 1);
        if (s->incapsule) stat_add(&q->c->stats.in_capsule, 1);
    }
}

static void slot_send_h2c(struct qpair *q, struct slot *s)
{
    struct tx *t = &s->tx;
    uint32_t n = s->r2t_end - s->xfer;
    if (n > q->maxh2cdata) n = q->maxh2cdata;
    s->h2c_len = n;
    t->kind = TX_H2C;
    t->iov = s->iov;
    t->iovcnt = s->iovcnt;
    t->skip = s->skip + s->xfer;
    t->data_len = n;
    t->hdr_len = pdu_header(q, t->hdr, PDU_H2C_DATA, s->xfer + n == s->r2t_end ? F_DATA_LAST : 0,
                            RSP_HLEN, n);
    put16(t->hdr + 8, s->cid);
    put16(t->hdr + 10, s->ttag);
    put32(t->hdr + 12, s->xfer);
    put32(t->hdr + 16, n);
    put32(t->hdr + 20, 0);
    pdu_seal(q, t, RSP_HLEN);
    tx_queue(q, t);
}

static void req_finish_one(struct qpair *q, vn_bdev_io *io, int status)
{
    struct req *r = req_of(io);
    if (status && !r->status) r->status = status;
    r->outstanding--;
    if (r->outstanding || r->queued) return;
    struct nvt_stats *st = &q->c->stats;
    uint32_t t = io->type < 6 ? io->type : 5;
    if (r->status) {
        stat_add(&st->errors[t], 1);
    } else {
        stat_add(&st->ops[t], 1);
        if (io->type == VN_IO_READ) stat_add(&st->bytes_read, io->num_blocks * q->ns->bdev.block_size);
        if (io->type == VN_IO_WRITE) stat_add(&st->bytes_written, io->num_blocks * q->ns->bdev.block_size);
    }
    io->cb(io, r->status);
}

static void slot_complete(struct qpair *q, struct slot *s, int status)
{
    s->awaiting = 0;
    if (s->tx.queued) {             /* still being sent: finish once it is out */
        s->deferred = 1;
        s->status = status;
        return;
    }
    if (s->kind == SLOT_IO) {
        vn_bdev_io *io = s->io;
        slot_put(q, s);
        req_finish_one(q, io, status);
    } else if (s->kind == SLOT_CONNECT) {
        slot_put(q, s);
    } else {
        s->status = status;
        s->done = 1;               /* the admin caller collects it */
    }
}

/* A sent PDU left the socket entirely. */
static void tx_done(struct qpair *q, struct tx *t)
{
    t->queued = 0;
    if (t->kind == TX_ICREQ) return;
    struct slot *s = t->slot;
    if (s->deferred) {
        s->deferred = 0;
        slot_complete(q, s, s->status);
        return;
    }
    if (t->kind == TX_H2C) {
        s->xfer += s->h2c_len;
        if (s->xfer < s->r2t_end) slot_send_h2c(q, s);
    }
}

/* Append bytes [skip, skip+len) of a buffer list to q->iov; false when they do not fit. */
static int iov_add(struct qpair *q, int *n, const struct iovec *src, uint32_t cnt, uint64_t skip, uint64_t len)
{
    if (!len) return 1;
    int k = vn_iov_slice(src, cnt, skip, len, q->iov + *n, TX_IOV_MAX - *n);
    if (k < 0) return 0;
    *n += k;
    return 1;
}

/* 0, or -errno (the connection failed: the caller fails it). */
static int qp_flush_tx(struct qpair *q)
{
    while (q->tx_head && q->fd >= 0) {
        int n = 0;
        uint64_t skip = q->tx_off;
        for (struct tx *t = q->tx_head; t; t = t->next) {
            int mark = n;
            struct iovec h = { t->hdr, t->hdr_len }, d = { t->ddgst, t->ddgst_len };
            uint64_t s0 = skip, l;
            int ok = 1;
            l = t->hdr_len > s0 ? t->hdr_len - s0 : 0;
            ok = ok && iov_add(q, &n, &h, 1, t->hdr_len - l, l);
            s0 = s0 > t->hdr_len ? s0 - t->hdr_len : 0;
            l = t->data_len > s0 ? t->data_len - s0 : 0;
            ok = ok && iov_add(q, &n, t->iov, t->iovcnt, t->skip + (t->data_len - l), l);
            s0 = s0 > t->data_len ? s0 - t->data_len : 0;
            l = t->ddgst_len > s0 ? t->ddgst_len - s0 : 0;
            ok = ok && iov_add(q, &n, &d, 1, t->ddgst_len - l, l);
            if (!ok) {
                if (mark == 0) return -EFAULT;     /* a data list outside its iovecs */
                n = mark;
                break;
            }
            skip = 0;
        }
        struct msghdr mh = { .msg_iov = q->iov, .msg_iovlen = (size_t)n };
        ssize_t w = sendmsg(q->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            return -errno;
        }
        while (w > 0 && q->tx_head) {
            struct tx *t = q->tx_head;
            uint64_t rem = t->total - q->tx_off;
            if ((uint64_t)w < rem) {
                q->tx_off += (uint32_t)w;
                w = 0;
                break;
            }
            w -= (ssize_t)rem;
            q->tx_off = 0;
            q->tx_head = t->next;
            if (!q->tx_head) q->tx_tail = NULL;
            tx_done(q, t);
        }
    }
    qp_update_ep(q);
    return 0;
}

static void fabrics_connect_sqe(struct qpair *q, struct slot *s)
{
    struct ctrlr *c = q->c;
    uint8_t *sqe = s->sqe;
    sqe[0] = 0x7f;              /* Fabrics */
    sqe[4] = 0x01;              /* Connect */
    put16(sqe + 40, 0);         /* RECFMT */
    put16(sqe + 42, q->qid);
    put16(sqe + 44, (uint16_t)(q->depth - 1));
    put32(sqe + 48, q->is_admin ? c->kato_ms : 0);
}

static int qp_send_connect(struct qpair *q)
{
    struct slot *s = slot_get(q);
    if (!s) return -EBUSY;
    s->kind = SLOT_CONNECT;
    uint8_t *data = calloc(1, CONNECT_DATA_LEN);
    if (!data) { slot_put(q, s); return -ENOMEM; }
    struct ctrlr *c = q->c;
    memcpy(data, c->hostid, 16);
    put16(data + 16, q->is_admin ? 0xffff : atomic_load(&c->cntlid));
    memcpy(data + 256, c->subnqn, strnlen(c->subnqn, 255));
    memcpy(data + 512, c->hostnqn, strnlen(c->hostnqn, 255));
    fabrics_connect_sqe(q, s);
    s->own.iov_base = data;
    s->own.iov_len = CONNECT_DATA_LEN;
    s->owns = 1;
    s->iov = &s->own;
    s->iovcnt = 1;
    s->len = CONNECT_DATA_LEN;
    s->dir = DIR_H2C;
    slot_send_cmd(q, s);
    return 0;
}

static void connect_data_free(struct slot *s)
{
    if (s->owns && s->own.iov_base) {
        free(s->own.iov_base);
        s->own.iov_base = NULL;
    }
}

static void qp_send_icreq(struct qpair *q)
{
    struct tx *t = &q->ictx;
    memset(t->hdr, 0, ICREQ_LEN);
    t->hdr[0] = PDU_ICREQ;
    t->hdr[2] = ICREQ_LEN;
    put32(t->hdr + 4, ICREQ_LEN);
    put16(t->hdr + 8, 0);       /* PFV */
    t->hdr[10] = 0;             /* HPDA: no alignment needed for our data */
    t->hdr[11] = (uint8_t)((q->c->hdgst ? 1 : 0) | (q->c->ddgst ? 2 : 0));
    put32(t->hdr + 12, 0);      /* MAXR2T: one outstanding R2T per command */
    t->kind = TX_ICREQ;
    t->slot = NULL;
    t->hdr_len = ICREQ_LEN;
    t->data_len = 0;
    t->ddgst_len = 0;
    t->iov = NULL;
    t->iovcnt = 0;
    tx_queue(q, t);
    q->state = Q_ICREQ;
}

static int qp_start(struct qpair *q)
{
    struct ctrlr *c = q->c;
    q->rx_phase = RX_HDR;
    q->rx_have = 0;
    q->rx_full = 0;
    q->tx_off = 0;
    q->hd = q->dd = 0;
    q->maxh2cdata = 0;
    q->cpda_align = 0;
    q->gen = atomic_load(&c->gen);
    int fd = socket(c->sa.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        set_err(q, errno, "cannot create a TCP socket: %s", strerror(errno));
        return -errno;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    q->fd = fd;
    q->deadline = now_ms() + atomic_load(&c->connect_ms);
    if (connect(fd, (struct sockaddr *)&c->sa, c->salen) < 0 && errno != EINPROGRESS) {
        int e = errno;
        qp_fail(q, e, "cannot connect to %s: %s", c->addr_text, strerror(e));
        return -e;
    }
    q->state = Q_CONNECTING;
    qp_update_ep(q);
    return 0;
}

static void qp_fail_io(struct qpair *q, int status);

static void qp_fail(struct qpair *q, int e, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->err, sizeof(q->err), fmt, ap);
    va_end(ap);
    q->err_no = e ? e : EIO;
    int was = q->state;
    qp_close_fd(q);
    q->state = Q_IDLE;
    for (struct tx *t = q->tx_head; t; t = t->next) t->queued = 0;
    q->tx_head = q->tx_tail = NULL;
    q->tx_off = 0;
    q->rx_phase = RX_HDR;
    q->rx_have = 0;
    q->retry_at = now_ms() + atomic_load(&q->c->reconnect_ms);
    for (uint32_t i = 0; i < q->depth; i++) {
        struct slot *s = &q->slots[i];
        if (!s->busy) continue;
        s->deferred = 0;
        if (s->kind == SLOT_IO) {
            /* Sent again once reconnected, unless it went down with its connection too often
             * (a target that chokes on it): then it fails, below. */
            s->resend = s->sends < MAX_SENDS ? 1 : 2;
            s->awaiting = 0;
            s->xfer = 0;
        } else if (s->kind == SLOT_CONNECT) {
            connect_data_free(s);
            slot_put(q, s);
        } else if (!s->done) {
            s->awaiting = 0;
            s->status = -ECONNRESET;
            s->done = 1;
        }
    }
    if (!q->is_admin) {
        struct ctrlr *c = q->c;
        if (was == Q_READY) stat_add(&c->stats.io_disconnects, 1);
        while (atomic_flag_test_and_set(&c->err_lock)) { }
        c->stats.last_errno = -q->err_no;
        snprintf(c->stats.last_error, sizeof(c->stats.last_error), "I/O queue %u: %s", q->qid, q->err);
        atomic_flag_clear(&c->err_lock);
        qp_timer(q, 1);
        if (atomic_load(&c->fail_io)) {
            qp_fail_io(q, -EIO);
        } else {
            for (uint32_t i = 0; i < q->depth; i++) {
                struct slot *s = &q->slots[i];
                if (s->busy && s->kind == SLOT_IO && s->resend == 2) {
                    s->resend = 0;
                    slot_complete(q, s, -EIO);
                }
            }
        }
    }
}

/* Fail every request of the queue pair: waiting ones and commands to be sent again. */
static void qp_fail_io(struct qpair *q, int status)
{
    vn_bdev_io *io = q->pend_head;
    q->pend_head = q->pend_tail = NULL;
    uint64_t n = 0;
    while (io) {
        struct req *r = req_of(io);
        vn_bdev_io *next = r->next;
        r->queued = 0;
        if (!r->status) r->status = status;
        n++;
        if (r->outstanding == 0) {
            r->outstanding = 1;
            req_finish_one(q, io, status);
        }
        io = next;
    }
    for (uint32_t i = 0; i < q->depth; i++) {
        struct slot *s = &q->slots[i];
        if (s->busy && s->kind == SLOT_IO && s->resend) {
            s->resend = 0;
            slot_complete(q, s, status);
        }
    }
    if (n) stat_add(&q->c->stats.failed_fast, n);
}

static void qp_ready(struct qpair *q)
{
    q->state = Q_READY;
    if (!q->is_admin) {
        stat_add(&q->c->stats.io_connects, 1);
        qp_timer(q, 0);
        for (uint32_t i = 0; i < q->depth; i++) {
            struct slot *s = &q->slots[i];
            if (s->busy && s->kind == SLOT_IO && s->resend) {
                s->resend = 0;
                stat_add(&q->c->stats.resent, 1);
                slot_send_cmd(q, s);
            }
        }
        qp_start_pending(q);
    }
}

/* ------------------------------------------------------------------ */
/* receiving                                                           */
/* ------------------------------------------------------------------ */

static struct slot *rx_slot_for(struct qpair *q, uint16_t cid, const char *what)
{
    if (cid >= q->depth || !q->slots[cid].busy || !q->slots[cid].awaiting) {
        qp_fail(q, EPROTO, "the target sent a %s for command %u, which is not in flight", what, cid);
        return NULL;
    }
    return &q->slots[cid];
}

static void rx_capsule_resp(struct qpair *q)
{
    const uint8_t *cqe = q->rx + CH_LEN;
    struct slot *s = rx_slot_for(q, get16(cqe + 12), "response");
    if (!s) return;
    uint16_t status = get16(cqe + 14) >> 1;
    memcpy(s->cqe, cqe, 16);
    if (!status && s->dir == DIR_C2H && s->xfer != s->len) {
        qp_fail(q, EPROTO, "the target completed read command %u with %u of its %u bytes", s->cid, s->xfer,
                s->len);
        return;
    }
    if (!status && s->dir == DIR_H2C && s->xfer != s->len && !(s->tx.queued && s->tx.kind == TX_H2C &&
                                                                s->xfer + s->h2c_len == s->len)) {
        qp_fail(q, EPROTO, "the target completed write command %u having taken %u of its %u bytes", s->cid,
                s->xfer, s->len);
        return;
    }
    if (q->state == Q_FCONNECT && s->sqe[0] == 0x7f && s->sqe[4] == 0x01) {
        connect_data_free(s);
        q->conn_status = status;
        q->conn_result = get32(cqe);
        if (status) {
            slot_complete(q, s, -EREMOTEIO);
            qp_fail(q, EREMOTEIO, "the target refused the Fabrics Connect of queue %u: status 0x%03x", q->qid,
                    status);
            return;
        }
        if (q->is_admin) q->cntlid_out = get16(cqe);
        slot_complete(q, s, 0);
        qp_ready(q);
        return;
    }
    slot_complete(q, s, status ? -EIO : 0);
}

static void rx_r2t(struct qpair *q)
{
    const uint8_t *h = q->rx;
    struct slot *s = rx_slot_for(q, get16(h + 8), "R2T");
    if (!s) return;
    uint32_t r2to = get32(h + 12), r2tl = get32(h + 16);
    if (s->dir != DIR_H2C || s->incapsule || (s->tx.queued && s->tx.kind == TX_H2C)) {
        qp_fail(q, EPROTO, "the target sent an R2T for command %u, which has no data left to ask for", s->cid);
        return;
    }
    if (r2to != s->xfer || r2tl == 0 || r2tl > s->len - s->xfer) {
        qp_fail(q, EPROTO, "the target sent an R2T for bytes %u+%u of command %u (%u sent of %u)", r2to, r2tl,
                s->cid, s->xfer, s->len);
        return;
    }
    s->ttag = get16(h + 10);
    s->r2t_end = r2to + r2tl;
    if (s->kind == SLOT_IO) stat_add(&q->c->stats.r2t, 1);
    slot_send_h2c(q, s);
}

static void rx_icresp(struct qpair *q)
{
    const uint8_t *h = q->rx;
    uint16_t pfv = get16(h + 8);
    uint8_t cpda = h[10], dgst = h[11];
    uint32_t maxdata = get32(h + 12);
    uint8_t want = (uint8_t)((q->c->hdgst ? 1 : 0) | (q->c->ddgst ? 2 : 0));
    if (pfv != 0) {
        qp_fail(q, EPROTO, "the target speaks NVMe/TCP PDU format version %u, not 0", pfv);
        return;
    }
    if (cpda > 31 || maxdata < 4096 || maxdata % 4) {
        qp_fail(q, EPROTO, "the target's ICResp is invalid (CPDA %u, MAXH2CDATA %u)", cpda, maxdata);
        return;
    }
    if ((dgst & 3) != want) {
        qp_fail(q, EPROTO, "the target answered digests %s%s when %s%s were asked for",
                dgst & 1 ? "header" : "", dgst & 2 ? " data" : (dgst & 1 ? "" : "none"),
                want & 1 ? "header" : "", want & 2 ? " data" : (want & 1 ? "" : "none"));
        return;
    }
    q->hd = (dgst & 1) ? 4 : 0;
    q->dd = (dgst & 2) ? 4 : 0;
    q->maxh2cdata = maxdata;
    q->cpda_align = (cpda + 1u) * 4u;
    q->state = Q_FCONNECT;
    int rc = qp_send_connect(q);
    if (rc) qp_fail(q, -rc, "cannot send the Fabrics Connect: %s", strerror(-rc));
}

/* A whole header is in q->rx: check it and act.  Returns 0 or -1 (connection failed). */
static int rx_header(struct qpair *q)
{
    uint8_t type = q->rx[0], flags = q->rx[1], hlen = q->rx[2], pdo = q->rx[3];
    uint32_t plen = get32(q->rx + 4);
    if (type == PDU_C2H_TERM) {
        qp_fail(q, ECONNRESET, "the target ended the connection (C2HTermReq, reason 0x%x)", get16(q->rx + 8));
        return -1;
    }
    if (type == PDU_ICRESP) {
        rx_icresp(q);
        q->rx_have = 0;
        return q->state == Q_IDLE ? -1 : 0;
    }
    if (q->hd && get32(q->rx + hlen) != nvt_crc32c(q->rx, hlen)) {
        qp_fail(q, EBADMSG, "header digest error in a PDU of type %u from the target", type);
        return -1;
    }
    if (type == PDU_RSP) {
        q->rx_have = 0;
        rx_capsule_resp(q);
        return q->state == Q_IDLE ? -1 : 0;
    }
    if (type == PDU_R2T) {
        q->rx_have = 0;
        rx_r2t(q);
        return q->state == Q_IDLE ? -1 : 0;
    }
    /* C2HData */
    struct slot *s = rx_slot_for(q, get16(q->rx + 8), "C2HData PDU");
    if (!s) return -1;
    uint32_t datao = get32(q->rx + 12), datal = get32(q->rx + 16);
    uint32_t hdr = hlen + (uint32_t)q->hd;
    if (s->dir != DIR_C2H || datal == 0 || datao != s->xfer || datal > s->len - s->xfer) {
        qp_fail(q, EPROTO, "the target sent data bytes %u+%u for command %u (%s, %u of %u received)", datao,
                datal, s->cid, s->dir == DIR_C2H ? "a read" : "not a read", s->xfer, s->len);
        return -1;
    }
    if (pdo < hdr || (uint32_t)pdo - hdr > 128 ||
        plen != (uint32_t)pdo + datal + (uint32_t)q->dd || ((flags & F_DDGST) != 0) != (q->dd != 0) ||
        ((flags & F_DATA_SUCCESS) && !(flags & F_DATA_LAST))) {
        qp_fail(q, EPROTO, "the target sent a malformed C2HData PDU (PDO %u, PLEN %u, DATAL %u, flags 0x%x)",
                pdo, plen, datal, flags);
        return -1;
    }
    q->rx_slot = s;
    q->rx_datao = datao;
    q->rx_datal = datal;
    q->rx_done = 0;
    q->rx_pad = pdo - hdr;
    q->rx_flags = flags;
    q->rx_have = 0;
    q->rx_phase = q->rx_pad ? RX_PAD : RX_DATA;
    return 0;
}

/* The PDU's data and digest are in: account it. */
static void rx_data_done(struct qpair *q)
{
    struct slot *s = q->rx_slot;
    q->rx_phase = RX_HDR;
    q->rx_have = 0;
    if (q->dd) {
        uint32_t want = crc_iov(s->iov, s->iovcnt, s->skip + q->rx_datao, q->rx_datal);
        if (get32(q->rx_dd) != want) {
            qp_fail(q, EBADMSG, "data digest error in read data of command %u from the target", s->cid);
            return;
        }
    }
    s->xfer += q->rx_datal;
    if (q->rx_flags & F_DATA_SUCCESS) {
        if (s->xfer != s->len) {
            qp_fail(q, EPROTO, "the target ended read command %u after %u of its %u bytes", s->cid, s->xfer,
                    s->len);
            return;
        }
        slot_complete(q, s, 0);
    }
}

/* Validate the common header once 8 bytes are in; set rx_full. */
static int rx_check_ch(struct qpair *q)
{
    uint8_t type = q->rx[0], flags = q->rx[1], hlen = q->rx[2];
    uint32_t plen = get32(q->rx + 4);
    switch (type) {
    case PDU_ICRESP:
        if (q->state != Q_ICREQ || hlen != 128 || plen != 128) goto bad;
        q->rx_full = 128;
        return 0;
    case PDU_C2H_TERM:
        if (hlen != RSP_HLEN) goto bad;
        q->rx_full = RSP_HLEN;
        return 0;
    case PDU_RSP:
    case PDU_R2T:
    case PDU_C2H_DATA:
        if (q->state < Q_FCONNECT || hlen != RSP_HLEN || ((flags & F_HDGST) != 0) != (q->hd != 0)) goto bad;
        if (type != PDU_C2H_DATA && plen != RSP_HLEN + (uint32_t)q->hd) goto bad;
        q->rx_full = RSP_HLEN + (uint32_t)q->hd;
        return 0;
    default:
        break;
    }
bad:
    qp_fail(q, EPROTO, "the target sent an unexpected or malformed PDU (type %u, flags 0x%x, HLEN %u, PLEN %u)",
            type, flags, hlen, plen);
    return -1;
}

/* Receive what the socket holds (bounded).  Returns the number of PDUs handled, or -1 when the
 * connection failed. */
static int qp_rx(struct qpair *q)
{
    int handled = 0;
    for (int budget = 0; budget < RX_BUDGET && q->fd >= 0; budget++) {
        ssize_t n;
        if (q->rx_phase == RX_HDR) {
            uint32_t want;
            if (q->rx_have < CH_LEN)
                want = q->state == Q_READY ? RSP_HLEN + (uint32_t)q->hd : CH_LEN;
            else
                want = q->rx_full;
            n = recv(q->fd, q->rx + q->rx_have, want - q->rx_have, MSG_DONTWAIT);
            if (n > 0) {
                uint32_t before = q->rx_have;
                q->rx_have += (uint32_t)n;
                if (before < CH_LEN && q->rx_have >= CH_LEN && rx_check_ch(q)) return -1;
                if (q->rx_have >= CH_LEN && q->rx_have >= q->rx_full) {
                    if (rx_header(q)) return -1;
                    handled++;
                }
                continue;
            }
        } else if (q->rx_phase == RX_PAD) {
            uint8_t junk[128];
            n = recv(q->fd, junk, q->rx_pad, MSG_DONTWAIT);
            if (n > 0) {
                q->rx_pad -= (uint32_t)n;
                if (!q->rx_pad) q->rx_phase = RX_DATA;
                continue;
            }
        } else if (q->rx_phase == RX_DATA) {
            struct slot *s = q->rx_slot;
            int k = vn_iov_slice(s->iov, s->iovcnt, s->skip + q->rx_datao + q->rx_done, q->rx_datal - q->rx_done,
                                 q->iov, TX_IOV_MAX);
            if (k < 0) {
                qp_fail(q, EFAULT, "read command %u has fewer buffers than its length", s->cid);
                return -1;
            }
            n = readv(q->fd, q->iov, k);
            if (n > 0) {
                q->rx_done += (uint32_t)n;
                if (q->rx_done == q->rx_datal) {
                    if (q->dd) {
                        q->rx_phase = RX_DDGST;
                        q->rx_have = 0;
                    } else {
                        rx_data_done(q);
                        if (q->state == Q_IDLE) return -1;
                        handled++;
                    }
                }
                continue;
            }
        } else {
            n = recv(q->fd, q->rx_dd + q->rx_have, 4 - q->rx_have, MSG_DONTWAIT);
            if (n > 0) {
                q->rx_have += (uint32_t)n;
                if (q->rx_have == 4) {
                    rx_data_done(q);
                    if (q->state == Q_IDLE) return -1;
                    handled++;
                }
                continue;
            }
        }
        if (n == 0) {
            qp_fail(q, ECONNRESET, "the target closed the connection");
            return -1;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        if (errno == EINTR) continue;
        int e = errno;
        qp_fail(q, e, "receive from the target failed: %s", strerror(e));
        return -1;
    }
    return handled;
}

/* Drive the connection one step: connect completion, receive, send.  PDUs handled or -1. */
static int qp_process(struct qpair *q)
{
    if (q->fd < 0) return 0;
    if (q->state == Q_CONNECTING) {
        struct pollfd p = { q->fd, POLLOUT, 0 };
        if (poll(&p, 1, 0) <= 0) return 0;
        int err = 0;
        socklen_t l = sizeof(err);
        getsockopt(q->fd, SOL_SOCKET, SO_ERROR, &err, &l);
        if (err) {
            qp_fail(q, err, "cannot connect to %s: %s", q->c->addr_text, strerror(err));
            return -1;
        }
        qp_send_icreq(q);
    }
    int n = qp_rx(q);
    if (n < 0) return -1;
    int rc = qp_flush_tx(q);
    if (rc) {
        qp_fail(q, -rc, "send to the target failed: %s", strerror(-rc));
        return -1;
    }
    return n;
}

/* ------------------------------------------------------------------ */
/* I/O: requests become commands                                       */
/* ------------------------------------------------------------------ */

static void qp_start_pending(struct qpair *q)
{
    struct ns *ns = q->ns;
    uint32_t bs = ns->bdev.block_size;
    uint32_t max_xfer = atomic_load(&q->c->max_xfer);
    uint64_t rw_max = 65536;
    if (max_xfer && max_xfer / bs < rw_max) rw_max = max_xfer / bs ? max_xfer / bs : 1;
    while (q->pend_head && q->free && q->state == Q_READY) {
        vn_bdev_io *io = q->pend_head;
        struct req *r = req_of(io);
        struct slot *s = slot_get(q);
        uint64_t left = r->total - r->next_blk, chunk = left;
        uint64_t slba = io->offset_blocks + r->next_blk;
        uint8_t *sqe = s->sqe;
        s->kind = SLOT_IO;
        s->io = io;
        put32(sqe + 4, ns->nsid);
        switch (io->type) {
        case VN_IO_READ:
        case VN_IO_WRITE:
            if (chunk > rw_max) chunk = rw_max;
            sqe[0] = io->type == VN_IO_READ ? 0x02 : 0x01;
            put64(sqe + 40, slba);
            put32(sqe + 48, (uint32_t)(chunk - 1));
            s->iov = io->iov;
            s->iovcnt = io->iovcnt;
            s->skip = r->next_blk * bs;
            s->len = (uint32_t)(chunk * bs);
            s->dir = io->type == VN_IO_READ ? DIR_C2H : DIR_H2C;
            break;
        case VN_IO_WRITE_ZEROES:
            if (chunk > 65536) chunk = 65536;
            sqe[0] = 0x08;
            put64(sqe + 40, slba);
            put32(sqe + 48, (uint32_t)(chunk - 1));
            break;
        case VN_IO_UNMAP:
            if (chunk > 0xffffffffu) chunk = 0xffffffffu;
            sqe[0] = 0x09;
            put32(sqe + 40, 0);     /* one range */
            put32(sqe + 44, 4);     /* AD: deallocate */
            put32(s->dsm, 0);
            put32(s->dsm + 4, (uint32_t)chunk);
            put64(s->dsm + 8, slba);
            s->own.iov_base = s->dsm;
            s->own.iov_len = 16;
            s->iov = &s->own;
            s->iovcnt = 1;
            s->len = 16;
            s->dir = DIR_H2C;
            break;
        default:                    /* FLUSH: one command for the namespace */
            sqe[0] = 0x00;
            chunk = left;
            break;
        }
        r->next_blk += chunk;
        r->outstanding++;
        if (r->next_blk >= r->total) {
            q->pend_head = r->next;
            if (!q->pend_head) q->pend_tail = NULL;
            r->queued = 0;
        }
        slot_send_cmd(q, s);
    }
}

static void ns_submit(void *ctx, void *chan, vn_bdev_io *io)
{
    struct ns *ns = ctx;
    struct qpair *q = chan;
    struct req *r = req_of(io);
    r->next = NULL;
    r->next_blk = 0;
    r->outstanding = 0;
    r->status = 0;
    r->queued = 0;
    uint64_t nb = atomic_load((_Atomic uint64_t *)&ns->bdev.num_blocks);
    int bad = io->type >= VN_IO_RESET || !(ns->bdev.io_types & (1u << io->type));
    if (!bad && io->type != VN_IO_FLUSH &&
        (io->num_blocks == 0 || io->offset_blocks > nb || io->num_blocks > nb - io->offset_blocks))
        bad = 1;
    if (!bad && (io->type == VN_IO_READ || io->type == VN_IO_WRITE) &&
        (io->num_blocks * ns->bdev.block_size > VN_MAX_TRANSFER || !io->iovcnt))
        bad = 1;
    if (bad || atomic_load(&ns->c->fail_io)) {
        r->outstanding = 1;
        req_finish_one(q, io, bad ? -EINVAL : -EIO);
        return;
    }
    r->total = io->type == VN_IO_FLUSH ? 1 : io->num_blocks;
    r->queued = 1;
    if (q->pend_tail) req_of(q->pend_tail)->next = io;
    else q->pend_head = io;
    q->pend_tail = io;
    if (q->state == Q_READY) {
        qp_start_pending(q);
        int rc = qp_flush_tx(q);
        if (rc) qp_fail(q, -rc, "send to the target failed: %s", strerror(-rc));
    }
}

static void *ns_chan_create(void *ctx)
{
    struct ns *ns = ctx;
    struct ctrlr *c = ns->c;
    uint16_t nq = atomic_load(&c->nqueues), qid = 0;
    for (uint16_t i = 1; i <= nq && i <= MAX_QUEUES && !qid; i++) {
        _Atomic uint64_t *w = &c->qid_used[(i - 1) / 64];
        uint64_t bit = 1ull << ((i - 1) % 64);
        if (!(atomic_fetch_or(w, bit) & bit)) qid = i;
    }
    if (!qid) return NULL;
    struct qpair *q = qp_new(c, qid, atomic_load(&c->io_depth), 1);
    if (!q) {
        atomic_fetch_and(&c->qid_used[(qid - 1) / 64], ~(1ull << ((qid - 1) % 64)));
        return NULL;
    }
    q->ns = ns;
    atomic_fetch_add(&c->refs, 1);
    qp_timer(q, 1);
    if (atomic_load(&c->state) == NVT_ADMIN_UP) qp_start(q);
    return q;
}

static void ns_chan_destroy(void *ctx, void *chan)
{
    struct qpair *q = chan;
    struct ctrlr *c = q->c;
    (void)ctx;
    for (uint32_t i = 0; i < q->depth; i++)
        if (q->slots[i].busy && q->slots[i].kind == SLOT_CONNECT) connect_data_free(&q->slots[i]);
    uint16_t qid = q->qid;
    qp_free(q);
    atomic_fetch_and(&c->qid_used[(qid - 1) / 64], ~(1ull << ((qid - 1) % 64)));
    nvt_ctrlr_put(c);
}

static int ns_chan_poll(void *ctx, void *chan)
{
    struct qpair *q = chan;
    struct ctrlr *c = q->c;
    (void)ctx;
    if (q->timer_on) {
        uint64_t v;
        if (read(q->tfd, &v, sizeof(v)) < 0) { /* not expired yet */ }
    }
    if (q->state == Q_READY) {
        if (q->gen != atomic_load(&c->gen) || atomic_load(&c->state) != NVT_ADMIN_UP) {
            qp_fail(q, ECONNRESET, "the controller was reset (its admin queue was lost)");
            return 0;
        }
        int n = qp_process(q);
        return n > 0 ? n : 0;
    }
    if (q->state == Q_IDLE) {
        if (atomic_load(&c->fail_io)) {
            if (q->pend_head || q->busy) qp_fail_io(q, -EIO);
            return 0;
        }
        if (atomic_load(&c->state) == NVT_ADMIN_UP && now_ms() >= q->retry_at) qp_start(q);
        return 0;
    }
    if (now_ms() > q->deadline) {
        qp_fail(q, ETIMEDOUT, "no answer from %s within %u ms while connecting I/O queue %u", c->addr_text,
                atomic_load(&c->connect_ms), q->qid);
        return 0;
    }
    qp_process(q);
    return 0;
}

static int ns_chan_fd(void *ctx, void *chan)
{
    (void)ctx;
    return ((struct qpair *)chan)->epfd;
}

static const struct vn_bdev_ops nvt_ops = {
    .abi_version = VN_ABI_VERSION,
    .submit = ns_submit,
    .channel_create = ns_chan_create,
    .channel_destroy = ns_chan_destroy,
    .channel_poll = ns_chan_poll,
    .channel_fd = ns_chan_fd,
};

/* ------------------------------------------------------------------ */
/* the controller and its admin queue                                  */
/* ------------------------------------------------------------------ */

void *nvt_ctrlr_new(const char *traddr, int family, uint16_t port, const char *subnqn, const char *hostnqn,
                    const uint8_t *hostid, int hdgst, int ddgst, uint32_t kato_ms)
{
    struct ctrlr *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    atomic_init(&c->refs, 1);
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&c->sa;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        if (inet_pton(AF_INET6, traddr, &a->sin6_addr) != 1) { free(c); return NULL; }
        c->salen = sizeof(*a);
        snprintf(c->addr_text, sizeof(c->addr_text), "[%s]:%u", traddr, port);
    } else {
        struct sockaddr_in *a = (struct sockaddr_in *)&c->sa;
        a->sin_family = AF_INET;
        a->sin_port = htons(port);
        if (inet_pton(AF_INET, traddr, &a->sin_addr) != 1) { free(c); return NULL; }
        c->salen = sizeof(*a);
        snprintf(c->addr_text, sizeof(c->addr_text), "%s:%u", traddr, port);
    }
    snprintf(c->subnqn, sizeof(c->subnqn), "%s", subnqn);
    snprintf(c->hostnqn, sizeof(c->hostnqn), "%s", hostnqn);
    memcpy(c->hostid, hostid, 16);
    c->hdgst = hdgst;
    c->ddgst = ddgst;
    c->kato_ms = kato_ms;
    atomic_init(&c->incapsule, 0);
    atomic_init(&c->max_xfer, 0);
    atomic_init(&c->reconnect_ms, 1000);
    atomic_init(&c->connect_ms, 10000);
    atomic_init(&c->io_depth, MAX_IO_DEPTH);
    atomic_init(&c->nqueues, 0);
    atomic_init(&c->cntlid, 0xffff);
    atomic_init(&c->state, NVT_ADMIN_DOWN);
    atomic_init(&c->fail_io, 0);
    atomic_init(&c->gen, 1);
    atomic_flag_clear(&c->err_lock);
    return c;
}

void nvt_ctrlr_put(void *ctrlr)
{
    struct ctrlr *c = ctrlr;
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    if (c->admin) {
        for (uint32_t i = 0; i < c->admin->depth; i++)
            if (c->admin->slots[i].busy) connect_data_free(&c->admin->slots[i]);
        qp_free(c->admin);
    }
    free(c);
}

void nvt_ctrlr_set_io(void *ctrlr, uint32_t incapsule_bytes, uint32_t max_xfer_bytes, uint16_t io_depth,
                      uint16_t num_io_queues, uint32_t reconnect_delay_ms, uint32_t connect_timeout_ms)
{
    struct ctrlr *c = ctrlr;
    atomic_store(&c->incapsule, incapsule_bytes);
    atomic_store(&c->max_xfer, max_xfer_bytes);
    atomic_store(&c->io_depth, io_depth < 2 ? 2 : io_depth > MAX_IO_DEPTH ? MAX_IO_DEPTH : io_depth);
    atomic_store(&c->nqueues, num_io_queues > MAX_QUEUES ? MAX_QUEUES : num_io_queues);
    atomic_store(&c->reconnect_ms, reconnect_delay_ms);
    atomic_store(&c->connect_ms, connect_timeout_ms ? connect_timeout_ms : 10000);
}

void nvt_ctrlr_set_state(void *ctrlr, int state, uint16_t cntlid)
{
    struct ctrlr *c = ctrlr;
    if (state == NVT_ADMIN_UP) {
        atomic_store(&c->cntlid, cntlid);
        atomic_fetch_add(&c->gen, 1);
    }
    atomic_store(&c->state, state);
}

void nvt_ctrlr_set_fail_io(void *ctrlr, int fail)
{
    atomic_store(&((struct ctrlr *)ctrlr)->fail_io, fail);
}

void nvt_ctrlr_get_stats(void *ctrlr, struct nvt_stats *out)
{
    struct ctrlr *c = ctrlr;
    uint64_t *src = (uint64_t *)&c->stats, *dst = (uint64_t *)out;
    for (size_t i = 0; i < offsetof(struct nvt_stats, last_errno) / 8; i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
    while (atomic_flag_test_and_set(&c->err_lock)) { }
    out->last_errno = c->stats.last_errno;
    memcpy(out->last_error, c->stats.last_error, sizeof(out->last_error));
    atomic_flag_clear(&c->err_lock);
}

int nvt_ctrlr_io_queues_in_use(void *ctrlr)
{
    struct ctrlr *c = ctrlr;
    return __builtin_popcountll(atomic_load(&c->qid_used[0])) + __builtin_popcountll(atomic_load(&c->qid_used[1]));
}

static void copy_err(struct qpair *q, char *err, size_t errlen)
{
    if (err && errlen) snprintf(err, errlen, "%s", q->err[0] ? q->err : strerror(q->err_no ? q->err_no : EIO));
}

/* Wait (poll) until `done(q, arg)` or the deadline; 0, -ETIMEDOUT or -errno of a failed connection. */
static int admin_wait(struct qpair *q, uint64_t deadline, int (*done)(struct qpair *, void *), void *arg)
{
    for (;;) {
        if (q->state != Q_IDLE && qp_process(q) < 0) return -(q->err_no ? q->err_no : EIO);
        if (done(q, arg)) return 0;
        if (q->state == Q_IDLE) return -(q->err_no ? q->err_no : EIO);
        uint64_t now = now_ms();
        if (now >= deadline) return -ETIMEDOUT;
        struct pollfd p = { q->fd, POLLIN | ((q->tx_head || q->state == Q_CONNECTING) ? POLLOUT : 0), 0 };
        int t = (int)(deadline - now);
        if (poll(&p, 1, t > 100 ? 100 : t) < 0 && errno != EINTR) return -errno;
    }
}

static int is_ready(struct qpair *q, void *arg) { (void)arg; return q->state == Q_READY; }
static int is_done(struct qpair *q, void *arg) { (void)q; return ((struct slot *)arg)->done; }

int nvt_admin_connect(void *ctrlr, uint32_t timeout_ms, char *err, size_t errlen)
{
    struct ctrlr *c = ctrlr;
    if (c->admin) {
        qp_free(c->admin);
        c->admin = NULL;
    }
    struct qpair *q = qp_new(c, 0, ADMIN_DEPTH, 0);
    if (!q) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    c->admin = q;
    atomic_store(&c->connect_ms, timeout_ms);
    uint64_t deadline = now_ms() + timeout_ms;
    int rc = qp_start(q);
    if (!rc) rc = admin_wait(q, deadline, is_ready, NULL);
    if (rc == -ETIMEDOUT) {
        const char *stage = q->state == Q_CONNECTING ? "TCP connect" :
                            q->state == Q_ICREQ ? "ICReq (NVMe/TCP connection setup)" : "Fabrics Connect";
        qp_fail(q, ETIMEDOUT, "no answer from %s to the %s within %u ms", c->addr_text, stage, timeout_ms);
    }
    if (rc) {
        copy_err(q, err, errlen);
        return rc;
    }
    return q->cntlid_out;
}

int nvt_admin_connect_status(void *ctrlr, uint16_t *status, uint32_t *result)
{
    struct ctrlr *c = ctrlr;
    if (!c->admin) return -ENOTCONN;
    *status = c->admin->conn_status;
    *result = c->admin->conn_result;
    return 0;
}

int nvt_admin_cmd(void *ctrlr, const uint8_t *sqe, void *buf, uint32_t len, int to_ctrlr,
                  uint32_t timeout_ms, uint8_t *cqe, char *err, size_t errlen)
{
    struct ctrlr *c = ctrlr;
    struct qpair *q = c->admin;
    if (!q || q->state != Q_READY) {
        snprintf(err, errlen, "the admin queue is not connected");
        return -ENOTCONN;
    }
    struct slot *s = slot_get(q);
    if (!s) {
        snprintf(err, errlen, "no free admin command slot");
        return -EBUSY;
    }
    s->kind = SLOT_ADMIN;
    memcpy(s->sqe, sqe, 64);
    if (len) {
        s->own.iov_base = buf;
        s->own.iov_len = len;
        s->iov = &s->own;
        s->iovcnt = 1;
        s->len = len;
        s->dir = to_ctrlr ? DIR_H2C : DIR_C2H;
    }
    slot_send_cmd(q, s);
    int rc = admin_wait(q, now_ms() + timeout_ms, is_done, s);
    if (rc == -ETIMEDOUT) {
        qp_fail(q, ETIMEDOUT, "admin command 0x%02x got no answer from %s within %u ms", sqe[0], c->addr_text,
                timeout_ms);
    }
    if (rc) {
        copy_err(q, err, errlen);
        if (s->busy) slot_put(q, s);
        return rc;
    }
    memcpy(cqe, s->cqe, 16);
    int st = s->status;
    slot_put(q, s);
    if (st == -ECONNRESET) {
        copy_err(q, err, errlen);
        return st;
    }
    return st ? -EREMOTEIO : 0;
}

static int never(struct qpair *q, void *arg) { (void)q; (void)arg; return 0; }

int nvt_admin_poll(void *ctrlr, uint32_t timeout_ms, char *err, size_t errlen)
{
    struct ctrlr *c = ctrlr;
    struct qpair *q = c->admin;
    if (!q || q->state != Q_READY) {
        snprintf(err, errlen, "%s", q && q->err[0] ? q->err : "the admin queue is not connected");
        return -ENOTCONN;
    }
    int rc = admin_wait(q, now_ms() + timeout_ms, never, NULL);
    if (rc == -ETIMEDOUT) return 0;
    copy_err(q, err, errlen);
    return rc;
}

void nvt_admin_disconnect(void *ctrlr)
{
    struct ctrlr *c = ctrlr;
    if (c->admin) {
        for (uint32_t i = 0; i < c->admin->depth; i++)
            if (c->admin->slots[i].busy) connect_data_free(&c->admin->slots[i]);
        qp_free(c->admin);
        c->admin = NULL;
    }
}

void *nvt_ns_new(void *ctrlr, uint32_t nsid, uint32_t block_size, uint64_t num_blocks, uint32_t io_types)
{
    struct ctrlr *c = ctrlr;
    struct ns *ns = calloc(1, sizeof(*ns));
    if (!ns) return NULL;
    ns->bdev.ops = &nvt_ops;
    ns->bdev.ctx = ns;
    ns->bdev.block_size = block_size;
    ns->bdev.io_types = io_types;
    ns->bdev.num_blocks = num_blocks;
    ns->c = c;
    ns->nsid = nsid;
    atomic_fetch_add(&c->refs, 1);
    return ns;
}

void nvt_ns_free(void *nsp)
{
    struct ns *ns = nsp;
    nvt_ctrlr_put(ns->c);
    free(ns);
}
