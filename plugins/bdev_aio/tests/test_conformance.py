"""bdev_aio's bdevs pass vhost-core's bdev conformance suite unchanged: a file at 512 and
4096-byte blocks through Linux AIO, and through io_uring."""

import pytest

from vhost_core.testing.conformance.bdev import BdevConformance, BdevRecipe

CONFIGS = {"aio-512": ("aio", 512), "aio-4096": ("aio", 4096), "io_uring-512": ("io_uring", 512)}


class TestAioBdevs(BdevConformance):
    @pytest.fixture(params=list(CONFIGS))
    def bdev_recipe(self, request, backing_dir):
        engine, block_size = CONFIGS[request.param]
        path = backing_dir / "disk.img"
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(4 << 20)
        return BdevRecipe("bdev_aio_create", {"filename": str(path), "name": "Aio0", "block_size": block_size,
                                              "engine": engine},
                          delete_method="bdev_aio_delete")
