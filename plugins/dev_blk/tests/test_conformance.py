"""vhost-blk passes vhost-core's device-type conformance suite unchanged."""

import pytest

from vhost_core.testing.conformance.device import DeviceConformance, DeviceRecipe


class TestBlkDevice(DeviceConformance):
    @pytest.fixture(params=[1, 16], ids=["1-queue", "16-queues"])
    def device_recipe(self, request):
        return DeviceRecipe(
            ctrlr="vhost.0",
            setup=[("bdev_malloc_create", {"name": "Malloc0", "num_blocks": 2048, "block_size": 512}),
                   ("vhost_create_blk_controller",
                    {"ctrlr": "vhost.0", "dev_name": "Malloc0", "num_queues": request.param})],
            num_queues=request.param, config_size=60)
