/*
 * Fuzz target: the virtqueue walkers of vhost_core's core.c: split rings
 * (descriptor table, avail ring, indirect tables, chains, used ring,
 * notifications) and packed rings (descriptor ring, wrap counters, buffer ids,
 * indirect tables, event suppression), chosen by a header bit.
 *
 * core.c is #included unchanged so that its static functions are reachable:
 * the harness drives reactor_iteration() itself, on this thread, exactly as a
 * reactor thread does each loop (a reactor that was never started runs its
 * control messages inline).  Guest memory is a fake vn_mem whose regions are
 * views of one buffer the input fills; a fake device checks every request the
 * core hands it and completes it inline or from its poll callback.
 *
 * Input: a 16-byte header {ring size log2, features (EVENT_IDX, INDIRECT_DESC,
 * arm/disarm as in interrupt mode, a stop/restart halfway, packed ring), memory layout,
 * completion policy, u16 base, rounds, used-length policy, -, call fd / 0xff
 * disabled, ...}, 8 guest-memory patches of 8 bytes {u16 GPA, length,
 * when: round or 0x80 | nth submission, 4 bytes} (the guest rewriting its
 * rings between rounds or in the middle of a pass), then the guest memory image
 * (GPA order; what the input lacks reads as zeros).  The rings sit at GPA 0.
 */
#include "core.c"
#include "common.h"

#define MEM_SIZE (64u << 10)
#define MAX_QSIZE_LOG2 10
#define NPATCH 8
#define HDR_SIZE 16
#define MAX_OUT 1024

static uint8_t mem_buf[MEM_SIZE] __attribute__((aligned(4096)));
static struct fake_region regions[4];
static int nregions;

/* The fake device's view of one run. */
static struct {
    struct vn_vq *q;
    uint8_t policy, written_policy;
    uint32_t submits, completions;
    vn_req *out[MAX_OUT];       /* deferred requests, oldest first */
    uint32_t nout;
    uint32_t inflight;          /* submitted, not yet completed */
    struct { uint16_t head; uint16_t slots; uint32_t len; } log[4096];
    uint32_t nlog;              /* completions not yet checked against the used ring */
    int used_tampered;          /* a patch hit the used ring: its contents are the guest's */
    uint8_t patch[NPATCH][8];
    uint8_t patch_done[NPATCH];
    uint64_t used_lo, used_hi;  /* GPA range of the used ring */
} dv;

/* The core enforces VN_MAX_TRANSFER (probed once). */
static int transfer_cap;

static void apply_patch(int i)
{
    const uint8_t *p = dv.patch[i];
    uint32_t gpa = (uint32_t)(p[0] | p[1] << 8);
    uint32_t len = 1 + (p[2] & 3);
    uint8_t *h = vn_mem_gpa_to_host(dv.q->mem, gpa, len);
    dv.patch_done[i] = 1;
    if (!h) return;
    memcpy(h, p + 4, len);
    if (gpa + len > dv.used_lo && gpa < dv.used_hi) dv.used_tampered = 1;
}

static uint32_t written_for(vn_req *req)
{
    uint64_t w;
    switch (dv.written_policy & 3) {
    case 0: w = 0; break;
    case 1: w = req->in_len; break;
    case 2: w = req->in_len / 2; break;
    default: w = dv.completions; break;
    }
    return w > UINT32_MAX ? UINT32_MAX : (uint32_t)w;
}

static void finish(vn_req *req)
{
    uint32_t w = written_for(req);
    if (dv.nlog < sizeof(dv.log) / sizeof(dv.log[0])) {
        dv.log[dv.nlog].head = req->head;
        dv.log[dv.nlog].len = w;
        /* Packed rings: the ring descriptors the buffer took (its used one advances by them). */
        dv.log[dv.nlog].slots = dv.q->packed ? dv.q->id_slots[req->head] : 1;
    }
    dv.nlog++;
    dv.inflight--;
    dv.completions++;
    req->complete(req, w);
}

static void check_request(vn_req *req)
{
    FUZZ_CHECK(req->dev_ctx == &dv);
    FUZZ_CHECK(req->queue_index == dv.q->index);
    FUZZ_CHECK(req->head < dv.q->size);
    FUZZ_CHECK(req->n_out <= VN_MAX_IOV && req->n_in <= VN_MAX_IOV - req->n_out);
    /* Every segment is guest memory: nothing of the host is reachable. */
    for (uint32_t i = 0; i < req->n_out + req->n_in; i++) {
        FUZZ_CHECK(req->iov[i].iov_len > 0);
        FUZZ_CHECK(fake_contains(regions, nregions, req->iov[i].iov_base, req->iov[i].iov_len));
    }
    FUZZ_CHECK(iov_total(req->iov, req->n_out) == req->out_len);
    FUZZ_CHECK(iov_total(req->iov + req->n_out, req->n_in) == req->in_len);
    if (req->error) {
        FUZZ_CHECK(req->error == VN_REQ_EFAULT || req->error == VN_REQ_E2BIG);
        /* Only the chain's last, writable descriptor may be left for a status. */
        FUZZ_CHECK(req->n_out == 0);
    } else if (transfer_cap) {
        FUZZ_CHECK(req->out_len <= (uint64_t)VN_MAX_TRANSFER + VN_MAX_HEADER_BYTES);
        FUZZ_CHECK(req->in_len <= (uint64_t)VN_MAX_TRANSFER + VN_MAX_HEADER_BYTES);
    }
    /* A slot the core handed out is not handed out again before it completes. */
    for (uint32_t i = 0; i < dv.nout; i++) FUZZ_CHECK(dv.out[i] != req);
}

static void dev_submit(void *ctx, vn_req *req)
{
    (void)ctx;
    check_request(req);
    dv.submits++;
    dv.inflight++;
    /* The guest rewrites its rings while the core walks them. */
    for (int i = 0; i < NPATCH; i++)
        if (!dv.patch_done[i] && (dv.patch[i][3] & 0x80) && (dv.patch[i][3] & 0x7f) == dv.submits)
            apply_patch(i);
    int defer;
    switch (dv.policy & 3) {
    case 0: defer = 0; break;
    case 1: defer = 1; break;
    case 2: defer = req->head & 1; break;
    default: defer = dv.submits & 1; break;
    }
    if (defer && dv.nout < MAX_OUT) dv.out[dv.nout++] = req;
    else finish(req);
}

/* Complete deferred requests: all, the oldest half, or the newest one. */
static int dev_poll(void *ctx)
{
    (void)ctx;
    uint32_t n = 0;
    switch ((dv.policy >> 2) & 3) {
    case 0: n = dv.nout; break;
    case 1: n = (dv.nout + 1) / 2; break;
    case 2:
        if (dv.nout) { finish(dv.out[--dv.nout]); return 1; }
        return 0;
    default: n = dv.nout > 3 ? 3 : dv.nout; break;
    }
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
static int call_fd;             /* signals land here (non-blocking; drained per input) */

/* Does this core.c refuse a chain over VN_MAX_TRANSFER (vhost_native.h's
 * promise)?  Probed once with a chain of 80 descriptors over the same 64 KiB,
 * so that the oracle follows whichever core.c the harness is built with. */
static int probe_transfer_cap(void)
{
    struct vring_desc *d = (struct vring_desc *)mem_buf;
    uint32_t n = 80;
    memset(mem_buf, 0, MEM_SIZE);
    for (uint32_t i = 0; i < n; i++) {
        d[i].addr = 0;
        d[i].len = MEM_SIZE;
        d[i].flags = i + 1 < n ? VRING_DESC_F_NEXT : 0;
        d[i].next = (uint16_t)(i + 1);
    }
    struct vn_vq *q = vn_vq_new(dev, 0);
    vn_vq_set_mem(q, mem);
    vn_vq_set_ring(q, 128, d, mem_buf + 2048, mem_buf + 4096);
    static vn_req req;
    int rc = vq_map_chain_cold(q, 0, &req);
    vn_vq_free(q);
    return rc < 0 || req.error != VN_REQ_OK;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc; (void)argv;
    reactor = vn_reactor_new(-1, 0);
    dev = vn_dev_new(reactor, &dev_ops, &dv, NULL);
    mem = vn_mem_new();
    call_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!reactor || !dev || !mem || call_fd < 0) abort();
    mem->nregions = 1;
    mem->regions[0].gpa = 0;
    mem->regions[0].size = MEM_SIZE;
    mem->regions[0].host = mem_buf;
    transfer_cap = probe_transfer_cap();
    if (!transfer_cap)
        fprintf(stderr, "vq_walker: this core.c does not refuse chains over VN_MAX_TRANSFER; "
                        "the transfer-cap oracle is off\n");
    return 0;
}

static void load_memory(int layout, struct reader *r)
{
    uint8_t img[MEM_SIZE];
    rd_bytes(r, img, MEM_SIZE);
    nregions = fake_layout(layout, mem_buf, MEM_SIZE, regions);
    if (layout % LAYOUT_COUNT == LAYOUT_ADJACENT) {
        /* GPA order: the image's first half is the buffer's second half. */
        memcpy(mem_buf + MEM_SIZE / 2, img, MEM_SIZE / 2);
        memcpy(mem_buf, img + MEM_SIZE / 2, MEM_SIZE / 2);
    } else {
        memcpy(mem_buf, img, MEM_SIZE);
    }
    mem->nregions = (uint32_t)nregions;
    for (int i = 0; i < nregions; i++) {
        mem->regions[i].gpa = regions[i].gpa;
        mem->regions[i].size = regions[i].size;
        mem->regions[i].uva = regions[i].gpa;
        mem->regions[i].host = regions[i].host;
    }
}

/* After a publish: every completion since the last check is in the used ring,
 * in order, and used->idx counts them all. */
static void check_used(struct vn_vq *q, uint16_t *checked_idx)
{
    uint16_t idx = *(volatile uint16_t *)&q->used->idx;
    if (dv.used_tampered) {
        dv.nlog = 0;
        *checked_idx = idx;
        return;
    }
    FUZZ_CHECK((uint16_t)(idx - *checked_idx) == (uint16_t)dv.nlog);
    if (dv.nlog <= q->size && dv.nlog <= sizeof(dv.log) / sizeof(dv.log[0])) {
        for (uint32_t i = 0; i < dv.nlog; i++) {
            const struct vring_used_elem *e = &q->used->ring[(uint16_t)(*checked_idx + i) & (q->size - 1)];
            FUZZ_CHECK(e->id == dv.log[i].head);
            FUZZ_CHECK(e->len == dv.log[i].len);
        }
    }
    dv.nlog = 0;
    *checked_idx = idx;
}

/* Packed rings: every completion since the last check is a used descriptor at the
 * device's used position, in order, with the device's wrap counter. */
static void check_used_packed(struct vn_vq *q, uint32_t *pos, uint16_t *wrap)
{
    const struct vring_packed_desc *ring = (const struct vring_packed_desc *)q->desc;
    if (!dv.used_tampered && dv.nlog <= sizeof(dv.log) / sizeof(dv.log[0])) {
        for (uint32_t i = 0; i < dv.nlog; i++) {
            const struct vring_packed_desc *d = &ring[*pos];
            FUZZ_CHECK(d->id == dv.log[i].head);
            FUZZ_CHECK(d->len == dv.log[i].len);
            FUZZ_CHECK(!!(d->flags & VRING_PACKED_DESC_F_AVAIL) == *wrap);
            FUZZ_CHECK(!!(d->flags & VRING_PACKED_DESC_F_USED) == *wrap);
            FUZZ_CHECK(dv.log[i].slots >= 1 && dv.log[i].slots <= q->size);
            *pos += dv.log[i].slots;
            if (*pos >= q->size) { *pos -= q->size; *wrap ^= 1; }
        }
        FUZZ_CHECK(*pos == q->used_idx && *wrap == q->used_wrap);
    }
    *pos = q->used_idx;
    *wrap = q->used_wrap;
    dv.nlog = 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct reader r = { data, size, 0 };
    uint8_t hdr[HDR_SIZE];
    rd_bytes(&r, hdr, HDR_SIZE);
    uint32_t qsize = 1u << (hdr[0] % (MAX_QSIZE_LOG2 + 1));
    int event_idx = hdr[1] & 1, indirect = (hdr[1] >> 1) & 1;
    int arm = (hdr[1] >> 2) & 1, restart = (hdr[1] >> 3) & 1, disabled = hdr[9] == 0xff;
    int packed = (hdr[1] >> 4) & 1;
    int layout = hdr[2];
    uint16_t base = (uint16_t)(hdr[4] | hdr[5] << 8);
    int rounds = 1 + hdr[6] % 8;

    memset(&dv.policy, 0, sizeof(dv) - offsetof(typeof(dv), policy));
    dv.policy = hdr[3];
    dv.written_policy = hdr[7];
    for (int i = 0; i < NPATCH; i++) rd_bytes(&r, dv.patch[i], 8);
    load_memory(layout, &r);

    /* The control plane's placement: rings back to back from GPA 0, with the
     * EVENT_IDX fields when negotiated (what _translate_ring validates). */
    uint64_t desc_gpa = 0, avail_gpa = 16ull * qsize;
    uint64_t used_gpa = (avail_gpa + 4 + 2ull * qsize + 2 + 3) & ~3ull;
    uint64_t used_len = 4 + 8ull * qsize + (event_idx ? 2 : 0), avail_len = 4 + 2ull * qsize + (event_idx ? 2 : 0);
    if (packed) {
        /* The descriptor ring, then the driver and device event areas; the device
         * writes its used descriptors into the descriptor ring. */
        used_gpa = avail_gpa + 4;
        used_len = avail_len = 4;
    }
    void *desc = vn_mem_gpa_to_host(mem, desc_gpa, 16ull * qsize);
    void *avail = vn_mem_gpa_to_host(mem, avail_gpa, avail_len);
    void *used = vn_mem_gpa_to_host(mem, used_gpa, used_len);
    if (!desc || !avail || !used) return 0;     /* the control plane refuses such a ring */
    dv.used_lo = packed ? desc_gpa : used_gpa;
    dv.used_hi = packed ? desc_gpa + 16ull * qsize : used_gpa + used_len;

    /* One queue per ring size, kept across inputs as the daemon keeps a
     * controller's queues across sessions (and as fast: a fresh queue's 256
     * request slots cost more page faults than the walk itself). */
    static struct vn_vq *queues[MAX_QSIZE_LOG2 + 1];
    struct vn_vq **qp = &queues[hdr[0] % (MAX_QSIZE_LOG2 + 1)];
    if (!*qp) *qp = vn_vq_new(dev, 2);
    struct vn_vq *q = *qp;
    dv.q = q;
    vn_vq_set_mem(q, mem);
    vn_vq_set_ring(q, qsize, desc, avail, used);
    vn_vq_set_packed(q, packed);
    /* Packed: a position inside the ring and a wrap counter (what the control plane checks). */
    vn_vq_set_base(q, packed ? (base & (qsize - 1)) | (base & 0x8000) : base);
    vn_vq_set_features(q, event_idx, indirect);
    vn_vq_set_enabled(q, !disabled);
    vn_vq_set_call(q, hdr[9] & 1 ? call_fd : -1);
    FUZZ_CHECK(vn_vq_start(q) == 0);
    /* What used->idx the guest sees before anything completes. */
    uint16_t checked = 0;
    uint32_t ppos = q->used_idx;
    uint16_t pwrap = q->used_wrap;
    if (!packed) *(volatile uint16_t *)&q->used->idx = checked = base;
#define CHECK_USED() (packed ? check_used_packed(q, &ppos, &pwrap) : check_used(q, &checked))

    for (int round = 0; round < rounds; round++) {
        for (int i = 0; i < NPATCH; i++)
            if (!dv.patch_done[i] && !(dv.patch[i][3] & 0x80) && dv.patch[i][3] % 8 == round)
                apply_patch(i);
        reactor_iteration(reactor);
        CHECK_USED();
        FUZZ_CHECK(vn_vq_inflight(q) == dv.inflight);
        if (arm && !vq_arm(q)) vq_disarm(q);
        if (restart && round == rounds / 2) {
            /* A GET_VRING_BASE / SET_VRING_KICK cycle: stop (without waiting), then
             * start again, which first finishes a stop that timed out. */
            int left = vn_vq_stop(q, 0);
            FUZZ_CHECK(left == (int)dv.inflight);
            dev_poll(&dv);
            vn_vq_start(q);
            reactor_iteration(reactor);
            CHECK_USED();
        }
    }
    /* Drain: every request completes, exactly once, and the queue stops clean. */
    dv.policy &= 3;
    for (int i = 0; dv.nout; i++) {
        FUZZ_CHECK(i < 1000);
        reactor_iteration(reactor);
        CHECK_USED();
    }
    FUZZ_CHECK(dv.inflight == 0);
    FUZZ_CHECK(dv.completions == dv.submits);
    FUZZ_CHECK(vn_vq_stop(q, 0) == 0);
    if (packed) FUZZ_CHECK(q->inflight_slots == 0);
#undef CHECK_USED
    const char *why = vn_vq_broken_reason(q);
    if (why) FUZZ_CHECK(strlen(why) > 0);
    uint64_t signals;
    if (read(call_fd, &signals, sizeof(signals)) < 0) { /* none this time */ }
    return 0;
}
