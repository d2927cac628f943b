"""NVMe/TCP namespaces pass vhost-core's bdev conformance suite unchanged, against Linux's
nvmet (a brd RAM disk as the namespace), with and without header and data digests."""

import pytest
from vhost_core.testing.conformance.bdev import BdevConformance, BdevRecipe


class TestNvmeTcpBdev(BdevConformance):
    @pytest.fixture(params=["plain", "digests"])
    def bdev_recipe(self, request, nvmet_target):
        digests = request.param == "digests"
        # brd on this kernel ignores discards (nvmet answers them with success): unmapped
        # blocks keep their data, as on many SSDs.
        return BdevRecipe("bdev_nvme_attach_controller",
                          nvmet_target.attach_params("Nvme0", hdgst=digests, ddgst=digests),
                          delete_method="bdev_nvme_detach_controller", delete_params={"name": "Nvme0"},
                          bdev_name="Nvme0n1", unmap_reads_zeroes=False)
