/*
 * The virtio-scsi transport (virtio 1.x, 5.6 SCSI Host Device): one LUN per target,
 * up to SCSI_MAX_TARGETS targets per controller, each backed by a bdev descriptor.
 * What a command asks of its logical unit is scsi_lun.c's.
 *
 * Queue 0 is the control queue (task management, asynchronous notification
 * queries), queue 1 the event queue (buffers are held until a hot-attach or
 * hot-detach fires an event), queues 2.. carry commands.  Every request header is
 * copied out of guest memory once before it is looked at.
 */
#include "scsi_internal.h"

/* ------------------------------------------------------------------ */
/* responses                                                           */
/* ------------------------------------------------------------------ */

void scsi_respond(struct scsi_dev *d, struct scsi_req *sr, uint8_t response, uint8_t status,
                  const uint8_t *sense, uint32_t sense_len)
{
    vn_req *req = sr->req;
    uint8_t hdr[12 + SENSE_SIZE];
    uint64_t total = sr->din_len + sr->dout_len;
    uint64_t resid = total > sr->xfer ? total - sr->xfer : 0;

    if (resid > UINT32_MAX) resid = UINT32_MAX;
    if (sense_len > SENSE_SIZE) sense_len = SENSE_SIZE;
    put_le32(hdr, sense_len);
    put_le32(hdr + 4, (uint32_t)resid);
    hdr[8] = hdr[9] = 0;
    hdr[10] = status;
    hdr[11] = response;
    if (sense_len) memcpy(hdr + 12, sense, sense_len);
    vn_iov_copy_to(in_iov(req), req->n_in, 0, hdr, 12 + sense_len);
    if (response == VIRTIO_SCSI_S_BAD_TARGET) d->stats.bad_target++;
    else if (response == VIRTIO_SCSI_S_OVERRUN) d->stats.overrun++;
    else if (response != VIRTIO_SCSI_S_OK) d->stats.invalid++;
    else if (status != GOOD) d->stats.check_conditions++;
    /* in_len <= UINT32_MAX was checked on entry and xfer never exceeds din_len. */
    req->complete(req, RESP_SIZE + (uint32_t)(sr->din_len ? sr->xfer : 0));
}

void scsi_transport_fail(struct scsi_dev *d, struct scsi_req *sr, uint8_t response)
{
    sr->xfer = 0;
    scsi_respond(d, sr, response, GOOD, NULL, 0);
}

void scsi_good(struct scsi_dev *d, struct scsi_req *sr)
{
    scsi_respond(d, sr, VIRTIO_SCSI_S_OK, GOOD, NULL, 0);
}

/* ------------------------------------------------------------------ */
/* events                                                              */
/* ------------------------------------------------------------------ */

static void write_event(struct scsi_req *sr, uint32_t event, int target, uint32_t reason)
{
    uint8_t ev[EVENT_SIZE];
    memset(ev, 0, sizeof(ev));
    put_le32(ev, event);
    if (target >= 0) {
        ev[4] = 1;
        ev[5] = (uint8_t)target;
    }
    put_le32(ev + 12, reason);
    vn_iov_copy_to(in_iov(sr->req), sr->req->n_in, 0, ev, sizeof(ev));
    sr->req->complete(sr->req, EVENT_SIZE);
}

static struct scsi_req *pop_event(struct scsi_dev *d)
{
    struct scsi_req *sr = d->ev_head;
    if (sr) {
        d->ev_head = sr->next;
        if (!d->ev_head) d->ev_tail = NULL;
        d->ev_held--;
    }
    return sr;
}

/* Complete a held event buffer with `event`; with none held, flag EVENTS_MISSED
 * on the next one instead. */
static void send_event(struct scsi_dev *d, uint32_t event, int target, uint32_t reason)
{
    struct scsi_req *sr = pop_event(d);
    if (!sr) {
        d->events_missed = 1;
        d->stats.events_missed++;
        return;
    }
    if (d->events_missed) event |= VIRTIO_SCSI_T_EVENTS_MISSED;
    d->events_missed = 0;
    d->stats.events_sent++;
    write_event(sr, event, target, reason);
}

/* A target appeared or went away: tell the driver with a transport reset event
 * (VIRTIO_SCSI_F_HOTPLUG), or else with a unit attention on the other targets. */
static void notify(struct scsi_dev *d, int target, uint32_t reason)
{
    if (!d->hotplug) {
        for (int i = 0; i < SCSI_MAX_TARGETS; i++)
            if (i != target && d->tgt[i].state == TGT_PRESENT) d->tgt[i].ua |= UA_LUNS_CHANGED;
        return;
    }
    send_event(d, VIRTIO_SCSI_T_TRANSPORT_RESET, target, reason);
}

static void event_submit(struct scsi_dev *d, struct scsi_req *sr)
{
    vn_req *req = sr->req;
    if (req->error || req->in_len < EVENT_SIZE) {
        d->stats.invalid++;
        req->complete(req, 0);
        return;
    }
    if (d->events_missed) {
        d->events_missed = 0;
        d->stats.events_sent++;
        write_event(sr, VIRTIO_SCSI_T_NO_EVENT | VIRTIO_SCSI_T_EVENTS_MISSED, -1, 0);
        return;
    }
    sr->next = NULL;
    if (d->ev_tail) d->ev_tail->next = sr;
    else d->ev_head = sr;
    d->ev_tail = sr;
    d->ev_held++;
}

/* ------------------------------------------------------------------ */
/* control queue                                                       */
/* ------------------------------------------------------------------ */

/* LUN field of a request: the LUN number, or -1 for an address we do not use. */
static int parse_lun(const uint8_t *lun)
{
    if (lun[4] | lun[5] | lun[6] | lun[7]) return -1;
    switch (lun[2] >> 6) {
    case 0:                     /* peripheral device addressing, bus 0 */
        return lun[2] ? -1 : lun[3];
    case 1:                     /* flat space addressing (what Linux sends) */
        return ((lun[2] & 0x3f) << 8) | lun[3];
    default:
        return -1;
    }
}

static struct scsi_target *lookup_target(struct scsi_dev *d, const uint8_t *lun)
{
    if (lun[0] != 1 || lun[1] >= SCSI_MAX_TARGETS) return NULL;
    struct scsi_target *t = &d->tgt[lun[1]];
    if (t->state != TGT_PRESENT || !vn_desc_usable(t->desc)) return NULL;
    return t;
}

static void ctrl_reply(vn_req *req, const void *resp, uint32_t len)
{
    vn_iov_copy_to(in_iov(req), req->n_in, 0, resp, len);
    req->complete(req, len);
}

static void tmf_finish(struct scsi_dev *d, struct scsi_req *sr, uint8_t resp)
{
    struct scsi_target *t = &d->tgt[sr->tmf_target];
    if (resp == VIRTIO_SCSI_S_FUNCTION_COMPLETE && t->state == TGT_PRESENT) {
        if (sr->tmf_subtype == TMF_LOGICAL_UNIT_RESET) t->ua |= UA_RESET;
        else if (sr->tmf_subtype == TMF_I_T_NEXUS_RESET) t->ua |= UA_NEXUS_LOSS;
    }
    ctrl_reply(sr->req, &resp, 1);
}

/* Every command that was in flight on the target when the TMF arrived is done. */
static int tmf_ready(const struct scsi_target *t, const struct scsi_req *tmf)
{
    return !t->oldest || t->oldest->seq >= tmf->seq;
}

/* Complete the target's held TMFs that wait on nothing any more; with `force`,
 * all of them, rejecting those that still would (their queue is stopping).  They
 * are held in arrival order, so the first that must wait ends the pass. */
static int tmf_release(struct scsi_dev *d, struct scsi_target *t, int force)
{
    int n = 0;
    struct scsi_req *sr;
    while ((sr = t->tmf_head) != NULL) {
        int ready = tmf_ready(t, sr);
        if (!ready && !force) break;
        t->tmf_head = sr->next;
        if (!t->tmf_head) t->tmf_tail = NULL;
        d->tmf_held--;
        tmf_finish(d, sr, ready ? VIRTIO_SCSI_S_FUNCTION_COMPLETE : VIRTIO_SCSI_S_FUNCTION_REJECTED);
        n++;
    }
    return n;
}

static void tmf_submit(struct scsi_dev *d, struct scsi_req *sr)
{
    vn_req *req = sr->req;
    uint8_t tmf[TMF_REQ_SIZE], resp;
    vn_iov_copy_from(req->iov, req->n_out, 0, tmf, sizeof(tmf));
    uint32_t subtype = le32(tmf + 4);
    struct scsi_target *t = lookup_target(d, tmf + 8);
    d->stats.tmfs++;
    if (!t) {
        resp = VIRTIO_SCSI_S_BAD_TARGET;
        ctrl_reply(req, &resp, 1);
        return;
    }
    if (parse_lun(tmf + 8) != 0) {
        resp = VIRTIO_SCSI_S_INCORRECT_LUN;
        ctrl_reply(req, &resp, 1);
        return;
    }
    switch (subtype) {
    case TMF_ABORT_TASK:
    case TMF_ABORT_TASK_SET:
    case TMF_CLEAR_TASK_SET:
    case TMF_I_T_NEXUS_RESET:
    case TMF_LOGICAL_UNIT_RESET:
        /* Commands cannot be recalled from a bdev: the function completes once
         * every command the logical unit had when it arrived has.  Not those sent
         * after it: a driver that keeps I/O flowing would hold it forever. */
        sr->tmf_target = (uint8_t)(t - d->tgt);
        sr->tmf_subtype = (uint8_t)subtype;
        sr->seq = t->next_seq;
        if (tmf_ready(t, sr)) {
            tmf_finish(d, sr, VIRTIO_SCSI_S_FUNCTION_COMPLETE);
        } else {
            sr->next = NULL;
            if (t->tmf_tail) t->tmf_tail->next = sr;
            else t->tmf_head = sr;
            t->tmf_tail = sr;
            d->tmf_held++;
        }
        return;
    default:
        /* CLEAR ACA (we never establish ACA), QUERY TASK / TASK SET and the
         * unknown ones. */
        resp = VIRTIO_SCSI_S_FUNCTION_REJECTED;
        ctrl_reply(req, &resp, 1);
        return;
    }
}

static void ctrl_submit(struct scsi_dev *d, struct scsi_req *sr)
{
    vn_req *req = sr->req;
    uint8_t type_buf[4];
    if (req->error || req->out_len < 4) {
        d->stats.invalid++;
        req->complete(req, 0);
        return;
    }
    vn_iov_copy_from(req->iov, req->n_out, 0, type_buf, 4);
    uint32_t type = le32(type_buf);
    switch (type) {
    case VIRTIO_SCSI_T_TMF:
        if (req->in_len < 1) break;
        if (req->out_len < TMF_REQ_SIZE) {
            uint8_t resp = VIRTIO_SCSI_S_FAILURE;
            d->stats.invalid++;
            ctrl_reply(req, &resp, 1);
            return;
        }
        tmf_submit(d, sr);
        return;
    case VIRTIO_SCSI_T_AN_QUERY:
    case VIRTIO_SCSI_T_AN_SUBSCRIBE: {
        uint8_t an[AN_REQ_SIZE], resp[AN_RESP_SIZE];
        if (req->in_len < AN_RESP_SIZE) break;
        memset(resp, 0, sizeof(resp));
        if (req->out_len < AN_REQ_SIZE) {
            resp[4] = VIRTIO_SCSI_S_FAILURE;
            d->stats.invalid++;
        } else {
            vn_iov_copy_from(req->iov, req->n_out, 0, an, sizeof(an));
            /* No asynchronous event is supported: event_actual stays 0. */
            resp[4] = lookup_target(d, an + 4) ? VIRTIO_SCSI_S_OK : VIRTIO_SCSI_S_BAD_TARGET;
        }
        ctrl_reply(req, resp, sizeof(resp));
        return;
    }
    default:
        break;
    }
    /* Unknown request type, or no room for the response it would need. */
    d->stats.invalid++;
    req->complete(req, 0);
}

/* ------------------------------------------------------------------ */
/* commands                                                            */
/* ------------------------------------------------------------------ */

static void cmd_submit(struct scsi_dev *d, struct scsi_req *sr)
{
    vn_req *req = sr->req;
    uint8_t hdr[REQ_SIZE];
    const uint8_t *cdb = hdr + CDB_OFFSET;

    d->stats.commands++;
    sr->xfer = 0;
    sr->din_len = sr->dout_len = 0;
    /* No room for a response (or a chain we could not map): nothing to write. */
    if (req->error || req->in_len < RESP_SIZE || req->in_len > UINT32_MAX) {
        d->stats.invalid++;
        req->complete(req, 0);
        return;
    }
    sr->din_len = req->in_len - RESP_SIZE;
    if (req->out_len < REQ_SIZE) {
        scsi_transport_fail(d, sr, VIRTIO_SCSI_S_FAILURE);
        return;
    }
    sr->dout_len = req->out_len - REQ_SIZE;
    vn_iov_copy_from(req->iov, req->n_out, 0, hdr, sizeof(hdr));
    struct scsi_target *t = lookup_target(d, hdr);
    if (!t) {
        scsi_transport_fail(d, sr, VIRTIO_SCSI_S_BAD_TARGET);
        return;
    }
    if (sr->din_len && sr->dout_len) {      /* bidirectional: VIRTIO_SCSI_F_INOUT not offered */
        scsi_transport_fail(d, sr, VIRTIO_SCSI_S_FAILURE);
        return;
    }
    sr->t = t;
    if (parse_lun(hdr) != 0) {
        scsi_lun_absent(d, sr, cdb);
        return;
    }
    scsi_lun_execute(d, sr, cdb);
}

/* ------------------------------------------------------------------ */
/* the device table                                                    */
/* ------------------------------------------------------------------ */

static void scsi_submit(void *ctx, vn_req *req)
{
    struct scsi_dev *d = ctx;
    struct scsi_req *sr = (struct scsi_req *)req->dev_priv;
    sr->req = req;
    sr->next = NULL;
    sr->t = NULL;
    switch (req->queue_index) {
    case 0: ctrl_submit(d, sr); return;
    case 1: event_submit(d, sr); return;
    default: cmd_submit(d, sr); return;
    }
}

/* The device's own work, once per reactor iteration after the bdev channels
 * were polled: parked commands go on, TMFs whose commands are done complete. */
static int scsi_poll(void *ctx)
{
    struct scsi_dev *d = ctx;
    int work = 0;
    if (d->resume_head) work += scsi_lun_resume_parked(d);
    if (d->tmf_held)
        for (int i = 0; i < SCSI_MAX_TARGETS; i++)
            if (d->tgt[i].tmf_head) work += tmf_release(d, &d->tgt[i], 0);
    return work;
}

static const struct vn_device_ops scsi_ops = {
    .abi_version = VN_ABI_VERSION,
    .submit = scsi_submit,
    .poll = scsi_poll,
};

const void *scsi_device_ops(void) { return &scsi_ops; }

uint32_t scsi_dev_max_transfer(void) { return MAX_XFER_BYTES; }

struct scsi_dev *scsi_dev_new(void) { return calloc(1, sizeof(struct scsi_dev)); }

void scsi_dev_free(struct scsi_dev *d) { free(d); }

/* ------------------------------------------------------------------ */
/* control plane calls (run on the reactor through vn_reactor_exec)   */
/* ------------------------------------------------------------------ */

int scsi_dev_add_target(void *arg)
{
    struct scsi_target_desc *desc = arg;
    struct scsi_dev *d = desc->dev;
    vn_bdev_desc *bd = desc->desc;
    if (desc->target >= SCSI_MAX_TARGETS || !vn_desc_usable(bd)) return -EINVAL;
    struct scsi_target *t = &d->tgt[desc->target];
    if (t->state != TGT_EMPTY) return -EEXIST;
    memset(t, 0, sizeof(*t));
    t->desc = bd;
    t->block_size = bd->bdev->block_size;
    t->num_blocks = bd->bdev->num_blocks;
    t->io_types = bd->bdev->io_types;
    t->readonly = desc->readonly != 0;
    memcpy(t->product, desc->product, sizeof(t->product));
    t->serial_len = desc->serial_len < sizeof(t->serial) ? desc->serial_len : sizeof(t->serial);
    memcpy(t->serial, desc->serial, t->serial_len);
    memcpy(t->naa, desc->naa, sizeof(t->naa));
    t->t10_id_len = desc->t10_id_len < sizeof(t->t10_id) ? desc->t10_id_len : sizeof(t->t10_id);
    memcpy(t->t10_id, desc->t10_id, t->t10_id_len);
    t->state = TGT_PRESENT;
    notify(d, (int)desc->target, VIRTIO_SCSI_EVT_RESET_RESCAN);
    return 0;
}

/* New commands to the target answer BAD_TARGET from the first call on; returns
 * the commands still in flight at its bdev, 0 once the target is gone (the
 * caller retries until then, and then closes the bdev's descriptor). */
int scsi_dev_remove_target(void *arg)
{
    struct scsi_ctl *c = arg;
    struct scsi_dev *d = c->dev;
    if (c->target >= SCSI_MAX_TARGETS) return -EINVAL;
    struct scsi_target *t = &d->tgt[c->target];
    if (t->state == TGT_EMPTY) return 0;
    t->state = TGT_REMOVING;
    if (t->outstanding) return (int)t->outstanding;
    tmf_release(d, t, 1);      /* nothing left for them to wait on */
    memset(t, 0, sizeof(*t));
    notify(d, (int)c->target, VIRTIO_SCSI_EVT_RESET_REMOVED);
    return 0;
}

/* The target's bdev was resized: adopt the new size, tell the driver with a
 * CAPACITY DATA HAS CHANGED unit attention and, with VIRTIO_SCSI_F_CHANGE, a
 * PARAM_CHANGE event (Linux then re-reads the capacity at once). */
int scsi_dev_capacity_changed(void *arg)
{
    struct scsi_ctl *c = arg;
    struct scsi_dev *d = c->dev;
    if (c->target >= SCSI_MAX_TARGETS) return -EINVAL;
    struct scsi_target *t = &d->tgt[c->target];
    if (t->state != TGT_PRESENT || !vn_desc_usable(t->desc)) return -ENODEV;
    t->num_blocks = __atomic_load_n(&t->desc->bdev->num_blocks, __ATOMIC_RELAXED);
    t->ua |= UA_CAPACITY_CHANGED;
    if (d->change)   /* reason: asc | ascq << 8 */
        send_event(d, VIRTIO_SCSI_T_PARAM_CHANGE, (int)c->target,
                   ASC_CAPACITY_CHANGED >> 8 | (ASC_CAPACITY_CHANGED & 0xff) << 8);
    return 0;
}

/* A driver (re)negotiated features: a fresh start for events and attentions. */
int scsi_dev_set_features(void *arg)
{
    struct scsi_ctl *c = arg;
    struct scsi_dev *d = c->dev;
    d->hotplug = (c->value & 1) != 0;
    d->change = (c->value & 2) != 0;
    d->events_missed = 0;
    for (int i = 0; i < SCSI_MAX_TARGETS; i++) d->tgt[i].ua = 0;
    return 0;
}

/* Queue `value` stops fetching: hand back what we hold on it.  Event buffers (as
 * VIRTIO_SCSI_T_NO_EVENT) would never complete otherwise; a held TMF would
 * complete only once commands on the request queues did, which the driver
 * stopping the control queue may keep busy, or which may be stuck on their bdev:
 * the stop must not wait for either.  A TMF whose commands are not all done is
 * rejected (the driver then treats it as failed), the others complete. */
int scsi_dev_queue_stopping(void *arg)
{
    struct scsi_ctl *c = arg;
    struct scsi_dev *d = c->dev;
    int n = 0;
    if (c->value == 0) {
        for (int i = 0; i < SCSI_MAX_TARGETS; i++) n += tmf_release(d, &d->tgt[i], 1);
        return n;
    }
    if (c->value != 1) return 0;
    struct scsi_req *sr;
    while ((sr = pop_event(d)) != NULL) {
        write_event(sr, VIRTIO_SCSI_T_NO_EVENT, -1, 0);
        n++;
    }
    return n;
}

int scsi_dev_target_outstanding(struct scsi_dev *d, uint32_t target)
{
    return target < SCSI_MAX_TARGETS ? (int)d->tgt[target].outstanding : 0;
}

void scsi_dev_get_stats(struct scsi_dev *d, struct scsi_dev_stats *out) { *out = d->stats; }
