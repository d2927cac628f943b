from setuptools import setup

setup(cffi_modules=["src/vhost_dev_blk/_build.py:ffibuilder"])
