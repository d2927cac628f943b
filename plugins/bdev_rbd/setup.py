from setuptools import setup

setup(cffi_modules=["src/vhost_bdev_rbd/_build.py:ffibuilder"])
