/*
 * SCSI logical unit emulation (SPC-4 / SBC-3) over a bdev descriptor: what each
 * command does, its sense data, and the bdev I/O it becomes.  The virtio-scsi
 * transport (virtio_scsi.c) hands over commands for LUN 0 of a present target and
 * writes the answer back (scsi_respond).
 *
 * Every length the guest gives (CDB fields, parameter lists, buffers) is checked
 * against the others before a byte moves.
 */
#include "scsi_internal.h"

static const uint8_t zero_block[65536];

/* ------------------------------------------------------------------ */
/* sense and data-in                                                   */
/* ------------------------------------------------------------------ */

/* Fixed-format sense data (SPC-4 4.5.3); `field` >= 0 adds a sense-key specific
 * field pointer into the CDB (cdb = 1) or the parameter list (cdb = 0). */
static uint32_t build_sense(uint8_t *s, uint8_t key, uint16_t asc, int field, int cdb)
{
    memset(s, 0, 18);
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc >> 8;
    s[13] = asc & 0xff;
    if (field >= 0) {
        s[15] = 0x80 | (cdb ? 0x40 : 0);
        put_be16(s + 16, (uint16_t)field);
    }
    return 18;
}

static void check(struct scsi_dev *d, struct scsi_req *sr, uint8_t key, uint16_t asc, int field, int cdb)
{
    uint8_t s[18];
    uint32_t n = build_sense(s, key, asc, field, cdb);
    sr->xfer = 0;
    scsi_respond(d, sr, VIRTIO_SCSI_S_OK, CHECK_CONDITION, s, n);
}

static void invalid_cdb(struct scsi_dev *d, struct scsi_req *sr, int field)
{
    check(d, sr, ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, field, 1);
}

static void invalid_param(struct scsi_dev *d, struct scsi_req *sr, int field)
{
    check(d, sr, ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_PARAM, field, 0);
}

/* Send `len` bytes of emulated data-in, cut to the allocation length and to the
 * buffer the driver gave (an allocation length larger than the buffer is the
 * driver's lie: it gets what fits, and resid says how much that was). */
static void data_in(struct scsi_dev *d, struct scsi_req *sr, const void *buf, uint64_t len, uint64_t alloc)
{
    uint64_t n = len < alloc ? len : alloc;
    if (n > sr->din_len) n = sr->din_len;
    sr->xfer = vn_iov_copy_to(in_iov(sr->req), sr->req->n_in, RESP_SIZE, buf, n);
    scsi_good(d, sr);
}

static uint16_t take_ua(struct scsi_target *t)
{
    if (t->ua & UA_RESET) { t->ua &= ~UA_RESET; return ASC_BUS_DEVICE_RESET; }
    if (t->ua & UA_NEXUS_LOSS) { t->ua &= ~UA_NEXUS_LOSS; return ASC_I_T_NEXUS_LOSS; }
    if (t->ua & UA_LUNS_CHANGED) { t->ua &= ~UA_LUNS_CHANGED; return ASC_LUNS_CHANGED; }
    if (t->ua & UA_CAPACITY_CHANGED) { t->ua &= ~UA_CAPACITY_CHANGED; return ASC_CAPACITY_CHANGED; }
    return ASC_NONE;
}

/* ------------------------------------------------------------------ */
/* bdev I/O                                                            */
/* ------------------------------------------------------------------ */

static void step(struct scsi_dev *d, struct scsi_req *sr);

static void io_done(vn_bdev_io *io, int status)
{
    struct scsi_req *sr = io->cb_arg;
    if (status && !sr->io_status) sr->io_status = status;
    if (sr->inline_wait) {
        sr->inline_done = 1;
        return;
    }
    step(sr->req->dev_ctx, sr);
}

/* Fill `io` with the command's next bdev I/O; 0 when there is none left. */
static int next_io(struct scsi_req *sr, vn_bdev_io *io)
{
    struct scsi_target *t = sr->t;
    io->iov = NULL;
    io->iovcnt = 0;
    switch (sr->op) {
    case OP_RW:
        if (sr->stage == 0) {
            sr->stage = 1;
            io->type = sr->is_write ? VN_IO_WRITE : VN_IO_READ;
            io->offset_blocks = sr->lba;
            io->num_blocks = sr->nblocks;
            io->iov = sr->u.iov;
            io->iovcnt = sr->niov;
            return 1;
        }
        if (sr->stage == 1 && sr->is_write && sr->fua && supports(t, VN_IO_FLUSH)) {
            sr->stage = 2;
            io->type = VN_IO_FLUSH;
            io->offset_blocks = 0;
            io->num_blocks = t->num_blocks;
            return 1;
        }
        return 0;
    case OP_FLUSH:
        if (sr->stage++) return 0;
        io->type = VN_IO_FLUSH;
        io->offset_blocks = 0;
        io->num_blocks = t->num_blocks;
        return 1;
    case OP_UNMAP:
        while (sr->idesc < sr->ndesc) {
            const struct unmap_desc *u = &sr->u.unmap[sr->idesc++];
            if (u->n == 0) continue;
            io->type = VN_IO_UNMAP;
            io->offset_blocks = u->lba;
            io->num_blocks = u->n;
            return 1;
        }
        return 0;
    case OP_WS_ZERO:
        if (sr->stage++) return 0;
        io->type = sr->ws_type;
        io->offset_blocks = sr->lba;
        io->num_blocks = sr->nblocks;
        return 1;
    case OP_WS_DATA: {
        if (sr->nblocks == 0) return 0;
        /* Each write repeats the block's segments; with large blocks the segment
         * count is not what bounds it: bdevs refuse I/O over VN_MAX_TRANSFER. */
        uint64_t chunk = VN_MAX_IOV / sr->blk_niov;
        if (chunk > MAX_XFER_BYTES / t->block_size) chunk = MAX_XFER_BYTES / t->block_size;
        if (chunk > sr->nblocks) chunk = sr->nblocks;
        uint32_t n = 0;
        for (uint64_t b = 0; b < chunk; b++)
            for (uint32_t i = 0; i < sr->blk_niov; i++) sr->u.iov[n++] = sr->blk_iov[i];
        io->type = VN_IO_WRITE;
        io->offset_blocks = sr->lba;
        io->num_blocks = chunk;
        io->iov = sr->u.iov;
        io->iovcnt = n;
        sr->lba += chunk;
        sr->nblocks -= chunk;
        return 1;
    }
    }
    return 0;
}

static void finish_io(struct scsi_dev *d, struct scsi_req *sr)
{
    struct scsi_target *t = sr->t;
    t->outstanding--;
    if (sr->older) sr->older->newer = sr->newer;
    else t->oldest = sr->newer;
    if (sr->newer) sr->newer->older = sr->older;
    else t->newest = sr->older;
    if (sr->io_status == -ERANGE) {
        check(d, sr, ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, NOFIELD, 0);
        return;
    }
    if (sr->io_status) {
        d->stats.io_errors++;
        if (sr->op == OP_RW && !sr->is_write)
            check(d, sr, MEDIUM_ERROR, ASC_UNRECOVERED_READ_ERROR, NOFIELD, 0);
        else if (sr->op == OP_RW || sr->op == OP_WS_DATA)
            check(d, sr, MEDIUM_ERROR, ASC_WRITE_ERROR, NOFIELD, 0);
        else
            check(d, sr, HARDWARE_ERROR, ASC_INTERNAL_TARGET_FAILURE, NOFIELD, 0);
        return;
    }
    enum vn_stat_kind kind;
    switch (sr->op) {
    case OP_RW:
        if (sr->is_write) { d->stats.writes++; d->stats.bytes_written += sr->xfer; kind = VN_STAT_WRITE; }
        else { d->stats.reads++; d->stats.bytes_read += sr->xfer; kind = VN_STAT_READ; }
        break;
    case OP_FLUSH: d->stats.flushes++; kind = VN_STAT_FLUSH; break;
    case OP_UNMAP: d->stats.unmaps++; kind = VN_STAT_UNMAP; break;
    case OP_WS_ZERO: d->stats.write_sames++; kind = VN_STAT_WRITE_ZEROES; break;
    default: d->stats.write_sames++; kind = VN_STAT_WRITE; break;
    }
    vn_desc_account(t->desc, kind, sr->stat_bytes, sr->start_ticks);
    scsi_good(d, sr);
}

/* Run the command's bdev I/Os one after the other.  A bdev that completes inline
 * (malloc) calls io_done from inside submit: that only marks the I/O done and the
 * loop carries on, so a long WRITE SAME or UNMAP list never recurses.  Such a bdev
 * copies or zeroes on this thread, though: once a command has had more than one
 * maximum transfer's worth done inline, the rest waits for the next reactor
 * iteration (scsi_poll), or a WRITE SAME of gigabytes would be one long memcpy
 * that every other device on the reactor waits for.  A single READ or WRITE
 * never reaches that. */
static void step(struct scsi_dev *d, struct scsi_req *sr)
{
    struct scsi_target *t = sr->t;
    uint64_t inline_bytes = 0;
    for (;;) {
        if (sr->io_status || !next_io(sr, &sr->io)) {
            finish_io(d, sr);
            return;
        }
        /* The disk may have shrunk (a resize) since the command was checked, while
         * its earlier I/Os ran: the rest must not go past the new end (nor to a
         * descriptor the core closed under it). */
        const vn_bdev *b = t->desc->bdev;
        uint64_t nb = b ? __atomic_load_n(&b->num_blocks, __ATOMIC_RELAXED) : 0;
        if (sr->io.type != VN_IO_FLUSH &&
            (sr->io.offset_blocks > nb || sr->io.num_blocks > nb - sr->io.offset_blocks)) {
            sr->io_status = -ERANGE;
            finish_io(d, sr);
            return;
        }
        /* Counted once per command, in finish_io. */
        sr->io.flags = VN_IO_F_NO_STAT;
        sr->inline_wait = 1;
        sr->inline_done = 0;
        vn_desc_submit(t->desc, &sr->io, io_done, sr);
        sr->inline_wait = 0;
        if (!sr->inline_done) return;
        if (sr->io.type != VN_IO_FLUSH) inline_bytes += sr->io.num_blocks * t->block_size;
        if (inline_bytes > MAX_XFER_BYTES && !sr->io_status) {
            sr->next = NULL;
            if (d->resume_tail) d->resume_tail->next = sr;
            else d->resume_head = sr;
            d->resume_tail = sr;
            return;
        }
    }
}

/* One parked command per reactor iteration, round robin (one that uses up its
 * share again goes to the back): however many a driver parks, an iteration does
 * one share of their work, as it would for one such command. */
int scsi_lun_resume_parked(struct scsi_dev *d)
{
    struct scsi_req *sr = d->resume_head;
    d->resume_head = sr->next;
    if (!d->resume_head) d->resume_tail = NULL;
    step(d, sr);
    return 1;
}

static void start_io(struct scsi_dev *d, struct scsi_req *sr, uint8_t op)
{
    uint64_t blocks = sr->nblocks;
    if (op == OP_FLUSH) blocks = 0;
    else if (op == OP_UNMAP) {
        blocks = 0;
        for (uint32_t i = 0; i < sr->ndesc; i++) blocks += sr->u.unmap[i].n;
    }
    sr->stat_bytes = blocks * sr->t->block_size;
    sr->start_ticks = vn_desc_now(sr->t->desc);
    sr->op = op;
    sr->stage = 0;
    sr->io_status = 0;
    struct scsi_target *t = sr->t;
    t->outstanding++;
    sr->seq = t->next_seq++;
    sr->newer = NULL;
    sr->older = t->newest;
    if (t->newest) t->newest->newer = sr;
    else t->oldest = sr;
    t->newest = sr;
    step(d, sr);
}

/* ------------------------------------------------------------------ */
/* SCSI commands                                                       */
/* ------------------------------------------------------------------ */

static int lba_out_of_range(const struct scsi_target *t, uint64_t lba, uint64_t n)
{
    return lba > t->num_blocks || n > t->num_blocks - lba;
}

static void cmd_rw(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    vn_req *req = sr->req;
    uint64_t lba;
    uint32_t n;
    int len_field, flags = 0;
    int is_write = cdb[0] == 0x0a || cdb[0] == 0x2a || cdb[0] == 0xaa || cdb[0] == 0x8a;

    switch (cdb[0]) {
    case 0x08: case 0x0a:
        lba = (uint64_t)(cdb[1] & 0x1f) << 16 | be16(cdb + 2);
        n = cdb[4] ? cdb[4] : 256;
        len_field = 4;
        break;
    case 0x28: case 0x2a:
        flags = cdb[1];
        lba = be32(cdb + 2);
        n = be16(cdb + 7);
        len_field = 7;
        break;
    case 0xa8: case 0xaa:
        flags = cdb[1];
        lba = be32(cdb + 2);
        n = be32(cdb + 6);
        len_field = 6;
        break;
    default: /* 0x88, 0x8a */
        flags = cdb[1];
        lba = be64(cdb + 2);
        n = be32(cdb + 10);
        len_field = 10;
        break;
    }
    if (flags & 0xe0) {         /* RDPROTECT / WRPROTECT: no protection information */
        invalid_cdb(d, sr, 1);
        return;
    }
    if (lba_out_of_range(t, lba, n)) {
        check(d, sr, ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, NOFIELD, 0);
        return;
    }
    if (is_write && t->readonly) {
        check(d, sr, DATA_PROTECT, ASC_WRITE_PROTECTED, NOFIELD, 0);
        return;
    }
    if (n == 0) {
        scsi_good(d, sr);
        return;
    }
    if ((uint64_t)n * t->block_size > MAX_XFER_BYTES) {
        invalid_cdb(d, sr, len_field);
        return;
    }
    uint64_t bytes = (uint64_t)n * t->block_size;
    int niov;
    if (is_write) {
        if (bytes > sr->dout_len) { scsi_transport_fail(d, sr, VIRTIO_SCSI_S_OVERRUN); return; }
        niov = vn_iov_slice(req->iov, req->n_out, REQ_SIZE, bytes, sr->u.iov, VN_MAX_IOV);
    } else {
        if (bytes > sr->din_len) { scsi_transport_fail(d, sr, VIRTIO_SCSI_S_OVERRUN); return; }
        niov = vn_iov_slice(in_iov(req), req->n_in, RESP_SIZE, bytes, sr->u.iov, VN_MAX_IOV);
    }
    if (niov < 0) {
        scsi_transport_fail(d, sr, VIRTIO_SCSI_S_FAILURE);
        return;
    }
    sr->niov = (uint32_t)niov;
    sr->is_write = is_write;
    sr->fua = (flags & 0x08) != 0;
    sr->lba = lba;
    sr->nblocks = n;
    sr->xfer = bytes;
    start_io(d, sr, OP_RW);
}

static void cmd_sync_cache(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    uint64_t lba = cdb[0] == 0x35 ? be32(cdb + 2) : be64(cdb + 2);
    uint64_t n = cdb[0] == 0x35 ? be16(cdb + 7) : be32(cdb + 10);
    if (lba_out_of_range(t, lba, n)) {
        check(d, sr, ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, NOFIELD, 0);
        return;
    }
    if (!supports(t, VN_IO_FLUSH)) {
        scsi_good(d, sr);
        return;
    }
    start_io(d, sr, OP_FLUSH);
}

static void cmd_write_same(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    int ws16 = cdb[0] == 0x93;
    uint64_t lba = ws16 ? be64(cdb + 2) : be32(cdb + 2);
    uint64_t n = ws16 ? be32(cdb + 10) : be16(cdb + 7);
    int ndob = ws16 && (cdb[1] & 0x01);
    int unmap = (cdb[1] & 0x08) != 0;
    /* WRPROTECT, ANCHOR (not supported), PBDATA/LBDATA (obsolete); bit 0 is NDOB
     * in WRITE SAME (16) and reserved in WRITE SAME (10) */
    if ((cdb[1] & 0xf6) || (!ws16 && (cdb[1] & 0x01))) {
        invalid_cdb(d, sr, 1);
        return;
    }
    if (n == 0 || n > max_unmap_blocks(t)) {  /* WSNZ = 1; MAXIMUM WRITE SAME LENGTH */
        invalid_cdb(d, sr, ws16 ? 10 : 7);
        return;
    }
    if (lba_out_of_range(t, lba, n)) {
        check(d, sr, ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, NOFIELD, 0);
        return;
    }
    if (t->readonly) {
        check(d, sr, DATA_PROTECT, ASC_WRITE_PROTECTED, NOFIELD, 0);
        return;
    }
    int zero = 1;
    if (!ndob) {
        if (sr->dout_len < t->block_size) { scsi_transport_fail(d, sr, VIRTIO_SCSI_S_OVERRUN); return; }
        int k = vn_iov_slice(sr->req->iov, sr->req->n_out, REQ_SIZE, t->block_size, sr->blk_iov, WS_BLOCK_IOV);
        if (k < 0) { scsi_transport_fail(d, sr, VIRTIO_SCSI_S_FAILURE); return; }
        sr->blk_niov = (uint32_t)k;
        for (int i = 0; i < k && zero; i++) {
            const uint8_t *p = sr->blk_iov[i].iov_base;
            for (size_t j = 0; j < sr->blk_iov[i].iov_len; j++)
                if (p[j]) { zero = 0; break; }
        }
        sr->xfer = t->block_size;
    }
    sr->lba = lba;
    sr->nblocks = n;
    if (zero && supports(t, VN_IO_WRITE_ZEROES)) {
        sr->ws_type = VN_IO_WRITE_ZEROES;
        start_io(d, sr, OP_WS_ZERO);
        return;
    }
    (void)unmap;    /* without LBPRZ an unmap would not guarantee the zeros: write them */
    if (ndob) {
        sr->blk_iov[0].iov_base = (void *)zero_block;
        sr->blk_iov[0].iov_len = t->block_size;
        sr->blk_niov = 1;
    }
    start_io(d, sr, OP_WS_DATA);
}

static void cmd_unmap(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    uint8_t hdr[8], desc[16];
    if (!thin(t)) {
        check(d, sr, ILLEGAL_REQUEST, ASC_INVALID_OPCODE, 0, 1);
        return;
    }
    if (cdb[1] & 0x01) {        /* ANCHOR */
        invalid_cdb(d, sr, 1);
        return;
    }
    uint32_t plen = be16(cdb + 7);
    if (plen == 0) {
        scsi_good(d, sr);
        return;
    }
    if (plen < 8) {
        check(d, sr, ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH_ERROR, NOFIELD, 0);
        return;
    }
    if (plen > sr->dout_len) {
        scsi_transport_fail(d, sr, VIRTIO_SCSI_S_OVERRUN);
        return;
    }
    vn_iov_copy_from(sr->req->iov, sr->req->n_out, REQ_SIZE, hdr, sizeof(hdr));
    uint32_t bdl = be16(hdr + 2);
    if (bdl > plen - 8) bdl = plen - 8;
    uint32_t ndesc = bdl / 16;
    if (ndesc > MAX_UNMAP_DESC) {
        invalid_param(d, sr, 2);
        return;
    }
    uint64_t total = 0;
    for (uint32_t i = 0; i < ndesc; i++) {
        vn_iov_copy_from(sr->req->iov, sr->req->n_out, REQ_SIZE + 8 + 16 * i, desc, sizeof(desc));
        uint64_t lba = be64(desc);
        uint64_t n = be32(desc + 8);
        if (lba_out_of_range(t, lba, n)) {
            check(d, sr, ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE, NOFIELD, 0);
            return;
        }
        /* MAXIMUM UNMAP LBA COUNT bounds the whole list (SBC-3, UNMAP), not each
         * descriptor: 64 descriptors of the maximum would be 64 times the work. */
        total += n;
        if (total > max_unmap_blocks(t)) {
            invalid_param(d, sr, 8 + 16 * i + 8);
            return;
        }
        sr->u.unmap[i].lba = lba;
        sr->u.unmap[i].n = n;
    }
    sr->ndesc = ndesc;
    sr->idesc = 0;
    sr->xfer = plen;
    start_io(d, sr, OP_UNMAP);
}

static uint32_t std_inquiry(const struct scsi_target *t, uint8_t *b, int present)
{
    static const uint16_t versions[] = { 0x00a0 /* SAM-5 */, 0x0460 /* SPC-4 */, 0x04c0 /* SBC-3 */ };
    memset(b, 0, 96);
    b[0] = present ? 0x00 : 0x7f;   /* direct access block device, or PQ 011b: no LUN here */
    b[2] = 0x06;                    /* SPC-4 */
    b[3] = 0x02;                    /* response data format 2 */
    b[4] = 96 - 5;
    b[7] = 0x02;                    /* CMDQUE */
    memcpy(b + 8, "INTEL   ", 8);
    memcpy(b + 16, t->product, 16);
    memcpy(b + 32, "0001", 4);
    for (int i = 0; i < 3; i++) put_be16(b + 58 + 2 * i, versions[i]);
    return 96;
}

static void cmd_inquiry(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    uint8_t b[256];
    uint32_t len;
    uint16_t alloc = be16(cdb + 3);
    if (cdb[1] & 0xfe) {        /* CMDDT (obsolete) and reserved bits */
        invalid_cdb(d, sr, 1);
        return;
    }
    if (!(cdb[1] & 0x01)) {
        if (cdb[2]) { invalid_cdb(d, sr, 2); return; }
        len = std_inquiry(t, b, 1);
        data_in(d, sr, b, len, alloc);
        return;
    }
    memset(b, 0, sizeof(b));
    b[1] = cdb[2];
    switch (cdb[2]) {
    case 0x00: {                /* supported VPD pages */
        static const uint8_t pages[] = { 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2 };
        memcpy(b + 4, pages, sizeof(pages));
        len = 4 + sizeof(pages);
        break;
    }
    case 0x80:                  /* unit serial number: the bdev name, as SPDK */
        memcpy(b + 4, t->serial, t->serial_len);
        len = 4 + t->serial_len;
        break;
    case 0x83: {                /* device identification */
        uint8_t *p = b + 4;
        p[0] = 0x01;            /* binary */
        p[1] = 0x03;            /* associated with the LU, NAA */
        p[3] = 8;
        memcpy(p + 4, t->naa, 8);
        p += 12;
        p[0] = 0x02;            /* ASCII */
        p[1] = 0x01;            /* associated with the LU, T10 vendor ID based */
        p[3] = (uint8_t)(8 + t->t10_id_len);
        memcpy(p + 4, "INTEL   ", 8);
        memcpy(p + 12, t->t10_id, t->t10_id_len);
        p += 12 + t->t10_id_len;
        len = (uint32_t)(p - b);
        break;
    }
    case 0xb0: {                /* block limits */
        b[3] = 0x3c;
        b[4] = 0x01;            /* WSNZ */
        put_be32(b + 8, MAX_XFER_BYTES / t->block_size);
        if (thin(t)) {
            put_be32(b + 20, (uint32_t)max_unmap_blocks(t));
            put_be32(b + 24, MAX_UNMAP_DESC);
            put_be32(b + 28, 1);
        }
        put_be64(b + 36, max_unmap_blocks(t));
        len = 64;
        break;
    }
    case 0xb1:                  /* block device characteristics */
        b[3] = 0x3c;
        put_be16(b + 4, 0x0001); /* non-rotating medium */
        len = 64;
        break;
    case 0xb2:                  /* logical block provisioning */
        b[3] = 0x04;
        if (thin(t)) {
            b[5] = 0x80 | 0x40 | 0x20;  /* LBPU, LBPWS, LBPWS10 */
            b[6] = 0x02;                /* thin provisioned */
        }
        len = 8;
        break;
    default:
        invalid_cdb(d, sr, 2);
        return;
    }
    put_be16(b + 2, (uint16_t)(len - 4));
    data_in(d, sr, b, len, alloc);
}

/* One mode page (current/default values, or the changeable mask: all zeros). */
static int mode_page(const struct scsi_target *t, uint8_t code, int changeable, uint8_t *p)
{
    switch (code) {
    case 0x08:                  /* caching */
        memset(p, 0, 20);
        p[0] = 0x08;
        p[1] = 0x12;
        if (!changeable && has_write_cache(t)) p[2] = 0x04;    /* WCE */
        return 20;
    case 0x0a:                  /* control */
        memset(p, 0, 12);
        p[0] = 0x0a;
        p[1] = 0x0a;
        if (!changeable) {
            p[2] = 0x02;        /* GLTSD; D_SENSE = 0: fixed format sense */
            p[3] = 0x10;        /* queue algorithm modifier 1: unrestricted reordering */
            put_be16(p + 8, 0xffff);
        }
        return 12;
    }
    return -1;
}

static void cmd_mode_sense(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    int ten = cdb[0] == 0x5a;
    int dbd = (cdb[1] & 0x08) != 0;
    int llbaa = ten && (cdb[1] & 0x10);
    uint8_t pc = cdb[2] >> 6, page = cdb[2] & 0x3f, sub = cdb[3];
    uint32_t alloc = ten ? be16(cdb + 7) : cdb[4];
    uint8_t b[128];
    memset(b, 0, sizeof(b));

    if (pc == 3) {
        check(d, sr, ILLEGAL_REQUEST, ASC_SAVING_PARAMS_UNSUP, NOFIELD, 0);
        return;
    }
    if (sub != 0 && sub != 0xff) { invalid_cdb(d, sr, 3); return; }
    if (page != 0x08 && page != 0x0a && page != 0x3f) { invalid_cdb(d, sr, 2); return; }

    uint32_t hdr = ten ? 8 : 4, bdl = dbd ? 0 : (llbaa ? 16 : 8), off = hdr;
    uint8_t devspec = (t->readonly ? 0x80 : 0) | (has_write_cache(t) ? 0x10 : 0);  /* WP, DPOFUA */
    if (bdl == 8) {
        put_be32(b + off, t->num_blocks > 0xffffffffu ? 0xffffffffu : (uint32_t)t->num_blocks);
        put_be32(b + off + 4, t->block_size);   /* byte 4 (density code) is 0 */
    } else if (bdl == 16) {
        put_be64(b + off, t->num_blocks);
        put_be32(b + off + 12, t->block_size);
    }
    off += bdl;
    if (page == 0x08 || page == 0x3f) off += mode_page(t, 0x08, pc == 1, b + off);
    if (page == 0x0a || page == 0x3f) off += mode_page(t, 0x0a, pc == 1, b + off);
    if (ten) {
        put_be16(b, (uint16_t)(off - 2));
        b[3] = devspec;
        b[4] = llbaa ? 0x01 : 0x00;     /* LONGLBA */
        put_be16(b + 6, (uint16_t)bdl);
    } else {
        b[0] = (uint8_t)(off - 1);
        b[2] = devspec;
        b[3] = (uint8_t)bdl;
    }
    data_in(d, sr, b, off, alloc);
}

static void cmd_mode_select(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    int ten = cdb[0] == 0x55;
    uint32_t plen = ten ? be16(cdb + 7) : cdb[4];
    uint32_t hdr = ten ? 8 : 4;
    uint8_t p[512], cur[32];

    if (cdb[1] & 0x01) {        /* SP: nothing can be saved */
        invalid_cdb(d, sr, 1);
        return;
    }
    if (plen == 0) { scsi_good(d, sr); return; }
    if (plen > sr->dout_len) { scsi_transport_fail(d, sr, VIRTIO_SCSI_S_OVERRUN); return; }
    if (plen < hdr || plen > sizeof(p)) {
        check(d, sr, ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH_ERROR, NOFIELD, 0);
        return;
    }
    vn_iov_copy_from(sr->req->iov, sr->req->n_out, REQ_SIZE, p, plen);
    uint32_t bdl = ten ? be16(p + 6) : p[3];
    int longlba = ten && (p[4] & 0x01);
    if (hdr + bdl > plen) {
        check(d, sr, ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH_ERROR, NOFIELD, 0);
        return;
    }
    if (bdl) {
        uint32_t want = longlba ? 16 : 8;
        if (bdl != want) { invalid_param(d, sr, ten ? 6 : 3); return; }
        uint32_t bs = longlba ? be32(p + hdr + 12) : (be32(p + hdr + 4) & 0xffffff);
        if (bs != t->block_size) { invalid_param(d, sr, hdr + (longlba ? 12 : 5)); return; }
    }
    uint32_t off = hdr + bdl;
    while (off < plen) {
        if (plen - off < 2) {
            check(d, sr, ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH_ERROR, NOFIELD, 0);
            return;
        }
        uint32_t len = 2u + p[off + 1];
        if (off + len > plen) {
            check(d, sr, ILLEGAL_REQUEST, ASC_PARAM_LIST_LENGTH_ERROR, NOFIELD, 0);
            return;
        }
        int n = (p[off] & 0x40) ? -1 : mode_page(t, p[off] & 0x3f, 0, cur);
        if (n < 0 || (uint32_t)n != len) { invalid_param(d, sr, off); return; }
        /* Nothing is changeable: every field must keep its current value. */
        for (uint32_t i = 2; i < len; i++)
            if (p[off + i] != cur[i]) { invalid_param(d, sr, off + i); return; }
        off += len;
    }
    sr->xfer = plen;
    scsi_good(d, sr);
}

static void cmd_report_luns(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    uint8_t b[16];
    uint32_t alloc = be32(cdb + 6);
    if (alloc < 16) { invalid_cdb(d, sr, 6); return; }
    memset(b, 0, sizeof(b));
    switch (cdb[2]) {
    case 0x00:                  /* all LUNs (LUN 0) */
    case 0x02:
        put_be32(b, 8);
        break;
    case 0x01:                  /* well known LUNs only: none */
        break;
    default:
        invalid_cdb(d, sr, 2);
        return;
    }
    sr->t->ua &= ~UA_LUNS_CHANGED;
    data_in(d, sr, b, cdb[2] == 0x01 ? 8 : 16, alloc);
}

static void cmd_read_capacity(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    uint8_t b[32];
    uint64_t last = t->num_blocks - 1;
    memset(b, 0, sizeof(b));
    if (cdb[0] == 0x25) {
        if (!(cdb[8] & 0x01) && be32(cdb + 2)) { invalid_cdb(d, sr, 2); return; }
        put_be32(b, last > 0xffffffffu ? 0xffffffffu : (uint32_t)last);
        put_be32(b + 4, t->block_size);
        data_in(d, sr, b, 8, 8);
        return;
    }
    put_be64(b, last);
    put_be32(b + 8, t->block_size);
    if (thin(t)) b[14] = 0x80;  /* LBPME */
    data_in(d, sr, b, 32, be32(cdb + 10));
}

static void cmd_request_sense(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb, int present)
{
    uint8_t s[18];
    if (cdb[1] & 0x01) {        /* DESC: only fixed format sense is supported */
        invalid_cdb(d, sr, 1);
        return;
    }
    uint16_t asc = present ? take_ua(sr->t) : ASC_LUN_NOT_SUPPORTED;
    uint8_t key = asc == ASC_NONE ? NO_SENSE : (present ? UNIT_ATTENTION : ILLEGAL_REQUEST);
    build_sense(s, key, asc, NOFIELD, 0);
    data_in(d, sr, s, 18, cdb[4]);
}

/* A LUN other than 0 on a present target: there is no logical unit there. */
void scsi_lun_absent(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    uint8_t b[96];
    switch (cdb[0]) {
    case 0x12:
        if (cdb[1] & 0x01 || cdb[2]) break;
        data_in(d, sr, b, std_inquiry(sr->t, b, 0), be16(cdb + 3));
        return;
    case 0xa0:
        cmd_report_luns(d, sr, cdb);
        return;
    case 0x03:
        cmd_request_sense(d, sr, cdb, 0);
        return;
    }
    check(d, sr, ILLEGAL_REQUEST, ASC_LUN_NOT_SUPPORTED, NOFIELD, 0);
}

/* CDB length by group code, 0 for groups without a fixed length. */
static int cdb_len(uint8_t op)
{
    switch (op >> 5) {
    case 0: return 6;
    case 1: case 2: return 10;
    case 4: return 16;
    case 5: return 12;
    default: return 0;
    }
}

/* A command for LUN 0 of a present target (sr->t): attentions first, then the CDB. */
void scsi_lun_execute(struct scsi_dev *d, struct scsi_req *sr, const uint8_t *cdb)
{
    struct scsi_target *t = sr->t;
    int len = cdb_len(cdb[0]);
    if (len && (cdb[len - 1] & 0x04)) {     /* NACA: ACA is not supported */
        invalid_cdb(d, sr, len - 1);
        return;
    }
    if (t->ua && cdb[0] != 0x12 && cdb[0] != 0xa0 && cdb[0] != 0x03) {
        check(d, sr, UNIT_ATTENTION, take_ua(t), NOFIELD, 0);
        return;
    }
    switch (cdb[0]) {
    case 0x00: scsi_good(d, sr); return;                         /* TEST UNIT READY */
    case 0x03: cmd_request_sense(d, sr, cdb, 1); return;
    case 0x08: case 0x0a: case 0x28: case 0x2a:
    case 0x88: case 0x8a: case 0xa8: case 0xaa:
        cmd_rw(d, sr, cdb);
        return;
    case 0x12: cmd_inquiry(d, sr, cdb); return;
    case 0x15: case 0x55: cmd_mode_select(d, sr, cdb); return;
    case 0x1a: case 0x5a: cmd_mode_sense(d, sr, cdb); return;
    case 0x1b: scsi_good(d, sr); return;                         /* START STOP UNIT */
    case 0x25: cmd_read_capacity(d, sr, cdb); return;
    case 0x35: case 0x91: cmd_sync_cache(d, sr, cdb); return;
    case 0x41: case 0x93: cmd_write_same(d, sr, cdb); return;
    case 0x42: cmd_unmap(d, sr, cdb); return;
    case 0x9e:                                              /* SERVICE ACTION IN (16) */
        if ((cdb[1] & 0x1f) == 0x10) { cmd_read_capacity(d, sr, cdb); return; }
        invalid_cdb(d, sr, 1);
        return;
    case 0xa0: cmd_report_luns(d, sr, cdb); return;
    }
    check(d, sr, ILLEGAL_REQUEST, ASC_INVALID_OPCODE, 0, 1);
}
