from setuptools import setup

setup(cffi_modules=["src/vhost_bdev_nvme/_build.py:ffibuilder", "src/vhost_bdev_nvme/_build.py:pcie_ffibuilder"])
