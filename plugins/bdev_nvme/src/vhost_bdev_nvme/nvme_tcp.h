// bdev_nvme's NVMe/TCP initiator, native API, also the cffi cdef (preprocessor lines are stripped).
//
// A controller (nvt_ctrlr_*) is shared by the control plane and the reactors: the control
// plane owns its admin queue (connect, Identify, Keep Alive, reconnect), each reactor channel
// of a namespace bdev owns one I/O queue pair, which it connects, polls and reconnects itself,
// without blocking.  Everything the target sends is checked; a bad PDU fails that connection.
//
#ifndef VHOST_BDEV_NVME_TCP_H
#define VHOST_BDEV_NVME_TCP_H

/* nvt_ctrlr_state values (atomics the reactors read). */
enum {
    NVT_ADMIN_DOWN = 0,         /* lost or not connected yet: I/O queues wait */
    NVT_ADMIN_UP = 1            /* enabled: I/O queues (re)connect */
};

struct nvt_stats {
    uint64_t ops[6];            /* completed, by enum vn_io_type */
    uint64_t errors[6];
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t commands;          /* NVMe commands sent on I/O queues (requests are split at MDTS) */
    uint64_t in_capsule;        /* writes sent inside the command capsule */
    uint64_t r2t;               /* R2T PDUs answered */
    uint64_t resent;            /* commands sent again after a reconnect */
    uint64_t io_connects;       /* I/O queue connections made */
    uint64_t io_disconnects;    /* I/O queue connections lost */
    uint64_t failed_fast;       /* requests failed because fast_io_fail_timeout_sec passed */
    int32_t last_errno;         /* negative errno of the latest I/O queue loss */
    uint32_t reserved;
    char last_error[160];       /* why the latest I/O queue connection was lost */
};

/* A controller; refcounted (nvt_ctrlr_put).  Returns the cntlid (>= 0) from nvt_admin_connect.  traddr is numeric (the control plane resolves names). */
void *nvt_ctrlr_new(const char *traddr, int family, uint16_t port, const char *subnqn, const char *hostnqn,
                    const uint8_t *hostid, int hdgst, int ddgst, uint32_t kato_ms);
void nvt_ctrlr_put(void *ctrlr);
// After Identify: bytes of in-capsule data I/O queues may send, the largest transfer per
// command (bytes, 0: no limit), I/O queue depth, how many I/O queues the target granted,
// reconnect delay and connect timeout for I/O queues.
void nvt_ctrlr_set_io(void *ctrlr, uint32_t incapsule_bytes, uint32_t max_xfer_bytes, uint16_t io_depth,
                      uint16_t num_io_queues, uint32_t reconnect_delay_ms, uint32_t connect_timeout_ms);
/* NVT_ADMIN_UP bumps the generation: I/O queues of the previous association reconnect. */
void nvt_ctrlr_set_state(void *ctrlr, int state, uint16_t cntlid);
/* 1: fail queued and new I/O at once (fast_io_fail_timeout_sec passed, or the controller goes). */
void nvt_ctrlr_set_fail_io(void *ctrlr, int fail);
void nvt_ctrlr_get_stats(void *ctrlr, struct nvt_stats *out);
int nvt_ctrlr_io_queues_in_use(void *ctrlr);

// The admin queue: one caller at a time (the control plane serialises).  Each call waits at
// most timeout_ms.  0 or a negative errno; `err` gets a sentence saying what went wrong.
int nvt_admin_connect(void *ctrlr, uint32_t timeout_ms, char *err, size_t errlen);
// After nvt_admin_connect answered -EREMOTEIO (the target refused the Fabrics Connect): the
// status field (SCT << 8 | SC, DNR bit 14) and dword 0 of its response (which parameter).
int nvt_admin_connect_status(void *ctrlr, uint16_t *status, uint32_t *result);
// Run one admin command (64-byte SQE; its CID is set here) with `len` bytes of data in `buf`
// (to the controller when to_ctrlr, else from it); the 16-byte CQE goes to cqe.
int nvt_admin_cmd(void *ctrlr, const uint8_t *sqe, void *buf, uint32_t len, int to_ctrlr,
                  uint32_t timeout_ms, uint8_t *cqe, char *err, size_t errlen);
// Wait up to timeout_ms for the admin connection to say something (it should not): 0, or a
// negative errno when it is lost (err says why).
int nvt_admin_poll(void *ctrlr, uint32_t timeout_ms, char *err, size_t errlen);
void nvt_admin_disconnect(void *ctrlr);

/* A namespace as a bdev (vn_bdev first: its address is the bdev's native address). */
void *nvt_ns_new(void *ctrlr, uint32_t nsid, uint32_t block_size, uint64_t num_blocks, uint32_t io_types);
void nvt_ns_free(void *ns);

uint32_t nvt_crc32c(const void *buf, size_t len);

#endif
