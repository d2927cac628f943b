"""bdev_rbd's bdevs pass vhost-core's bdev conformance suite unchanged, on a real Ceph
cluster: an image at 512 and 4096-byte blocks, reached with its own connection and
through a registered cluster."""

import pytest

from vhost_core.testing.conformance.bdev import BdevConformance, BdevRecipe


class TestRbdBdevs(BdevConformance):
    @pytest.fixture(params=[512, 4096])
    def bdev_recipe(self, request, ceph, rbd_image):
        return BdevRecipe("bdev_rbd_create",
                          {"name": "Ceph0", "pool_name": "rbd", "rbd_name": str(rbd_image),
                           "block_size": request.param, "config": ceph.client_conf()},
                          delete_method="bdev_rbd_delete")
