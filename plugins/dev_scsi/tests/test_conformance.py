"""vhost-scsi passes vhost-core's device-type conformance suite unchanged."""

import pytest

from vhost_core.testing.conformance.device import DeviceConformance, DeviceRecipe

from vhost_dev_scsi.device import CONFIG, NUM_VIRTQUEUES


class TestScsiDevice(DeviceConformance):
    @pytest.fixture(params=[0, 1], ids=["no-target", "one-target"])
    def device_recipe(self, request):
        setup = [("vhost_create_scsi_controller", {"ctrlr": "vhost.0"})]
        if request.param:
            setup = [("bdev_malloc_create", {"name": "Malloc0", "num_blocks": 2048, "block_size": 512}),
                     *setup,
                     ("vhost_scsi_controller_add_target",
                      {"ctrlr": "vhost.0", "scsi_target_num": 0, "bdev_name": "Malloc0"})]
        return DeviceRecipe(ctrlr="vhost.0", setup=setup, num_queues=NUM_VIRTQUEUES, config_size=CONFIG.size)
