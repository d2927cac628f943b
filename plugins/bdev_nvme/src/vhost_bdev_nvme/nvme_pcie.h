// bdev_nvme's userspace NVMe PCIe driver over VFIO, native API, also the cffi cdef
// (preprocessor lines are stripped).
//
// The control plane (pcie.py) opens the function through VFIO (type-1 IOMMU, IOVA = host
// virtual address), resets and enables the controller, runs admin commands (Identify, Set
// Features, Create I/O CQ/SQ) and maps the daemon's guest memory into the IOMMU as the core
// registers it (nvp_dma_map/unmap).  The reactors each take one of the I/O queue pairs made
// at attach (shared by every namespace a reactor opens), submit with PRP lists (or SGLs,
// where the buffers are not page-aligned and the controller has them) built straight from
// the request's iovecs, and poll the completion queue.  A command unanswered within the
// I/O timeout fails its request (the slot stays reserved until the controller answers) and is
// handed to the control plane, which sends the controller an Abort for it;
// once the controller is failed (hot-removal, detach) every request fails at once.
//
#ifndef VHOST_BDEV_NVME_PCIE_H
#define VHOST_BDEV_NVME_PCIE_H

struct nvp_stats {
    uint64_t ops[6];            /* completed, by enum vn_io_type */
    uint64_t errors[6];
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t commands;          /* NVMe commands submitted on I/O queues (requests split at MDTS) */
    uint64_t prp_lists;         /* commands whose data needed a PRP list */
    uint64_t sgls;              /* commands sent with an SGL (buffers PRPs cannot describe) */
    uint64_t unaligned;         /* requests failed: buffers no PRP, SGL or bounce buffer can carry */
    uint64_t timeouts;          /* commands not answered within the I/O timeout */
    uint64_t queue_full;        /* submissions that waited for a free queue slot */
    uint64_t failed_removed;    /* requests failed because the controller is gone */
    uint64_t status_errors;     /* commands the controller completed with an error status */
    uint64_t bounced;           /* commands copied through a bounce buffer (neither PRPs nor SGLs fit) */
    uint32_t last_status;       /* SCT << 8 | SC of the latest error status */
    uint32_t reserved;
};

// Open the PCI function `bdf` (0000:00:04.0) through VFIO: container, group, device, BAR0,
// bus mastering.  NULL on failure, `err` says what and why.
void *nvp_open(const char *bdf, char *err, size_t errlen);
// Reset, set up the admin queue, enable (waits at most timeout_ms).  0 or -errno.
int nvp_enable(void *ctrlr, uint32_t timeout_ms, char *err, size_t errlen);
// CAP, VS.
uint64_t nvp_cap(void *ctrlr);
uint32_t nvp_vs(void *ctrlr);
// One admin command (64-byte SQE; its CID is set here) with `len` (<= 4096) bytes of data to or
// from `buf`; the 16-byte CQE goes to cqe.  0, -EREMOTEIO (error status in cqe), or -errno.
int nvp_admin(void *ctrlr, const uint8_t *sqe, void *buf, uint32_t len, int to_ctrlr, uint32_t timeout_ms,
              uint8_t *cqe, char *err, size_t errlen);
// After Identify: bytes per command (MDTS; 0 = no limit), whether SGLs may be used, I/O timeout.
void nvp_set_limits(void *ctrlr, uint32_t max_xfer_bytes, int sgl, uint32_t io_timeout_ms);
// Create `count` I/O queue pairs of `depth` entries (admin commands), each with its MSI-X vector
// when the function has enough.  Number made, or -errno.
int nvp_create_io_queues(void *ctrlr, uint16_t count, uint16_t depth, uint32_t timeout_ms, char *err,
                         size_t errlen);
// Map [vaddr, vaddr+len) for DMA at IOVA = vaddr (VFIO_IOMMU_MAP_DMA); 0 or -errno.
int nvp_dma_map(void *ctrlr, uint64_t vaddr, uint64_t len);
int nvp_dma_unmap(void *ctrlr, uint64_t vaddr, uint64_t len);
// An eventfd the kernel signals when it asks for the device back (hot-removal: the VFIO
// request interrupt).  -errno when the device has no request interrupt.
int nvp_request_eventfd(void *ctrlr);
// An eventfd signalled when I/O commands pass the I/O timeout (their requests fail at once),
// and those commands (qid | cid << 16, at most `max`, each once): the control plane sends them
// an NVMe Abort.
int nvp_timeout_eventfd(void *ctrlr);
int nvp_take_timed_out(void *ctrlr, uint32_t *out, int max);
// Controller reset, in three steps on the control plane's thread (admin lock held): begin (the
// reactors fail what is queued and in flight on their queues and leave them alone; new I/O
// fails; waits at most timeout_ms for every reactor using a queue), then nvp_enable and Set
// Features (number of queues), then nvp_reset_queues (each I/O queue pair emptied and created
// again on the controller), then end (I/O flows again).  0 or -errno.
int nvp_reset_begin(void *ctrlr, uint32_t timeout_ms);
int nvp_reset_queues(void *ctrlr, uint32_t timeout_ms, char *err, size_t errlen);
void nvp_reset_end(void *ctrlr);
// 1: fail queued, outstanding and new I/O at once (the controller is going).
void nvp_fail(void *ctrlr, int fail);
void nvp_get_stats(void *ctrlr, struct nvp_stats *out);
int nvp_queues_in_use(void *ctrlr);
// MSI-X vectors wired to eventfds (VFIO_DEVICE_SET_IRQS) at nvp_create_io_queues: interrupt-mode
// reactors sleep on them.  0: none (the reactors poll).
int nvp_interrupts(void *ctrlr);
// Shut the controller down (CC.SHN, at most timeout_ms) if it still answers.
void nvp_shutdown(void *ctrlr, uint32_t timeout_ms);
// Drop the control plane's reference: once no namespace holds the controller, DMA memory,
// BAR mapping and VFIO fds are released (the kernel may then hand the device back).
void nvp_put(void *ctrlr);

// A namespace as a bdev (vn_bdev first: its address is the bdev's native address).
void *nvp_ns_new(void *ctrlr, uint32_t nsid, uint32_t block_size, uint64_t num_blocks, uint32_t io_types);
void nvp_ns_free(void *ns);

#endif
