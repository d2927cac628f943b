/* dev_scsi native API, also the cffi cdef (preprocessor lines are stripped). */
struct scsi_dev;
struct scsi_dev_stats {
    uint64_t commands, reads, writes, bytes_read, bytes_written;
    uint64_t unmaps, write_sames, flushes, check_conditions, bad_target;
    uint64_t invalid, overrun, tmfs, events_sent, events_missed, io_errors;
};
/* What the control plane tells the reactor about a target it attaches. */
struct scsi_target_desc {
    struct scsi_dev *dev;
    void *desc;                 /* struct vn_bdev_desc: the bdev, opened on the controller's reactor */
    uint32_t target;
    uint32_t readonly;
    char product[16];
    char serial[64];
    uint32_t serial_len;
    uint8_t naa[8];
    char t10_id[40];
    uint32_t t10_id_len;
};
/* Argument of the small reactor-side calls below. */
struct scsi_ctl {
    struct scsi_dev *dev;
    uint32_t target;
    uint32_t value;
};
const void *scsi_device_ops(void);
/* Most data bytes a command may move (VN_MAX_TRANSFER), as max_sectors and VPD 0xB0 state. */
uint32_t scsi_dev_max_transfer(void);
struct scsi_dev *scsi_dev_new(void);
void scsi_dev_free(struct scsi_dev *d);
int scsi_dev_add_target(void *desc);
int scsi_dev_remove_target(void *ctl);
int scsi_dev_set_features(void *ctl);
int scsi_dev_capacity_changed(void *ctl);
int scsi_dev_queue_stopping(void *ctl);
int scsi_dev_target_outstanding(struct scsi_dev *d, uint32_t target);
void scsi_dev_get_stats(struct scsi_dev *d, struct scsi_dev_stats *out);
