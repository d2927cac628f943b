from setuptools import setup

setup(cffi_modules=["src/vhost_bdev_aio/_build.py:ffibuilder"])
