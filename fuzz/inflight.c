/*
 * Fuzz target: in-flight tracking in vhost_core's core.c
 * (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): vq_recover_inflight reading a
 * shared buffer the front-end wrote, the resubmission of what it finds, and
 * the bookkeeping that keeps the buffer recoverable at any crash point.
 *
 * core.c is #included unchanged; the harness drives reactor_iteration() on
 * this thread (see vq_walker.c).  Two phases per input:
 *
 * 1. Recovery from a buffer the input wrote: whatever it holds, the core
 *    resubmits only heads of the ring, each once, oldest counter first, and
 *    leaves the buffer consistent with the used ring.
 * 2. Crash consistency: the queue runs some rounds, the process "dies" at a
 *    point the input picks (after a publish, between used->idx and the batch's
 *    flags, or before the publish), and a new start over the same memory and
 *    buffer must resubmit exactly the requests the guest never saw complete,
 *    in their original order.  The death is a snapshot of guest memory and
 *    the buffer, restored after the old queue was drained.
 *
 * Input: a 16-byte header, the inflight buffer image (16 + 16 * ring size
 * bytes), then guest memory (the ring at GPA 0, as in vq_walker.c).
 *
 * Header byte 7, bit 1: a packed ring and the QueueRegionPacked layout (32 + 32 *
 * ring size bytes of buffer image): phase 1 checks that only heads flagged in
 * flight come back, each once, oldest counter first, and that the buffer is left
 * consistent; phase 2 runs a well-behaved driver, dies after a completion, in the
 * middle of one (its entries back on the free list, its used descriptor not
 * written) or just after its used descriptor, and the new start must resubmit
 * exactly what the driver never saw complete, in fetch order, and resume the ring
 * at the driver's avail position (which the front-end could not tell it).
 */
#include "core.c"
#include "common.h"

#define MEM_SIZE (64u << 10)
#define MAX_QSIZE_LOG2 8
#define MAX_QSIZE (1u << MAX_QSIZE_LOG2)
#define HDR_SIZE 16
#define IFL_MAX (VN_INFLIGHT_PACKED_HEADER + VN_INFLIGHT_PACKED_DESC * 2 * MAX_QSIZE)

static uint8_t mem_buf[MEM_SIZE] __attribute__((aligned(4096)));
static uint8_t ifl_buf[IFL_MAX] __attribute__((aligned(64)));

struct sub { uint16_t head; uint32_t seq; };

static struct {
    uint8_t policy;
    uint32_t submits;
    vn_req *out[MAX_QSIZE];
    uint32_t nout;
    /* per head: submissions not yet completed, and the order of the last one */
    uint32_t pending[MAX_QSIZE];
    uint32_t seq[MAX_QSIZE];
    int duplicate;              /* the guest made a head available while it was in flight */
    uint32_t record_from;       /* submissions from here on are logged below */
    uint16_t logged[4 * MAX_QSIZE];
    uint32_t nlogged;
} dv;

static void finish(vn_req *req)
{
    dv.pending[req->head]--;
    req->complete(req, 0);
}

static void dev_submit(void *ctx, vn_req *req)
{
    (void)ctx;
    FUZZ_CHECK(req->head < MAX_QSIZE);
    if (dv.pending[req->head]) dv.duplicate = 1;
    dv.pending[req->head]++;
    dv.seq[req->head] = dv.submits++;
    if (dv.nlogged < sizeof(dv.logged) / sizeof(dv.logged[0])) dv.logged[dv.nlogged++] = req->head;
    int defer = (dv.policy & 3) == 1 || ((dv.policy & 3) == 2 && (req->head & 1));
    if (defer && dv.nout < MAX_QSIZE) dv.out[dv.nout++] = req;
    else finish(req);
}

static int dev_poll(void *ctx)
{
    (void)ctx;
    /* Complete the oldest half of what is held: some stays in flight. */
    uint32_t n = (dv.policy >> 2) & 1 ? dv.nout : dv.nout / 2;
    for (uint32_t i = 0; i < n; i++) finish(dv.out[i]);
    memmove(dv.out, dv.out + n, (dv.nout - n) * sizeof(dv.out[0]));
    dv.nout -= n;
    return (int)n;
}

static const struct vn_device_ops dev_ops = {
    .abi_version = VN_ABI_VERSION,
    .submit = dev_submit,
    .poll = dev_poll,
};

static struct vn_reactor *reactor;
static struct vn_dev *dev;
static struct vn_mem *mem;
static struct vn_vq *queues[MAX_QSIZE_LOG2 + 1];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc; (void)argv;
    reactor = vn_reactor_new(-1, 0);
    dev = vn_dev_new(reactor, &dev_ops, &dv, NULL);
    mem = vn_mem_new();
    if (!reactor || !dev || !mem) abort();
    mem->nregions = 1;
    mem->regions[0].gpa = 0;
    mem->regions[0].size = MEM_SIZE;
    mem->regions[0].host = mem_buf;
    return 0;
}

static volatile struct ifl_queue *region(void) { return (volatile struct ifl_queue *)ifl_buf; }

/* After a start: the buffer matches the used ring, and every head it still
 * flags is one the core resubmits (a flag left over would resubmit a request
 * twice after the next crash; one missing would lose it). */
static void check_consistent(uint32_t qsize, uint16_t used_idx, uint32_t recovered)
{
    volatile struct ifl_queue *f = region();
    FUZZ_CHECK(f->version == 1);
    FUZZ_CHECK(f->desc_num == qsize);
    FUZZ_CHECK(f->used_idx == used_idx);
    uint32_t flagged = 0;
    for (uint32_t i = 0; i < qsize; i++) flagged += f->desc[i].inflight == 1;
    FUZZ_CHECK(flagged == recovered);
}

/* Drain the queue: complete everything, publish, stop. */
static void drain(struct vn_vq *q)
{
    dv.policy = 4;
    for (int i = 0; dv.nout || vn_vq_inflight(q); i++) {
        FUZZ_CHECK(i < 1000);
        reactor_iteration(reactor);
    }
    FUZZ_CHECK(vn_vq_stop(q, 0) == 0);
}

/* Start q over the buffer; returns what it recovered.  Resubmissions come
 * first, so they are the first `recovered` submissions logged after this. */
static uint32_t start(struct vn_vq *q, uint32_t qsize, uint32_t capacity, uint16_t used_idx,
                      uint32_t *reset)
{
    uint32_t rec[2];
    *(volatile uint16_t *)&q->used->idx = used_idx;
    vn_vq_set_base(q, used_idx);
    vn_vq_set_inflight(q, ifl_buf, capacity);
    FUZZ_CHECK(vn_vq_start(q) == 0);
    vn_vq_get_recovery(q, rec);
    FUZZ_CHECK(rec[0] <= qsize);
    if (rec[1] == 3) FUZZ_CHECK(capacity < qsize);
    *reset = rec[1];
    if (rec[1] != 3) check_consistent(qsize, used_idx, rec[0]);
    FUZZ_CHECK(vn_vq_get_base(q) == (uint16_t)(used_idx + rec[0]));
    dv.record_from = dv.submits;
    dv.nlogged = 0;
    return rec[0];
}

/* ---- packed rings ---- */

static volatile struct pifl_queue *pregion(void) { return (volatile struct pifl_queue *)ifl_buf; }

static void check_consistent_packed(uint32_t qsize, uint32_t recovered)
{
    volatile struct pifl_queue *f = pregion();
    FUZZ_CHECK(f->version == 1);
    FUZZ_CHECK(f->desc_num == qsize);
    FUZZ_CHECK(f->used_idx == f->old_used_idx && f->used_wrap_counter == f->old_used_wrap_counter);
    FUZZ_CHECK(f->free_head == f->old_free_head);
    uint32_t flagged = 0;
    for (uint32_t i = 0; i < qsize; i++) flagged += f->desc[i].inflight == 1;
    FUZZ_CHECK(flagged == recovered);
}

/* The well-behaved driver of phase 2: its avail position and wrap counter. */
static struct { uint32_t pos; uint16_t wrap; uint32_t slots[MAX_QSIZE]; uint32_t outstanding; } drv;

static void drv_post(struct vn_vq *q, uint32_t qsize, uint16_t id, uint32_t n)
{
    struct vring_packed_desc *ring = (struct vring_packed_desc *)q->desc;
    uint32_t head = drv.pos;
    uint16_t bits = drv.wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED, head_flags = 0;
    for (uint32_t k = 0; k < n; k++) {
        uint16_t flags = (k + 1 < n ? VRING_DESC_F_NEXT : VRING_DESC_F_WRITE) | bits;
        ring[drv.pos].addr = 0x8000 + 64 * k;
        ring[drv.pos].len = 16;
        ring[drv.pos].id = id;
        if (k) ring[drv.pos].flags = flags;
        else head_flags = flags;
        if (++drv.pos == qsize) {
            drv.pos = 0;
            drv.wrap ^= 1;
            bits = drv.wrap ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
        }
    }
    ring[head].flags = head_flags;
    drv.slots[id] = n;
    drv.outstanding += n;
}

static int packed_input(const uint8_t *hdr, struct reader *r)
{
    uint32_t qlog = hdr[0] % (MAX_QSIZE_LOG2 + 1), qsize = 1u << qlog;
    uint32_t capacity = (hdr[1] & 3) == 1 ? 2 * qsize : (hdr[1] & 3) == 2 ? qsize / 2 : qsize;
    int crash_point = hdr[2] % 3;
    int rounds = 1 + hdr[4] % 6;
    uint32_t base = ((uint32_t)hdr[5] & (qsize - 1)) | (hdr[6] & 0x80 ? 0x8000u : 0);

    memset(&dv, 0, sizeof(dv));
    dv.policy = hdr[3];
    memset(ifl_buf, 0, sizeof(ifl_buf));
    rd_bytes(r, ifl_buf, VN_INFLIGHT_PACKED_HEADER + VN_INFLIGHT_PACKED_DESC * qsize);
    rd_bytes(r, mem_buf, MEM_SIZE);

    uint8_t *desc = mem_buf, *driver = mem_buf + 16 * qsize, *device = driver + 4;
    static struct vn_vq *pqueues[MAX_QSIZE_LOG2 + 1];
    if (!pqueues[qlog]) pqueues[qlog] = vn_vq_new(dev, 3);
    struct vn_vq *q = pqueues[qlog];
    vn_vq_set_mem(q, mem);
    vn_vq_set_ring(q, qsize, desc, driver, device);
    vn_vq_set_packed(q, 1);
    vn_vq_set_features(q, 0, hdr[7] & 1);
    vn_vq_set_enabled(q, 1);

    /* Phase 1: whatever the front-end left in the buffer. */
    struct { uint8_t inflight; uint64_t counter; } before[MAX_QSIZE];
    for (uint32_t i = 0; i < qsize; i++) {
        before[i].inflight = pregion()->desc[i].inflight;
        before[i].counter = pregion()->desc[i].counter;
    }
    uint32_t rec[2];
    vn_vq_set_base(q, base);
    vn_vq_set_inflight(q, ifl_buf, capacity);
    FUZZ_CHECK(vn_vq_start(q) == 0);
    vn_vq_get_recovery(q, rec);
    FUZZ_CHECK(rec[0] <= qsize && q->last_avail < qsize && q->used_idx < qsize);
    if (rec[1] == 3) FUZZ_CHECK(capacity < qsize);
    else check_consistent_packed(qsize, rec[0]);
    uint8_t seen[MAX_QSIZE] = { 0 };
    uint64_t last_counter = 0;
    for (uint32_t i = 0; i < q->nresubmit; i++) {
        uint16_t e = q->resubmit[i];
        FUZZ_CHECK(e < qsize && !seen[e] && before[e].inflight == 1);
        seen[e] = 1;
        FUZZ_CHECK(before[e].counter >= last_counter);
        last_counter = before[e].counter;
    }
    reactor_iteration(reactor);
    drain(q);
    if (rec[1] == 3) return 0;

    /* Phase 2: a fresh buffer and ring, a well-behaved driver, a death, a recovery. */
    memset(ifl_buf, 0, sizeof(ifl_buf));
    memset(mem_buf, 0, 16 * qsize + 8);
    memset(&dv, 0, sizeof(dv));
    memset(&drv, 0, sizeof(drv));
    dv.policy = hdr[3] & 3 ? hdr[3] : 1;    /* something stays in flight */
    drv.pos = base & 0x7fff;
    drv.wrap = (base >> 15) & 1;
    vn_vq_set_base(q, base);
    vn_vq_set_inflight(q, ifl_buf, capacity);
    FUZZ_CHECK(vn_vq_start(q) == 0);
    uint32_t cursor = 0;
    for (int round = 0; round < rounds; round++) {
        for (uint32_t id = 0; id < qsize; id++)     /* completed buffers are the driver's again */
            if (!dv.pending[id] && drv.slots[id]) { drv.outstanding -= drv.slots[id]; drv.slots[id] = 0; }
        uint32_t want = hdr[8 + round] % (qsize + 1);
        for (uint32_t added = 0, tries = 0; added < want && tries < qsize; tries++, cursor++) {
            uint16_t id = (uint16_t)(cursor % qsize);
            uint32_t n = 1 + (cursor * 7 + hdr[14]) % 3;
            if (drv.slots[id] || dv.pending[id] || drv.outstanding + n > qsize) continue;
            drv_post(q, qsize, id, n);
            added++;
        }
        reactor_iteration(reactor);
    }
    if (vn_vq_broken_reason(q)) {
        drain(q);
        return 0;
    }
    FUZZ_CHECK(q->last_avail == drv.pos && q->avail_wrap == drv.wrap);
    /* The death.  1: in the middle of a completion (entries freed, used position
     * moved, the used descriptor not written); 2: just after its used descriptor. */
    vn_req *victim = NULL;
    if (crash_point && dv.nout) victim = dv.out[0];
    uint32_t used_after = q->used_idx;
    uint16_t wrap_after = q->used_wrap;
    if (victim) {
        uint16_t id = victim->head;
        uint32_t next = q->used_idx + q->id_slots[id];
        uint16_t wrap = q->used_wrap;
        if (next >= qsize) { next -= qsize; wrap ^= 1; }
        vq_pifl_used_begin(q, id, (uint16_t)next, wrap);
        if (crash_point == 2) {
            volatile struct vring_packed_desc *d = (volatile struct vring_packed_desc *)q->desc + q->used_idx;
            d->id = id;
            d->len = 0;
            d->flags = q->used_wrap ? (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED) : 0;
            used_after = next;
            wrap_after = wrap;
        }
    }
    uint16_t expect[MAX_QSIZE];
    uint32_t nexpect = 0;
    for (uint32_t h = 0; h < qsize; h++)
        if (dv.pending[h] && !(crash_point == 2 && victim && victim->head == h)) expect[nexpect++] = (uint16_t)h;
    for (uint32_t i = 1; i < nexpect; i++)
        for (uint32_t j = i; j > 0 && dv.seq[expect[j - 1]] > dv.seq[expect[j]]; j--) {
            uint16_t t = expect[j];
            expect[j] = expect[j - 1];
            expect[j - 1] = t;
        }
    static uint8_t mem_snap[MEM_SIZE], ifl_snap[IFL_MAX];
    memcpy(mem_snap, mem_buf, MEM_SIZE);
    memcpy(ifl_snap, ifl_buf, IFL_MAX);
    drain(q);
    memcpy(mem_buf, mem_snap, MEM_SIZE);
    memcpy(ifl_buf, ifl_snap, IFL_MAX);
    memset(dv.pending, 0, sizeof(dv.pending));
    dv.policy = 0;
    /* The front-end's base is stale (it cannot read a packed ring's position back). */
    vn_vq_set_base(q, base);
    vn_vq_set_inflight(q, ifl_buf, capacity);
    FUZZ_CHECK(vn_vq_start(q) == 0);
    vn_vq_get_recovery(q, rec);
    FUZZ_CHECK(rec[1] == 0);
    FUZZ_CHECK(rec[0] == nexpect);
    FUZZ_CHECK(q->last_avail == drv.pos && q->avail_wrap == drv.wrap);
    FUZZ_CHECK(q->used_idx == used_after && q->used_wrap == wrap_after);
    check_consistent_packed(qsize, rec[0]);
    dv.record_from = dv.submits;
    dv.nlogged = 0;
    reactor_iteration(reactor);
    FUZZ_CHECK(!vn_vq_broken_reason(q));
    FUZZ_CHECK(dv.nlogged >= nexpect);
    for (uint32_t i = 0; i < nexpect; i++) FUZZ_CHECK(dv.logged[i] == expect[i]);
    drain(q);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader r = { data, size, 0 };
    uint8_t hdr[HDR_SIZE];
    rd_bytes(&r, hdr, HDR_SIZE);
    if (hdr[7] & 2) return packed_input(hdr, &r);
    uint32_t qlog = hdr[0] % (MAX_QSIZE_LOG2 + 1), qsize = 1u << qlog;
    uint32_t capacity = (hdr[1] & 3) == 1 ? 2 * qsize : (hdr[1] & 3) == 2 ? qsize / 2 : qsize;
    int crash_point = hdr[2] % 3;
    int rounds = 1 + hdr[4] % 6;
    uint16_t used_idx = (uint16_t)(hdr[5] | hdr[6] << 8);

    memset(&dv, 0, sizeof(dv));
    dv.policy = hdr[3];
    memset(ifl_buf, 0, sizeof(ifl_buf));
    rd_bytes(&r, ifl_buf, VN_INFLIGHT_HEADER + VN_INFLIGHT_DESC * qsize);
    rd_bytes(&r, mem_buf, MEM_SIZE);

    uint8_t *desc = mem_buf, *avail = mem_buf + 16 * qsize;
    uint8_t *used = mem_buf + ((16 * qsize + 4 + 2 * qsize + 2 + 3) & ~3u);
    if (!queues[qlog]) queues[qlog] = vn_vq_new(dev, 2);
    struct vn_vq *q = queues[qlog];
    vn_vq_set_mem(q, mem);
    vn_vq_set_ring(q, qsize, desc, avail, used);
    vn_vq_set_features(q, 0, hdr[7] & 1);
    vn_vq_set_enabled(q, 1);

    /* Phase 1: whatever the front-end left in the buffer. */
    struct { uint8_t inflight; uint64_t counter; } before[MAX_QSIZE];
    for (uint32_t i = 0; i < qsize; i++) {
        before[i].inflight = region()->desc[i].inflight;
        before[i].counter = region()->desc[i].counter;
    }
    uint32_t reset;
    uint32_t n = start(q, qsize, capacity, used_idx, &reset);
    reactor_iteration(reactor);
    FUZZ_CHECK(dv.nlogged >= n || vn_vq_broken_reason(q));
    uint8_t seen[MAX_QSIZE] = { 0 };
    uint64_t last_counter = 0;
    for (uint32_t i = 0; i < n && i < dv.nlogged; i++) {
        uint16_t h = dv.logged[i];
        FUZZ_CHECK(h < qsize);
        FUZZ_CHECK(!seen[h]);
        seen[h] = 1;
        FUZZ_CHECK(before[h].inflight == 1);
        FUZZ_CHECK(before[h].counter >= last_counter);
        last_counter = before[h].counter;
    }

    /* Phase 2: run, die at a chosen point, recover. */
    uint32_t cursor = 0;
    for (int round = 0; round < rounds; round++) {
        /* The guest, well-behaved now, makes available heads that are not in
         * flight (the chains are whatever the image holds there). */
        uint16_t avail_idx = *(volatile uint16_t *)&q->avail->idx;
        if (avail_idx == vn_vq_get_base(q)) {
            uint32_t want = hdr[8 + round] % (qsize + 1), added = 0;
            for (uint32_t tries = 0; added < want && tries < qsize; tries++, cursor++) {
                uint16_t h = (uint16_t)(cursor % qsize);
                if (dv.pending[h]) continue;
                int taken = 0;
                for (uint32_t j = 0; j < added; j++)
                    taken |= q->avail->ring[(uint16_t)(avail_idx + j) & (qsize - 1)] == h;
                if (taken) continue;
                q->avail->ring[(uint16_t)(avail_idx + added) & (qsize - 1)] = h;
                added++;
            }
            *(volatile uint16_t *)&q->avail->idx = (uint16_t)(avail_idx + added);
        }
        reactor_iteration(reactor);
    }
    if (vn_vq_broken_reason(q) || reset == 3 || dv.duplicate) {
        drain(q);
        return 0;
    }
    /* The last batch: completions the reactor has not published yet. */
    uint16_t batch[MAX_QSIZE];
    uint32_t k = dv.nout / 2;
    for (uint32_t i = 0; i < k; i++) {
        batch[i] = dv.out[i]->head;
        finish(dv.out[i]);
    }
    memmove(dv.out, dv.out + k, (dv.nout - k) * sizeof(dv.out[0]));
    dv.nout -= k;
    uint16_t published = *(volatile uint16_t *)&q->used->idx;
    if (crash_point == 0) {
        vq_publish_used(q);
    } else if (crash_point == 1) {
        /* A publish's first store, used->idx, and no more. */
        *(volatile uint16_t *)&q->used->idx = (uint16_t)(published + k);
    }
    uint16_t crash_used = *(volatile uint16_t *)&q->used->idx;

    /* Who must come back, oldest first: what the device still holds, plus
     * (crash point 2) the last batch, which the guest never saw complete. */
    uint16_t expect[MAX_QSIZE];
    uint32_t nexpect = 0;
    for (uint32_t h = 0; h < qsize; h++)
        if (dv.pending[h]) expect[nexpect++] = (uint16_t)h;
    if (crash_point == 2)
        for (uint32_t i = 0; i < k; i++) expect[nexpect++] = batch[i];
    for (uint32_t i = 1; i < nexpect; i++)
        for (uint32_t j = i; j > 0 && dv.seq[expect[j - 1]] > dv.seq[expect[j]]; j--) {
            uint16_t t = expect[j];
            expect[j] = expect[j - 1];
            expect[j - 1] = t;
        }
    /* Counters the front-end wrote near 2^64 may wrap: order is then its problem. */
    int ordered = last_counter < (UINT64_MAX >> 1);

    static uint8_t mem_snap[MEM_SIZE], ifl_snap[IFL_MAX];
    memcpy(mem_snap, mem_buf, MEM_SIZE);
    memcpy(ifl_snap, ifl_buf, IFL_MAX);
    drain(q);
    memcpy(mem_buf, mem_snap, MEM_SIZE);
    memcpy(ifl_buf, ifl_snap, IFL_MAX);
    memset(dv.pending, 0, sizeof(dv.pending));
    dv.policy = 0;

    uint32_t reset2;
    uint32_t n2 = start(q, qsize, capacity, crash_used, &reset2);
    FUZZ_CHECK(reset2 == 0);
    FUZZ_CHECK(n2 == nexpect);
    reactor_iteration(reactor);
    if (!vn_vq_broken_reason(q)) {
        FUZZ_CHECK(dv.nlogged >= n2);
        uint8_t want[MAX_QSIZE] = { 0 };
        for (uint32_t i = 0; i < n2; i++) want[expect[i]]++;
        for (uint32_t i = 0; i < n2; i++) {
            if (ordered) FUZZ_CHECK(dv.logged[i] == expect[i]);
            FUZZ_CHECK(want[dv.logged[i]]-- == 1);
        }
    }
    drain(q);
    return 0;
}
