from setuptools import setup

setup(cffi_modules=["src/vhost_bdev_malloc/_build.py:ffibuilder"])
