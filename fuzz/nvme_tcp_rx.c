/*
 * Fuzz target: what an NVMe/TCP target sends to bdev_nvme's initiator
 * (plugins/bdev_nvme's nvme_tcp.c, compiled in unchanged), on an I/O queue
 * pair with reads and writes in flight.
 *
 * The queue pair is connected (state ready) to one end of a socketpair; the
 * harness submits requests as the core would (reads into, writes from buffers
 * that are each a heap block of their own, so that ASan sees a byte past any
 * of them), then feeds the input to the other end in chunks and lets the queue
 * pair receive.  Whatever the bytes, the initiator may only complete requests,
 * fail the connection, or wait for more.
 *
 * Oracles: each request completes at most once while the bytes flow, and
 * exactly once after the controller is declared gone (fail_io); read data lands
 * only in the request's own buffers (ASan); a write's buffers are never written.
 *
 * Input: 1 config byte {bit0 header digest, bit1 data digest, bits 2-4 number
 * of requests - 1}, then per request 4 bytes {type/split, blocks, offset, pad},
 * then the bytes the target sends, in chunks of up to 255 bytes (each chunk
 * prefixed by its length byte).
 */
#include <sys/socket.h>

#include "../plugins/bdev_nvme/src/vhost_bdev_nvme/nvme_tcp.c"
#include "common.h"

#define MAX_REQS 8
#define BLOCK 512

struct freq {
    vn_bdev_io io;
    int completed;
    int is_write;
    struct iovec iov[3];
    uint8_t *buf[3];
    uint64_t digest;
};

static struct freq reqs[MAX_REQS];

static void done(vn_bdev_io *io, int status)
{
    struct freq *r = (struct freq *)((char *)io - offsetof(struct freq, io));
    (void)status;
    FUZZ_CHECK(r->completed == 0);      /* completed at most once */
    r->completed++;
}

FUZZ_NOCOV static uint64_t sum(const uint8_t *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

FUZZ_NOCOV static void drain(int fd)
{
    uint8_t junk[65536];
    while (recv(fd, junk, sizeof(junk), MSG_DONTWAIT) > 0) { }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    uint8_t cfg = data[0];
    unsigned n = ((cfg >> 2) & 7) + 1;
    size_t pos = 1;
    if (size < pos + 4 * n) return 0;

    uint8_t hostid[16] = { 0 };
    void *c = nvt_ctrlr_new("127.0.0.1", AF_INET, 4420, "nqn.fuzz:sub", "nqn.fuzz:host", hostid,
                            cfg & 1, (cfg >> 1) & 1, 0);
    /* in-capsule up to 1 KiB: small writes go in the capsule, larger ones wait for an R2T */
    nvt_ctrlr_set_io(c, 1024, 0, 16, 4, 0, 1000);
    struct ns *ns = nvt_ns_new(c, 1, BLOCK, 64, 0x1f);
    struct qpair *q = qp_new(c, 1, 16, 0);
    q->ns = ns;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv) < 0) abort();
    q->fd = sv[0];
    q->state = Q_READY;
    q->gen = atomic_load(&((struct ctrlr *)c)->gen);
    q->hd = (cfg & 1) ? 4 : 0;
    q->dd = (cfg & 2) ? 4 : 0;
    q->maxh2cdata = 4096;
    q->cpda_align = 4;
    nvt_ctrlr_set_state(c, NVT_ADMIN_UP, 1);

    memset(reqs, 0, sizeof(reqs));
    for (unsigned i = 0; i < n; i++, pos += 4) {
        struct freq *r = &reqs[i];
        uint8_t kind = data[pos] & 7, split = (data[pos] >> 3) & 3;
        uint64_t blocks = data[pos + 1] % 16 + 1, off = data[pos + 2] % 48;
        r->io.type = kind < 3 ? VN_IO_READ : kind < 5 ? VN_IO_WRITE : kind == 5 ? VN_IO_FLUSH :
                     kind == 6 ? VN_IO_UNMAP : VN_IO_WRITE_ZEROES;
        r->io.offset_blocks = off;
        r->io.num_blocks = blocks;
        r->is_write = r->io.type == VN_IO_WRITE;
        if (r->io.type == VN_IO_READ || r->io.type == VN_IO_WRITE) {
            uint64_t len = blocks * BLOCK, at = 0;
            unsigned parts = split % 3 + 1;
            for (unsigned k = 0; k < parts; k++) {
                uint64_t l = k + 1 == parts ? len - at : (len - at) / 2;
                if (!l) { parts = k; break; }
                r->buf[k] = malloc(l);
                memset(r->buf[k], 0xa0 + k, l);
                r->iov[k].iov_base = r->buf[k];
                r->iov[k].iov_len = l;
                at += l;
            }
            r->io.iov = r->iov;
            r->io.iovcnt = parts;
            if (r->is_write)
                for (unsigned k = 0; k < parts; k++) r->digest ^= sum(r->buf[k], r->iov[k].iov_len) + k;
        }
        r->io.cb = done;
        ns_submit(ns, q, &r->io);
    }
    drain(sv[1]);

    while (pos < size && q->state == Q_READY) {
        size_t len = data[pos++];
        if (len > size - pos) len = size - pos;
        if (len && send(sv[1], data + pos, len, MSG_DONTWAIT) < 0) break;
        pos += len;
        qp_process(q);
        drain(sv[1]);
    }
    for (int k = 0; k < 4 && q->state == Q_READY; k++) qp_process(q);

    /* The controller goes: everything still in flight fails, exactly once. */
    nvt_ctrlr_set_fail_io(c, 1);
    if (q->state != Q_IDLE) qp_fail(q, ECONNRESET, "fuzz: controller gone");
    else qp_fail_io(q, -EIO);
    for (unsigned i = 0; i < n; i++) {
        struct freq *r = &reqs[i];
        FUZZ_CHECK(r->completed == 1);  /* and exactly once in the end */
        if (r->is_write) {
            uint64_t d = 0;
            for (unsigned k = 0; k < r->io.iovcnt; k++) d ^= sum(r->buf[k], r->iov[k].iov_len) + k;
            FUZZ_CHECK(d == r->digest);    /* a write's buffers are never written */
        }
        for (unsigned k = 0; k < 3; k++) free(r->buf[k]);
    }
    close(sv[1]);
    qp_free(q);
    atomic_fetch_and(&((struct ctrlr *)c)->qid_used[0], 0);
    nvt_ns_free(ns);
    nvt_ctrlr_put(c);
    return 0;
}
