"""bdev_malloc's bdevs (malloc and null) pass vhost-core's bdev conformance suite unchanged."""

import pytest

from vhost_core.testing.conformance.bdev import BdevConformance, BdevRecipe

RECIPES = {
    "malloc-512": BdevRecipe("bdev_malloc_create", {"name": "Malloc0", "num_blocks": 8192, "block_size": 512},
                             delete_method="bdev_malloc_delete"),
    "malloc-4096": BdevRecipe("bdev_malloc_create",
                              {"name": "Malloc0", "num_blocks": 1024, "block_size": 4096},
                              delete_method="bdev_malloc_delete"),
    # A null bdev drops writes and reads back whatever the buffer held.
    "null": BdevRecipe("bdev_null_create", {"name": "Null0", "num_blocks": 8192, "block_size": 512},
                       delete_method="bdev_null_delete", data_integrity=False),
}


class TestMallocAndNullBdevs(BdevConformance):
    @pytest.fixture(params=list(RECIPES))
    def bdev_recipe(self, request):
        return RECIPES[request.param]
