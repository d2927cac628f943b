"""The example bdev passes vhost-core's bdev conformance suite (needs vhost-dev-blk installed)."""

import pytest

# Skips (instead of failing) where the plugin is not installed, e.g. in the vhost-py
# workspace, which keeps this folder as a template.  Drop this line in your copy.
pytest.importorskip("vhost_bdev_example", reason="pip install this plugin first (pip install .[test])")

from vhost_core.testing.conformance.bdev import BdevConformance, BdevRecipe  # noqa: E402


class TestExampleBdev(BdevConformance):
    @pytest.fixture(params=[512, 4096])
    def bdev_recipe(self, request):
        return BdevRecipe("bdev_example_create",
                          {"name": "Example0", "num_blocks": (4 << 20) // request.param,
                           "block_size": request.param},
                          delete_method="bdev_example_delete")
